//! Static cost of a graph: floating-point operations counted from facts.

use crate::{Graph, Op};

impl Graph {
    /// Floating-point operations of one forward, counting only convolution
    /// and linear multiply-adds as 2 FLOPs each (the usual convention;
    /// bias adds, normalisation and activations are not counted).
    pub fn flops(&self) -> u64 {
        self.nodes()
            .iter()
            .map(|node| match node.op {
                Op::Conv2d(attrs) | Op::FusedConv2d(crate::FusedConv2dAttrs { conv: attrs, .. }) => {
                    // Counted on the convolution's own output (before any fused pool).
                    let operands: Vec<&crate::TensorFact> =
                        node.inputs.iter().take(2).map(|&i| &self.node(i).fact).collect();
                    let Ok(out) = Op::Conv2d(attrs).infer(&operands) else {
                        return 0;
                    };
                    // Saturating: an unverified graph may state any sizes.
                    let macs_per_output = operands[1].shape[1..]
                        .iter()
                        .fold(1u64, |n, &d| n.saturating_mul(d as u64));
                    (out.elem_count() as u64)
                        .saturating_mul(macs_per_output)
                        .saturating_mul(2)
                }
                Op::Linear => {
                    let Some(weight) = node.inputs.get(1).map(|&w| &self.node(w).fact.shape) else {
                        return 0;
                    };
                    let (&[outputs, features], Some(&last)) = (weight.as_slice(), node.fact.shape.last()) else {
                        return 0;
                    };
                    let rows = (node.fact.elem_count() / last.max(1)) as u64;
                    rows.saturating_mul(outputs as u64)
                        .saturating_mul(features as u64)
                        .saturating_mul(2)
                }
                Op::Input
                | Op::Constant
                | Op::BatchNorm(_)
                | Op::Relu
                | Op::Relu6
                | Op::HardSwish
                | Op::HardSigmoid
                | Op::Sigmoid
                | Op::Silu
                | Op::Add
                | Op::Mul
                | Op::MaxPool2d(_)
                | Op::GlobalAvgPool2d
                | Op::AvgPool2d(_)
                | Op::Concat(_)
                | Op::Pad(_)
                | Op::Flatten(_) => 0,
            })
            .fold(0u64, u64::saturating_add)
    }
}
