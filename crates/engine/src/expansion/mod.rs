//! Lowering-time fusion on the CPU: a 1×1 conv (the expansion of a
//! MobileNet or EfficientNet block) whose only reader is a depthwise conv
//! on the channel-blocked form runs inside that conv, one step for both
//! (and, where the depthwise conv's only reader is an in-place 1×1 conv,
//! the block's projection, that one too: [`project`]):
//! each band of the depthwise conv's input is computed from the 1×1
//! conv's input straight into its scratch, channels in the lanes, instead
//! of being written out as NCHW planes by one kernel and copied back in,
//! transposed, by the next. The graph is not changed (the pair's nodes
//! keep their names and facts; the step is named after both); only the
//! plan is, so the rewrite passes, the verifier and the CUDA path never
//! see it.
//!
//! Intel Xeon VM (AVX-512, 2 threads), the one step against the pair's
//! two in the model, per node, alternating binaries: MobileNetV2 at batch
//! 1 16 → 96 on 112×112 then the stride-2 depthwise 0.67-0.72×, 24 → 144
//! on 56×56 0.76-0.77×, 24 → 144 then stride 2 0.81-0.82×, the 14×14 and
//! 7×7 pairs 0.86-1.0×; the forward about 0.92× at batch 1 and 0.85× at
//! batch 10. (Alone, against two steps whose outputs were fresh
//! allocations, it looked better, 0.60-0.81×: the engine's recycled
//! buffers take that cost away.) The expanded tensor is also never
//! allocated: the forward's peak of live activations drops with it (5.7 →
//! 3.1 MiB at batch 1).
//!
//! A conv of a small window on few channels fuses the same way (a
//! network's stem: MobileNetV2's and EfficientNet-B0's 3×3 stride-2 conv
//! on the image, whose 32-channel output on 112×112 is the first
//! depthwise conv's input): each band copies the input rows its rows
//! read (halo rows included), with their padding, and sums each
//! position's `C·kh·kw` values there as a 1×1 conv of that many input
//! channels ([`ExpandWeights`] with a [`Window`]). Zen 4 (AVX-512, 2
//! threads), `xtask compare`, fused against the stem as its own step (each
//! position's values then gathered first): MobileNetV2 at batch 10 0.96×
//! the time, at batch 1 0.99-1.0×; EfficientNet-B0 0.985× at batch 1 and
//! 10; reading the copied rows, the fused step 0.84× the time again. The
//! stem's output (1.6 MB an image) is never written.

use crate::cpu::conv::depthwise::{DepthwiseConv, ExpandWeights, Window, MAX_WINDOW_DEPTH};
use crate::cpu::conv::CpuConv;
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use crate::cpu::{ConvAlgorithm, CpuKernel};
use crate::kernel::{constant, on_host, Kernel, Slot};
use std::collections::HashMap;
use wick_ir::{Activation, DType, Graph, Node, NodeId, Op};

/// The pairs of a graph that run as one step, both ways.
#[derive(Debug, Default)]
pub(crate) struct Expansions {
    /// The depthwise conv that runs each fused 1×1 conv and its channels
    /// per block, by 1×1 conv.
    reader: HashMap<NodeId, (NodeId, usize)>,
    /// The fused 1×1 conv of each depthwise conv, by depthwise conv.
    producer: HashMap<NodeId, NodeId>,
    /// The in-place 1×1 conv (a projection) each fused depthwise conv
    /// runs on its output, by depthwise conv.
    projection: HashMap<NodeId, NodeId>,
    /// The depthwise conv each fused projection runs in, by projection.
    projected: HashMap<NodeId, NodeId>,
}

