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
                    let kernel = &operands[1].shape;
                    let macs_per_output = kernel[1] * kernel[2] * kernel[3];
                    2 * (out.elem_count() * macs_per_output) as u64
                }
                Op::Linear => {
                    let weight = &self.node(node.inputs[1]).fact.shape;
                    let rows = node.fact.elem_count() / weight[0].max(1);
                    2 * (rows * weight[0] * weight[1]) as u64
                }
                Op::Input
                | Op::Constant
                | Op::BatchNorm(_)
                | Op::Relu
                | Op::Add
                | Op::MaxPool2d(_)
                | Op::GlobalAvgPool2d
                | Op::Flatten(_) => 0,
            })
            .sum()
    }
}
