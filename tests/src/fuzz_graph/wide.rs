//! The `graph_diff_wide` target's graphs: models' sizes. Channel counts and
//! planes are drawn from those of ResNets' and MobileNets' layers, and most
//! steps are their building blocks, reading the last value: a conv unit
//! (conv → batch norm → activation), MobileNet's inverted residual (with
//! squeeze-and-excitation), ResNet's basic and bottleneck blocks and stem,
//! within a multiply-add budget. The CPU plan's choices that only large
//! convs take (the lane layouts, the split and lane 1×1 convs, F(4×4) and
//! F(2×2), the stem with its pool, the MobileNet block fused band by band)
//! are drawn here; the graphs of [`super::small`] (at most 6 input
//! channels on 12×12) never reach most of them.

use super::{Bytes, Case};
use candle_core::{DType, Device};
use wick_engine::{CacheSizes, Engine, WeightBudget};
use wick_ir::{
    Activation, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, Graph, MaxPool2dAttrs, NodeId,
    Op, PadAttrs, TensorFact,
};

/// Multiply-adds of all convs in one graph: the f64 reference on candle's
/// ops runs that in a fraction of a second.
const MAX_MACS: usize = 40_000_000;
/// Elements any conv's output may hold.
const MAX_ELEMENTS: usize = 1 << 20;
/// Input channels of a graph: an image's three most often.
const INPUT_CHANNELS: [usize; 8] = [3, 3, 8, 16, 24, 32, 64, 96];
/// Output channels of a conv: the zoo's, and a few that fill no lane group.
const CHANNELS: [usize; 20] = [
    8, 16, 20, 24, 32, 40, 48, 64, 72, 96, 120, 144, 160, 192, 256, 320, 384, 512, 576, 960,
];
/// Batch sizes: mostly one (the batch-1 plans: split 1×1 convs, bands
/// shared by the threads), and the tiled and wide batches.
const BATCHES: [usize; 6] = [1, 1, 1, 2, 3, 10];
/// Cache sizes (L1d, L2, L3 in bytes) the blocks are sized for: this
/// machine's (`None`), a Zen 3's, an Intel Xeon VM's, and the smallest
/// the engine accepts.
const CACHES: [Option<[usize; 3]>; 5] = [
    None,
    None,
    Some([32 << 10, 512 << 10, 32 << 20]),
    Some([48 << 10, 2 << 20, 256 << 20]),
    Some([4 << 10, 64 << 10, 1 << 20]),
];
/// Input planes' sides: the zoo's, and 19 (no tile or band divides it).
const SIDES: [usize; 5] = [7, 14, 19, 28, 56];

/// A graph, its input and the engine options it runs under, built from
/// `data` (always valid: a step whose attributes do not fit its input or
/// the budget is left out).
pub fn case_from_bytes(data: &[u8]) -> Case {
    let mut b = Bytes(data);
    let seed = b.below(256) as u64;
    let side = SIDES[b.below(SIDES.len())];
    let width = match b.below(4) {
        0 => SIDES[b.below(SIDES.len())],
        _ => side,
    };
    let batch = BATCHES[b.below(BATCHES.len())];
    let dims = [batch, INPUT_CHANNELS[b.below(INPUT_CHANNELS.len())], side, width];
    // The plan's switches: batch tiling, each conv its own step, the
    // pool's workers sleeping between kernels, F(4×4) convs stepped down
    // to fit the tightest weight budget, blocks sized for other caches.
    let engine = Engine::cpu()
        .with_batch_tiling(b.below(4) == 0)
        .with_expansion_fusion(b.below(8) != 0)
        .with_spinning(b.below(4) != 0);
    let engine = match b.below(4) {
        0 => engine.with_weight_budget(WeightBudget::factor(1.0).expect("at least 1")),
        _ => engine,
    };
    let engine = match CACHES[b.below(CACHES.len())] {
        Some([l1d, l2, l3]) => engine
            .with_caches(CacheSizes::given(l1d, l2, l3).expect("within the ranges"))
            .expect("valid sizes"),
        None => engine,
    };
    // Served as a service serves it, at any batch.
    let batched = b.flag();
    let mut graph = Graph::new("fuzz-wide");
    let x = graph
        .add_input("x", TensorFact::new(DType::F32, dims))
        .expect("fresh name");
    let mut g = Builder {
        b,
        graph,
        seed,
        values: vec![x],
        macs: 0,
    };
    for step in 0..1 + g.b.below(6) {
        let source = match g.b.below(4) {
            0 => g.values[g.b.below(g.values.len())],
            _ => g.last(),
        };
        let name = format!("s{step}");
        match g.b.below(10) {
            0 | 1 => g.conv_unit(&name, source),
            2 | 3 => g.inverted_residual(&name, source),
            4 => g.basic_block(&name, source),
            5 => g.bottleneck(&name, source),
            6 => g.stem(&name, x),
            7 => g.join(&name, source),
            8 => g.pool(&name, source),
            _ => g.pad(&name, source),
        };
    }
    let input = wick_models::random::uniform(seed, "input", &dims, -1.0, 1.0, &Device::Cpu).expect("cpu tensor");
    Case {
        graph: g.finish(),
        input,
        engine,
        batched,
    }
}