impl Expansions {
    /// The pairs in `graph` whose convs run as `algorithms` says (the CPU
    /// plan) on `isa`'s path: a 1×1 conv (either form) with no
    /// residual, input scale or pool, read by nothing but a depthwise conv
    /// with none of those either (as its input) whose output takes the
    /// channel-blocked form, and not a graph output; and such depthwise
    /// convs' projections ([`projection`]), with an expansion or not.
    ///
    /// A 1×1 conv between two such depthwise convs (MobileNetV1's chain)
    /// takes one role, the expansion of the one after it: the expansions
    /// are found first, and a projection that is one is left to it. (The
    /// fifty-ninth session found the plan giving it both, whose first step
    /// then never ran.) Expansion first against projection first, Zen 4,
    /// 2 threads, MobileNetV1's ONNX export, `scripts/ab_builds.py`, two
    /// runs each: 0.948× and 0.952× the time at batch 1, 0.852× and 0.872×
    /// at batch 10 (peak RSS 83 -> 59 MiB); the zoo's plans are unchanged
    /// (no such chain in them).
    pub(crate) fn find(graph: &Graph, algorithms: &HashMap<String, ConvAlgorithm>, isa: Isa) -> Self {
        let users = graph.users();
        let mut found = Self::default();
        let depthwise: Vec<(NodeId, ConvParts, usize)> = graph
            .node_ids()
            .filter_map(|id| blocked_depthwise(graph, algorithms, isa, id).map(|(parts, lanes)| (id, parts, lanes)))
            .collect();
        for &(id, ref parts, lanes) in &depthwise {
            let producer = graph.node(parts.x);
            let plain = ConvParts::of(producer).is_some_and(|p| !p.extra);
            let fusible = match algorithms.get(&producer.name) {
                Some(ConvAlgorithm::Pointwise | ConvAlgorithm::PointwiseLanes | ConvAlgorithm::PointwiseSplit) => true,
                Some(ConvAlgorithm::DirectPanels | ConvAlgorithm::DirectLanes) => window(graph, producer).is_some(),
                _ => false,
            };
            if plain && fusible && users[parts.x.index()] == [id] && !graph.outputs().contains(&parts.x) {
                tracing::debug!(expand = %producer.name, depthwise = %graph.node(id).name, "conv runs inside its depthwise reader");
                found.reader.insert(parts.x, (id, lanes));
                found.producer.insert(id, parts.x);
            }
        }
        for &(id, _, _) in &depthwise {
            let projection = projection(graph, &users, algorithms, id).filter(|p| !found.reader.contains_key(p));
            if let Some(projection) = projection {
                tracing::debug!(depthwise = %graph.node(id).name, projection = %graph.node(projection).name, "1×1 conv runs inside the depthwise conv it reads");
                found.projection.insert(id, projection);
                found.projected.insert(projection, id);
            }
        }
        found
    }

    /// The channels per block of `node`'s reader if `node` is a 1×1 conv
    /// that runs inside it.
    pub(crate) fn fused_lanes(&self, node: NodeId) -> Option<usize> {
        self.reader.get(&node).map(|&(_, lanes)| lanes)
    }

    /// The fused 1×1 conv `node` (a depthwise conv) runs, if any.
    pub(crate) fn producer_of(&self, node: NodeId) -> Option<NodeId> {
        self.producer.get(&node).copied()
    }

    /// The fused projection `node` (a depthwise conv) runs on its output, if any.
    pub(crate) fn projection_of(&self, node: NodeId) -> Option<NodeId> {
        self.projection.get(&node).copied()
    }

    /// The depthwise conv `node` (a 1×1 conv) runs inside, if any.
    pub(crate) fn projected_in(&self, node: NodeId) -> Option<NodeId> {
        self.projected.get(&node).copied()
    }
}

/// The operands and lanes per block of node `id` if it is a depthwise
/// conv (as `algorithms` plans it) with no residual, input scale or pool
/// whose output takes the channel-blocked form on `isa`'s path: one that
/// can run a 1×1 conv in front of it or after it.
fn blocked_depthwise(
    graph: &Graph,
    algorithms: &HashMap<String, ConvAlgorithm>,
    isa: Isa,
    id: NodeId,
) -> Option<(ConvParts, usize)> {
    let node = graph.node(id);
    let parts = ConvParts::of(node)?;
    let lanes = DepthwiseConv::blocked_lanes(isa, *node.fact.shape.get(3)?)?;
    let depthwise = algorithms.get(&node.name) == Some(&ConvAlgorithm::Depthwise);
    (depthwise && !parts.extra).then_some((parts, lanes))
}

/// The reader of depthwise conv `id` (on the channel-blocked form) that
/// runs inside it: its only reader, an in-place 1×1 conv
/// (`pointwise`) of its output with no input scale or pool (a residual
/// and an activation are fine), where that output is not a graph output.
/// A reader that takes the output twice (as its residual too) is listed
/// twice in `users`, so it is not the only reader.
fn projection(
    graph: &Graph,
    users: &[Vec<NodeId>],
    algorithms: &HashMap<String, ConvAlgorithm>,
    id: NodeId,
) -> Option<NodeId> {
    let &[reader] = users[id.index()].as_slice() else {
        return None;
    };
    let node = graph.node(reader);
    let parts = ConvParts::of(node)?;
    let pointwise = algorithms.get(&node.name) == Some(&ConvAlgorithm::Pointwise);
    (pointwise && parts.x == id && !parts.other && !graph.outputs().contains(&id)).then_some(reader)
}

/// A conv node's operands and what its epilogue does, for either conv op.
struct ConvParts {
    x: NodeId,
    /// Whether it has a bias operand (input 2 of either op).
    bias: bool,
    activation: Option<Activation>,
    /// A residual, an input scale or a fused pool (none fuse here).
    extra: bool,
    /// An input scale or a fused pool (a projection's residual fuses).
    other: bool,
}

impl ConvParts {
    fn of(node: &Node) -> Option<Self> {
        match &node.op {
            Op::Conv2d(_) => Some(Self {
                x: *node.inputs.first()?,
                bias: node.inputs.len() > 2,
                activation: None,
                extra: false,
                other: false,
            }),
            Op::FusedConv2d(fused) => {
                let inputs = fused.inputs(&node.inputs)?;
                Some(Self {
                    x: inputs.x,
                    bias: true,
                    activation: fused.activation,
                    extra: inputs.residual.is_some() || inputs.scale.is_some() || fused.pool.is_some(),
                    other: inputs.scale.is_some() || fused.pool.is_some(),
                })
            }
            _ => None,
        }
    }
}

/// The window conv `node` reads per output position, where it runs
/// inside a depthwise reader as one ([`Window`]): one group, f32, its
/// input `[N, C, H, W]`, `C·kh·kw` at most [`MAX_WINDOW_DEPTH`] (a
/// network's stem on the image's channels). A conv of many channels
/// reads too much per position through the tap table, and gains less:
/// its own kernel already spends most of its time on multiplies.
fn window(graph: &Graph, node: &Node) -> Option<Window> {
    let attrs = match &node.op {
        Op::Conv2d(attrs) => *attrs,
        Op::FusedConv2d(fused) => fused.conv,
        _ => return None,
    };
    let x = graph.node(*node.inputs.first()?);
    let &[_, channels, height, width] = x.fact.shape.as_slice() else {
        return None;
    };
    let weight = graph.node(*node.inputs.get(1)?);
    let &[_, per_group, kh, kw] = weight.fact.shape.as_slice() else {
        return None;
    };
    let depth = channels.checked_mul(kh)?.checked_mul(kw)?;
    (attrs.groups == 1 && per_group == channels && depth <= MAX_WINDOW_DEPTH && node.fact.dtype == DType::F32)
        .then_some(Window {
            channels,
            size: [height, width],
            kernel: [kh, kw],
            attrs,
        })
}