/// The graph under construction, the bytes it is drawn from and what it
/// has spent.
struct Builder<'a> {
    b: Bytes<'a>,
    graph: Graph,
    /// The constants' seed.
    seed: u64,
    /// Every value added, in order (the input first).
    values: Vec<NodeId>,
    /// Multiply-adds of the convs added.
    macs: usize,
}

impl Builder<'_> {
    /// The value added last (the input before any).
    fn last(&self) -> NodeId {
        *self.values.last().expect("the input at least")
    }

    /// `[N, C, H, W]` of value `id` (every value here is rank 4).
    fn shape(&self, id: NodeId) -> [usize; 4] {
        let shape = &self.graph.node(id).fact.shape;
        [shape[0], shape[1], shape[2], shape[3]]
    }

    /// A constant uniform in `[-bound, bound)` plus `centre`.
    fn constant(&mut self, name: String, shape: &[usize], centre: f64, bound: f64) -> NodeId {
        let data = wick_models::random::uniform(self.seed, &name, shape, centre - bound, centre + bound, &Device::Cpu)
            .expect("cpu tensor");
        self.graph.add_constant(name, data).expect("fresh name")
    }

    /// Adds node `name` and records it; `None` when the op does not fit
    /// its inputs.
    fn node(&mut self, name: String, op: Op, inputs: &[NodeId]) -> Option<NodeId> {
        let id = self.graph.add_node(name, op, inputs).ok()?;
        self.values.push(id);
        Some(id)
    }

    /// A conv of `x` to `out` channels, weights scaled to keep the values'
    /// spread, or `None` where it does not fit `x` or the budget.
    fn conv(
        &mut self,
        name: &str,
        x: NodeId,
        out: usize,
        kernel: [usize; 2],
        attrs: Conv2dAttrs,
        bias: bool,
    ) -> Option<NodeId> {
        let [batch, channels, height, width] = self.shape(x);
        let per_group = channels.is_multiple_of(attrs.groups).then(|| channels / attrs.groups)?;
        let [oh, ow] = attrs.output_size(kernel, [height, width])?;
        let elements = batch * out * oh * ow;
        let fan_in = per_group * kernel[0] * kernel[1];
        let macs = elements.checked_mul(fan_in)?;
        if elements > MAX_ELEMENTS || self.macs + macs > MAX_MACS || !out.is_multiple_of(attrs.groups) {
            return None;
        }
        let bound = (3.0 / fan_in as f64).sqrt();
        let w = self.constant(format!("{name}.w"), &[out, per_group, kernel[0], kernel[1]], 0.0, bound);
        let mut operands = vec![x, w];
        if bias {
            operands.push(self.constant(format!("{name}.b"), &[out], 0.0, 0.5));
        }
        let id = self.node(name.to_string(), Op::Conv2d(attrs), &operands)?;
        self.macs += macs;
        Some(id)
    }

    /// A conv of the usual kind: `kernel × kernel`, padded to keep the
    /// plane at stride 1, one group or `groups`.
    fn square(
        &mut self,
        name: &str,
        x: NodeId,
        out: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
    ) -> Option<NodeId> {
        let attrs = Conv2dAttrs {
            stride: [stride; 2],
            padding: [kernel / 2; 2],
            dilation: [1; 2],
            groups,
        };
        let bias = self.b.below(4) == 0;
        self.conv(name, x, out, [kernel; 2], attrs, bias)
    }

    /// An affine batch norm of `x`, its running variance in `[0.5, 1.5)`.
    fn batch_norm(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let channels = self.shape(x)[1];
        let mean = self.constant(format!("{name}.mean"), &[channels], 0.0, 0.5);
        let var = self.constant(format!("{name}.var"), &[channels], 1.0, 0.5);
        let weight = self.constant(format!("{name}.weight"), &[channels], 0.0, 1.5);
        let bias = self.constant(format!("{name}.bias"), &[channels], 0.0, 0.5);
        let attrs = BatchNormAttrs { eps: 1e-5 };
        self.node(name.to_string(), Op::BatchNorm(attrs), &[x, mean, var, weight, bias])
    }

    /// A drawn activation of `x`.
    fn activation(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let activation = Activation::ALL[self.b.below(Activation::ALL.len())];
        self.node(name.to_string(), activation.op(), &[x])
    }

    /// `conv` then, each drawn, a batch norm and an activation.
    fn with_norm(&mut self, name: &str, conv: Option<NodeId>) -> Option<NodeId> {
        let mut y = conv?;
        if self.b.flag() {
            y = self.batch_norm(&format!("{name}.bn"), y)?;
        }
        if self.b.flag() {
            y = self.activation(&format!("{name}.act"), y)?;
        }
        Some(y)
    }

    /// One conv of a drawn form (1×1, depthwise, 3×3, a wide strided
    /// window, or any attributes at all), its batch norm and activation.
    fn conv_unit(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let channels = self.shape(x)[1];
        let out = CHANNELS[self.b.below(CHANNELS.len())];
        let stride = 1 + self.b.below(2);
        let conv = match self.b.below(6) {
            0 | 1 => self.square(name, x, out, 1, 1, 1),
            2 => {
                let kernel = [3, 5][self.b.below(2)];
                self.square(name, x, channels, kernel, stride, channels)
            }
            3 => self.square(name, x, out, 3, stride, 1),
            4 => {
                let kernel = [3, 5, 7][self.b.below(3)];
                self.square(name, x, out, kernel, 2, 1)
            }
            _ => {
                let divisors: Vec<usize> = (1..=channels).filter(|g| channels.is_multiple_of(*g)).collect();
                let groups = divisors[self.b.below(divisors.len())];
                let kernel = [1 + self.b.below(4), 1 + self.b.below(4)];
                let attrs = Conv2dAttrs {
                    stride: [stride; 2],
                    padding: [self.b.below(3), self.b.below(3)],
                    dilation: [1 + self.b.below(2); 2],
                    groups,
                };
                let bias = self.b.flag();
                let out = groups * (1 + self.b.below(3));
                self.conv(name, x, out, kernel, attrs, bias)
            }
        };
        self.with_norm(name, conv)
    }

    /// MobileNetV2/V3's block: a 1×1 expansion (unless by 1), a depthwise
    /// conv, squeeze-and-excitation (drawn), a 1×1 projection and its batch
    /// norm, and the input added where the shapes agree.
    fn inverted_residual(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let channels = self.shape(x)[1];
        let hidden = channels * [1, 3, 4, 6][self.b.below(4)];
        let kernel = [3, 5][self.b.below(2)];
        let stride = 1 + self.b.below(2);
        let out = match self.b.flag() {
            true => channels,
            false => CHANNELS[self.b.below(CHANNELS.len())],
        };
        let mut y = x;
        if hidden != channels {
            let expand = self.square(&format!("{name}.expand"), y, hidden, 1, 1, 1);
            y = self.with_norm(&format!("{name}.expand"), expand)?;
        }
        let depthwise = self.square(&format!("{name}.dw"), y, hidden, kernel, stride, hidden);
        y = self.with_norm(&format!("{name}.dw"), depthwise)?;
        if self.b.flag() {
            y = self.squeeze_excite(&format!("{name}.se"), y)?;
        }
        let project = self.square(&format!("{name}.project"), y, out, 1, 1, 1)?;
        y = self.batch_norm(&format!("{name}.project.bn"), project)?;
        if self.shape(y) == self.shape(x) && self.b.flag() {
            y = self.node(format!("{name}.add"), Op::Add, &[x, y])?;
        }
        Some(y)
    }

    /// `x` scaled by channel weights drawn from its mean: a global pool,
    /// a 1×1 reduction, an activation, a 1×1 expansion, a gate.
    fn squeeze_excite(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let channels = self.shape(x)[1];
        let pooled = self.node(format!("{name}.pool"), Op::GlobalAvgPool2d, &[x])?;
        let reduce = self.square(&format!("{name}.reduce"), pooled, (channels / 4).max(8), 1, 1, 1)?;
        let reduce = self.activation(&format!("{name}.reduce.act"), reduce)?;
        let expand = self.square(&format!("{name}.expand"), reduce, channels, 1, 1, 1)?;
        let gate = [Activation::Sigmoid, Activation::HardSigmoid][self.b.below(2)];
        let gate = self.node(format!("{name}.gate"), gate.op(), &[expand])?;
        self.node(format!("{name}.scale"), Op::Mul, &[x, gate])
    }

    /// ResNet's downsampling shortcut where `y` and `x` differ: a strided
    /// 1×1 conv and its batch norm; then the sum and a ReLU.
    fn residual(&mut self, name: &str, x: NodeId, y: NodeId, stride: usize) -> Option<NodeId> {
        let shortcut = match self.shape(y) == self.shape(x) {
            true => x,
            false => {
                let out = self.shape(y)[1];
                let down = self.square(&format!("{name}.down"), x, out, 1, stride, 1)?;
                self.batch_norm(&format!("{name}.down.bn"), down)?
            }
        };
        let sum = self.node(format!("{name}.add"), Op::Add, &[y, shortcut])?;
        self.node(format!("{name}.relu"), Op::Relu, &[sum])
    }

    /// ResNet18/34's block: two 3×3 convs, the first maybe strided.
    fn basic_block(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let out = CHANNELS[self.b.below(CHANNELS.len())];
        let stride = 1 + self.b.below(2);
        let conv1 = self.square(&format!("{name}.conv1"), x, out, 3, stride, 1)?;
        let bn1 = self.batch_norm(&format!("{name}.bn1"), conv1)?;
        let y = self.node(format!("{name}.relu1"), Op::Relu, &[bn1])?;
        let conv2 = self.square(&format!("{name}.conv2"), y, out, 3, 1, 1)?;
        let y = self.batch_norm(&format!("{name}.bn2"), conv2)?;
        self.residual(name, x, y, stride)
    }

    /// ResNet50's block: 1×1, 3×3 (maybe strided), 1×1 to four times the width.
    fn bottleneck(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let width = CHANNELS[self.b.below(CHANNELS.len())];
        let stride = 1 + self.b.below(2);
        let mut y = x;
        for (k, (out, kernel, s)) in [(width, 1, 1), (width, 3, stride), (4 * width, 1, 1)]
            .into_iter()
            .enumerate()
        {
            let conv = self.square(&format!("{name}.conv{k}"), y, out, kernel, s, 1)?;
            y = self.batch_norm(&format!("{name}.bn{k}"), conv)?;
            if k < 2 {
                y = self.node(format!("{name}.relu{k}"), Op::Relu, &[y])?;
            }
        }
        self.residual(name, x, y, stride)
    }

    /// ResNet's stem: a 7×7 (or 3×3 / 5×5) stride-2 conv, its batch norm,
    /// a ReLU and a 3×3 stride-2 max pool (on the image, `x`, where the
    /// step draws one).
    fn stem(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let out = CHANNELS[self.b.below(6)];
        let kernel = [7, 3, 5][self.b.below(3)];
        let conv = self.square(name, x, out, kernel, 2, 1)?;
        let bn = self.batch_norm(&format!("{name}.bn"), conv)?;
        let relu = self.node(format!("{name}.relu"), Op::Relu, &[bn])?;
        let attrs = MaxPool2dAttrs {
            kernel: [3; 2],
            stride: [2; 2],
            padding: [1; 2],
            ceil_mode: self.b.below(4) == 0,
        };
        self.node(format!("{name}.pool"), Op::MaxPool2d(attrs), &[relu])
    }

    /// `x` added to, or joined on channels with, an earlier value of its shape.
    fn join(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let shape = self.shape(x);
        let concat = self.b.flag();
        let fits = |other: [usize; 4]| match concat {
            true => other[0] == shape[0] && other[2..] == shape[2..],
            false => other == shape,
        };
        let others: Vec<NodeId> = self.values.iter().copied().filter(|v| fits(self.shape(*v))).collect();
        let other = others[self.b.below(others.len())];
        match concat {
            true => self.node(name.to_string(), Op::Concat(ConcatAttrs { axis: 1 }), &[x, other]),
            false => self.node(name.to_string(), Op::Add, &[x, other]),
        }
    }

    /// A max or average pool of a drawn window, or squeeze-and-excitation.
    fn pool(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let kernel = [1 + self.b.below(3), 1 + self.b.below(3)];
        let stride = [1 + self.b.below(2); 2];
        match self.b.below(3) {
            0 => {
                let attrs = MaxPool2dAttrs {
                    kernel,
                    stride,
                    padding: [self.b.below(kernel[0] / 2 + 1), self.b.below(kernel[1] / 2 + 1)],
                    ceil_mode: self.b.flag(),
                };
                self.node(name.to_string(), Op::MaxPool2d(attrs), &[x])
            }
            1 => self.node(name.to_string(), Op::AvgPool2d(AvgPool2dAttrs { kernel, stride }), &[x]),
            _ => self.squeeze_excite(name, x),
        }
    }

    /// Zeros around the plane (ONNX exports' explicit `Pad`).
    fn pad(&mut self, name: &str, x: NodeId) -> Option<NodeId> {
        let pads = [self.b.below(3), self.b.below(3), self.b.below(3), self.b.below(3)];
        self.node(name.to_string(), Op::Pad(PadAttrs { pads }), &[x])
    }

    /// The graph with its outputs: the last value (or a classifier head
    /// on it) and maybe an earlier one.
    fn finish(mut self) -> Graph {
        let last = self.last();
        let mut outputs = vec![last];
        if self.b.flag() {
            let channels = self.shape(last)[1];
            let classes = 1 + self.b.below(1000);
            let pooled = self.node("head.pool".into(), Op::GlobalAvgPool2d, &[last]);
            let flat =
                pooled.and_then(|p| self.node("head.flatten".into(), Op::Flatten(FlattenAttrs { start_dim: 1 }), &[p]));
            let bound = (3.0 / channels as f64).sqrt();
            let w = self.constant("head.w".into(), &[classes, channels], 0.0, bound);
            let bias = self.constant("head.b".into(), &[classes], 0.0, 0.5);
            if let Some(fc) = flat.and_then(|f| self.node("head.fc".into(), Op::Linear, &[f, w, bias])) {
                outputs = vec![fc];
            }
        }
        self.b.extra_output(&self.values, &mut outputs);
        self.graph.set_outputs(outputs);
        self.graph
    }
}