/// The weights of the fused conv `node` (a 1×1 conv, or one that reads a
/// [`window`]), blocked `lanes` channels at a time, and the slot of its input.
pub(crate) fn expand_weights(graph: &Graph, node: &Node, lanes: usize) -> candle_core::Result<(ExpandWeights, Slot)> {
    let Some(parts) = ConvParts::of(node) else {
        candle_core::bail!("a fused conv must be a conv node")
    };
    // Both conv ops hold the weight at input 1 and the bias, if any, at 2.
    let not_constant = || candle_core::Error::Msg(format!("the fused conv `{}` needs constant weights", node.name));
    let weight = constant(graph, node, 1).ok_or_else(not_constant)?;
    let bias = match parts.bias {
        true => Some(constant(graph, node, 2).ok_or_else(not_constant)?),
        false => None,
    };
    let (weight, bias) = on_host(weight, bias)?;
    let (out_channels, in_channels, kh, kw) = weight.dims4()?;
    // A 1×1 conv reads its input planes in place where it has no stride
    // or padding (the pointwise kernels' convs); any other reads windows.
    let window = match window(graph, node) {
        Some(w) if [kh, kw] == [1, 1] && w.attrs.stride == [1, 1] && w.attrs.padding == [0, 0] => None,
        Some(w) => Some(w),
        None if [kh, kw] == [1, 1] => None,
        None => candle_core::bail!(
            "the fused conv `{}` reads no window of at most {MAX_WINDOW_DEPTH} values",
            node.name
        ),
    };
    let epilogue = Epilogue::new(bias.as_ref(), out_channels, parts.activation)?;
    let values = weight.flatten_all()?.to_vec1::<f32>()?;
    let depth = in_channels * kh * kw;
    let weights = ExpandWeights::new(&values, [out_channels, depth], &epilogue, lanes, window)?;
    Ok((weights, parts.x.index()))
}

/// `kernel` (a depthwise conv's, as lowered) running the fused 1×1 conv
/// `expand` on `x` in front; an error when it is not a blocked depthwise
/// conv with `expand`'s lanes (which [`Expansions::find`] rules out).
pub(crate) fn fuse(kernel: Kernel, expand: ExpandWeights, x: Slot) -> candle_core::Result<Kernel> {
    match kernel {
        Kernel::Cpu(CpuKernel::Conv {
            conv,
            residual: None,
            scale: None,
            ..
        }) if matches!(&*conv, CpuConv::Depthwise(dw, None) if dw.lanes() == Some(expand.lanes())) => {
            Ok(Kernel::Cpu(CpuKernel::ExpandedDepthwise { expand, conv, x }))
        }
        _ => candle_core::bail!("a 1×1 conv fuses only into a channel-blocked depthwise conv with its lanes"),
    }
}

/// `depthwise` (a [`fuse`]d step) running `projection` (the 1×1 conv that
/// reads its output, as lowered) on its output, band by band, so that the
/// depthwise output is never written out either; an error when they are
/// not such a pair with an in-place 1×1 conv without input scale (which
/// [`Expansions::find`] rules out). Only where there are at least as many
/// images as threads (the step runs the two convs in turn otherwise:
/// `cpu::conv::depthwise::blocked::project`). Intel Xeon VM, 2 threads,
/// alternating forwards: MobileNetV2 at batch 10 0.89× the time (AVX2
/// forced 0.90×), MobileNetV3-Large 0.98× (0.96×; its blocks with
/// squeeze-and-excitation scale the depthwise output first and are not
/// fused), MobileNetV2 at batch 1 level. Then also without an expansion
/// (the first block of either: a depthwise conv on 112×112 planes and its
/// projection): MobileNetV3-Large at batch 10 0.87× (AVX2 0.91×; its
/// features.1, 16 -> 16 + residual, 0.74×), MobileNetV2 0.97× (0.97×),
/// both at batch 1 level.
pub(crate) fn project(depthwise: Kernel, projection: Kernel) -> candle_core::Result<Kernel> {
    let (expand, conv, x) = match depthwise {
        Kernel::Cpu(CpuKernel::ExpandedDepthwise { expand, conv, x }) => (Some(expand), conv, x),
        Kernel::Cpu(CpuKernel::Conv {
            conv,
            x,
            residual: None,
            scale: None,
            ..
        }) if matches!(&*conv, CpuConv::Depthwise(dw, None) if dw.lanes().is_some()) => (None, conv, x),
        _ => candle_core::bail!("a 1×1 conv fuses only after a channel-blocked depthwise conv"),
    };
    match projection {
        Kernel::Cpu(CpuKernel::Conv {
            conv: projection,
            residual,
            scale: None,
            ..
        }) if matches!(&*projection, CpuConv::Pointwise(_)) => Ok(Kernel::Cpu(CpuKernel::ProjectedDepthwise {
            expand,
            conv,
            x,
            projection,
            residual,
        })),
        _ => candle_core::bail!("a 1×1 conv fuses after an expanded depthwise conv only in place, unscaled"),
    }
}

#[cfg(test)]
mod tests;
