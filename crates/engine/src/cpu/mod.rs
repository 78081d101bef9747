//! wick's own CPU f32 kernels: convolutions with weights packed at compile
//! time (one module per algorithm family under [`conv`]), the max pool,
//! the per-plane ops (global average pool, channel scale), the activations, the
//! conv epilogue (once, for all of them), the GEMM micro-kernels with the
//! instruction-set dispatch, and the memory they work in.
//!
//! [`conv_algorithm`] is the policy: which algorithm runs a conv node, from
//! the node's attributes and its compiled shape; [`budget`] then bounds the
//! memory of a whole graph's packed weights. The choice only affects speed
//! and memory: every algorithm takes any input shape and is tested against
//! candle's conv.

pub(crate) mod activation;
pub(crate) mod budget;
pub(crate) mod conv;
pub(crate) mod data;
pub(crate) mod epilogue;
pub(crate) mod gemm;
pub(crate) mod linear;
pub(crate) mod output;
pub(crate) mod parallel;
pub(crate) mod peak;
pub(crate) mod plane;
pub(crate) mod pool;
pub(crate) mod pool_window;
pub(crate) mod prefetch;
pub(crate) mod recycle;
pub(crate) mod transpose;
pub(crate) mod weight_buffer;

use crate::kernel::Slot;
use crate::machine::Machine;
use candle_core::Tensor;
use conv::{winograd, ConvSpec, CpuConv};
use std::sync::Arc;
use wick_ir::Activation;

/// Fewer tiles than this (over the batch) run faster as a direct convolution
/// than as Winograd F(4×4) (measured on ResNet18: at batch 1 its 7×7
/// layers, 4 tiles per image, run faster direct).
const F4_MIN_TILES: usize = 16;
/// Fewer channels (in or out) than this do not fill F(4×4)'s panels.
const F4_MIN_CHANNELS: usize = 8;
/// Output pixels per forward up to which F(2×2) is chosen when F(4×4) does
/// not pay off, on paths without wide FMAs. Measured on ResNet18's layer4
/// at batch 1 (49 pixels): 1.58 ms direct (lane GEMM) against 1.17–1.27 ms
/// F(2×2) when it landed (Zen 4); on the Intel Xeon VM, per node in the
/// model, the AVX2 path's direct convs took 1.20-1.24× F(2×2)'s time. With
/// wide FMAs ([`crate::machine::Machine::wide_fma`]) the direct lane conv
/// is taken instead: F(2×2) cuts the multiplies 2.25× but packs 16/9 of the
/// weights (16.8 MB a 512-channel conv, streamed once per forward at batch
/// 1), and where the FMAs are twice as fast, the stream costs more than the
/// multiplies it saves. Intel Xeon VM, AVX-512, 2 threads, alternating
/// profiles: ResNet18's three layer4 F(2×2) convs 0.87-0.96× the time
/// direct, ResNet18 batch 1 0.96×, ResNet34 0.98×, ResNet50 level (its
/// two, 0.95-0.99×). Bigger maps with too few tiles for F(4×4) (batch 2–3
/// at 7×7) were not timed.
const F2_MAX_PIXELS: usize = 256;
/// Fewer channels than this gain too little from F(2×2)'s cut in
/// multiplies (a judgement, not a measurement: ResNet18's few-pixel 3×3
/// convs all have 512).
const F2_MIN_CHANNELS: usize = 64;
/// Direct convs expected to produce at most this many output pixels per
/// forward (batch 1 at 14×14 and below) pack their weights for the lane
/// micro-kernel: channels on the vector lanes, weights streamed once.
const LANE_MAX_PIXELS: usize = 256;
/// Direct convs of more than one tap at least this deep (`C·kh·kw`: the
/// ResNets' 3×3 stride-2 convs, 576 to 4608) take the lane layout at every
/// size on the SIMD paths (AVX2 since the forty-ninth session, AVX-512
/// since the fiftieth). Its tile (AVX2: 6 pixels × 16 channels, AVX-512:
/// 14 × 32, the pixels broadcast from the input read in place) copies no
/// im2col columns or input phases and wastes no columns at the ends of
/// rows, where the panel layout's 16-column tiles compute 32 of a 28-wide
/// row. On the Intel Xeon VM with AVX2 forced (2 threads, alternating
/// runs), alone, against panels: at batch 1, 64 -> 128 onto 28×28
/// (ResNet18's and ResNet34's layer2.0.conv1) 0.81× the time, 128 -> 128
/// (ResNet50's layer2.0.conv2) 0.81×; at batch 10 the same 0.82× and
/// 0.85×, 256 -> 256 onto 14×14 0.84×, 256 -> 512 and 512 -> 512 onto 7×7
/// 0.91× and 0.89×. In the models per node ResNet18's layer2.0.conv1
/// 0.85× at batch 1, ResNet50's three at batch 10 0.83×, 0.83×, 0.93×
/// (the forward 0.97×); whole forwards against the build before, ResNet18
/// at batch 1 0.970×, ResNet34 0.978×. With AVX-512 the lanes ran the
/// stride-2 convs no faster than panels (1.03× and 1.00× at batch 1)
/// while their products went back to rows one value at a time (7.5% of
/// the CPU time of the 64 -> 128 conv on lanes); moved eight columns at a
/// time, alone (Intel Xeon VM, AVX-512, 2 threads, `scripts/ab_builds.py`
/// on one-conv ONNX files): at batch 1 64 -> 128 onto 28×28 0.92×, 256 ->
/// 256 onto 14×14 0.99×; at batch 10 64 -> 128 0.93×, 128 -> 128 0.99×,
/// 256 -> 256 0.85×, 512 -> 512 onto 7×7 0.92×. Per node in the models:
/// ResNet18's layer2.0.conv1 at batch 1 0.89× (five alternating
/// profiles), ResNet50's at batch 10 0.86× (layer3.0.conv2), 1.00×,
/// 1.02×; whole forwards level (ResNet18 0.996× at batch 1 and 10,
/// ResNet34 0.998×, ResNet50 1.002× and 0.991×). On Zen 4's AVX-512
/// (each 512-bit FMA in two halves) level: panels for them instead,
/// whole forwards alternating (the fifty-seventh session) ResNet18 1.006×
/// (batch 1) and 0.993× (batch 10), ResNet50 1.002× at both. Not the
/// MobileNets' stems (27 deep, onto 112×112):
/// MobileNetV3-Large's (16 outputs, half a lane group) took 1.04× the
/// forward on lanes with AVX2, MobileNetV2's and EfficientNet-B0's level;
/// depths between were not measured. Not the 1×1 stride-2 downsamples
/// either (64 -> 128 onto 28×28 at batch 1 1.13× on lanes with AVX2;
/// ResNet50's layer2.0.downsample 1.2× with AVX-512). The scalar path
/// keeps [`LANE_MAX_PIXELS`].
const LANE_MIN_DEPTH: usize = 576;

/// Output planes up to this many pixels (7×7, 8×8) run a 1×1 conv with
/// enough input channels ([`POINTWISE_LANES_MIN_DEPTH`]) on the lane
/// micro-kernel ([`conv::pointwise_lanes`]) rather than the in-place GEMM,
/// which pads their rows to whole 16-column granules and packs its input.
/// Per node on the Intel Xeon VM (AVX-512, two threads), alternating
/// profiles of the two builds, each ratio against the median node's of
/// the same runs (the host's speed drifted between them): ResNet50's
/// layer4 1×1 convs (2048 -> 512, 512 -> 2048 + residual) 0.76-0.84× the
/// time at batch 1 and 0.82-0.85× at batch 10; MobileNetV2's 960 -> 160
/// / 320 projections 0.82-0.90× (batch 1) and 0.89-0.93× (batch 10);
/// MobileNetV3-Large's and EfficientNet-B0's squeeze-and-excitation-scaled
/// projections (672 / 960 -> 160, 672 / 1152 -> 192, 1152 -> 320)
/// 0.71-0.79× at batch 1, 0.93-1.03× at batch 10. With AVX2 forced:
/// ResNet50's 0.92-1.0×, MobileNetV2's 0.98-1.05×. On 14×14 planes the
/// lane product alone was 0.92-0.98× the in-place conv's whole time,
/// before gathering its products back into rows: not taken there. At
/// batch 1 the projections among them (twice as many inputs as outputs)
/// split their depth instead ([`SPLIT_MIN_PLANE`]).
pub(crate) const POINTWISE_LANES_MAX_PLANE: usize = 64;
/// Input channels from which the lane form of a small-plane 1×1 conv
/// pays for gathering its products back into rows (one strided read per
/// output value, against `C` multiply-adds for it). The expansions to
/// four to six times their 160-320 channels lost (same runs as above):
/// MobileNetV3-Large's 160 -> 960 1.11×, MobileNetV2's and
/// EfficientNet-B0's 320 -> 1280 1.02-1.03×.
pub(crate) const POINTWISE_LANES_MIN_DEPTH: usize = 384;

/// A 1×1 conv at batch 1 with at least this many times as many input
/// channels as output channels, on a plane of [`SPLIT_MIN_PLANE`] to
/// [`SPLIT_MAX_PLANE`] pixels, runs in two halves of its depth
/// ([`conv::pointwise_split`]): each of two threads reads half the input
/// and half the weights, where with its share of the columns it read all
/// of both (the input half of it written by the other core, as the convs
/// before split their channels: a likely reason, not measured apart).
/// Per node on the Intel Xeon VM (AVX-512, 2 threads), profiles of the
/// two builds alternating, medians of three: MobileNetV2's 14×14
/// projections (576 -> 96 + residual, 384 -> 64 + residual, 384 -> 96)
/// 0.75-0.87× the time, the forward 0.96×; ResNet50's 1024 -> 256 on
/// 14×14 0.74-0.85×, the forward 0.99×; EfficientNet-B0's and
/// MobileNetV3-Large's squeeze-and-excitation-scaled projections on 14×14
/// 0.66-0.71×, forwards 0.95× and 0.91×. AVX2 forced: MobileNetV2's 0.72-
/// 0.87× (forward 0.96×), EfficientNet-B0's 0.72-0.78× (0.95×). Tried
/// first with a run-time switch: ResNet50's 256 -> 1024 + residual on
/// 14×14 (fewer input than output channels: the output's sums cross
/// instead) 1.22-1.44×; on 28×28 planes level (0.95-1.03×); on 56×56 and
/// 112×112 slower (1.04-1.94×: one task per half, where the column shares
/// kept both threads busy): not taken.
pub(crate) const SPLIT_MIN_DEPTH_RATIO: usize = 2;
/// The smallest plane (pixels) a depth-split 1×1 conv runs on: 7×7, where
/// it takes the projections at batch 1 from the lane form
/// ([`POINTWISE_LANES_MAX_PLANE`]), whose tasks (runs of output channels)
/// each read the whole input. Intel Xeon VM (2 threads), batch 1, whole
/// forwards alternating with the lane form (`scripts/ab_builds.py`, the
/// fifty-third session): MobileNetV2 0.978×, MobileNetV3-Large 0.976×,
/// EfficientNet-B0 0.974× the time (AVX-512); with AVX2 forced 0.983×,
/// 0.984×, 0.992×; ResNet50 (layer4's 2048 -> 512) 0.994× and 1.000×.
/// Per node (profiles, AVX-512) MobileNetV2's 960 -> 160 + residual 0.075
/// -> 0.059 ms, 576 -> 160 0.048 -> 0.039, even though the in-place GEMM
/// pads each 49-pixel row to 64 columns. Below 7×7 the lane form stays
/// (not measured).
pub(crate) const SPLIT_MIN_PLANE: usize = 49;
/// The largest plane a depth-split 1×1 conv runs on: 20×20 (14×14
/// measured; 28×28 level).
pub(crate) const SPLIT_MAX_PLANE: usize = 400;

/// The deepest 1×1 conv on 1×1 planes with more outputs than inputs (the
/// squeeze-and-excitation's excitation) run as dot products on the linear
/// layer's packed panels ([`ConvAlgorithm::Gemv`]) rather than the panel
/// GEMM, whose 16-column tiles are 15/16 padding there. Zen 4, two
/// threads, batch 1, `xtask compare` (300 pairs after 50 warm-up
/// forwards): EfficientNet-B0 (excitations 4-48 deep) 0.977-0.981× the
/// time, AVX2 forced 0.980×; MobileNetV3-Large (24-240 deep) level at 64
/// (0.999-1.005×), 1.015-1.023× slower with every excitation as dot
/// products; batch 10 level (1.00×). (Tried before the buffer pool stopped
/// growing every forward, dot products for every excitation made
/// EfficientNet-B0 1.02-1.035× slower.)
pub(crate) const GEMV_MAX_SHALLOW_DEPTH: usize = 64;

/// The CPU conv algorithms, named as the debug log and the tests name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ConvAlgorithm {
    /// Winograd F(4×4, 3×3) on the panel micro-kernel.
    WinogradF4,
    /// Winograd F(2×2, 3×3) on the lane micro-kernel.
    WinogradF2,
    /// Blocked implicit GEMM, pixels on the vector lanes.
    DirectPanels,
    /// Blocked implicit GEMM, output channels on the vector lanes.
    DirectLanes,
    /// Per-group im2col + the `gemm` crate (grouped convs other than depthwise).
    Grouped,
    /// One filter per channel over a zero-padded plane (depthwise convs).
    Depthwise,
    /// A 1×1 conv (stride 1, no padding) as a GEMM on the planes in place.
    Pointwise,
    /// A 1×1 conv (stride 1, no padding) on small planes, output channels
    /// on the vector lanes.
    PointwiseLanes,
    /// A 1×1 conv (stride 1, no padding) as two half-depth GEMMs in
    /// parallel and their sum: projections on small planes at batch 1.
    PointwiseSplit,
    /// A 1×1 conv on 1×1 output planes as dot products.
    Gemv,
    /// A conv of few input channels with a fused max pool, output
    /// channels on the vector lanes (ResNet's stem).
    Stem,
}

impl ConvAlgorithm {
    /// The name in logs and tests.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ConvAlgorithm::WinogradF4 => "winograd-f4x4",
            ConvAlgorithm::WinogradF2 => "winograd-f2x2",
            ConvAlgorithm::DirectPanels => "direct-panels",
            ConvAlgorithm::DirectLanes => "direct-lanes",
            ConvAlgorithm::Grouped => "grouped",
            ConvAlgorithm::Depthwise => "depthwise",
            ConvAlgorithm::Pointwise => "pointwise",
            ConvAlgorithm::PointwiseLanes => "pointwise-lanes",
            ConvAlgorithm::PointwiseSplit => "pointwise-split",
            ConvAlgorithm::Gemv => "gemv",
            ConvAlgorithm::Stem => "stem",
        }
    }
}

/// The conv policy: the algorithm for a conv `spec` whose output at the
/// compiled shape is `[batch, out_channels, out_height, out_width]` (before
/// any fused pool; `pooled` when a max pool is fused, which only the direct
/// conv does in its panel layout), on `machine` (its path, and whether its
/// FMAs are wide: [`crate::machine::Machine::wide_fma`]).
pub(crate) fn conv_algorithm(spec: &ConvSpec, pooled: bool, out_shape: [usize; 4], machine: &Machine) -> ConvAlgorithm {
    let [batch, out_channels, out_height, out_width] = out_shape;
    let pixels = batch.saturating_mul(out_height).saturating_mul(out_width);
    if spec.attrs.groups != 1 {
        return match conv::depthwise::DepthwiseConv::applies(spec) {
            true => ConvAlgorithm::Depthwise,
            false => ConvAlgorithm::Grouped,
        };
    }
    if pooled {
        if conv::stem::StemConv::applies(spec) {
            return ConvAlgorithm::Stem;
        }
        return ConvAlgorithm::DirectPanels;
    }
    // At every size: MobileNetV2's 7×7 1×1 convs at batch 1 took the same
    // time in place as on the lane layout (Zen 4 profile), the larger ones
    // 30-50% less than the direct conv's im2col + products + epilogue copy.
    if conv::pointwise::PointwiseConv::applies(spec) {
        // On 1×1 planes (squeeze-and-excitation) the panel GEMM's 16-column
        // tiles are mostly padding; dot products win where each is long
        // (the squeeze: 1152 -> 48 at batch 1 / 10 on Zen 4, alone, 3 / 10
        // us against 8 / 32) and, on the packed linear kernel, for the
        // shallow excitations ([`GEMV_MAX_SHALLOW_DEPTH`]).
        let plane = out_height.saturating_mul(out_width);
        let dots = plane == 1 && (spec.in_channels >= out_channels || spec.in_channels <= GEMV_MAX_SHALLOW_DEPTH);
        // Lane groups padding the output channels by at most a quarter.
        let lanes = (2..=POINTWISE_LANES_MAX_PLANE).contains(&plane)
            && spec.in_channels >= POINTWISE_LANES_MIN_DEPTH
            && out_channels.next_multiple_of(gemm::LANES) <= out_channels.saturating_mul(5) / 4;
        // Projections on small planes at batch 1 (images fewer than
        // threads), before the lane form: [`SPLIT_MIN_PLANE`].
        let split = batch == 1
            && (SPLIT_MIN_PLANE..=SPLIT_MAX_PLANE).contains(&plane)
            && spec.in_channels >= out_channels.saturating_mul(SPLIT_MIN_DEPTH_RATIO);
        return match (dots, lanes, split) {
            (true, _, _) => ConvAlgorithm::Gemv,
            (false, _, true) => ConvAlgorithm::PointwiseSplit,
            (false, true, false) => ConvAlgorithm::PointwiseLanes,
            (false, false, false) => ConvAlgorithm::Pointwise,
        };
    }
    let winograd = winograd::applies(spec);
    let channels = spec.in_channels.min(out_channels);
    let f4_tiles = batch
        .saturating_mul(out_height.div_ceil(4))
        .saturating_mul(out_width.div_ceil(4));
    if winograd && channels >= F4_MIN_CHANNELS && f4_tiles >= F4_MIN_TILES {
        ConvAlgorithm::WinogradF4
    } else if winograd && channels >= F2_MIN_CHANNELS && pixels <= F2_MAX_PIXELS && !machine.wide_fma {
        ConvAlgorithm::WinogradF2
    } else {
        direct(spec, pixels, machine.isa)
    }
}

/// What runs a conv [`conv_algorithm`] gives F(4×4) when F(4×4) is not
/// taken ([`budget`]): F(2×2) where it has the channels, at any size (16
/// multiplies per 4 outputs against the direct conv's 36) but with wide
/// FMAs only past [`F2_MAX_PIXELS`] (below, the direct conv is faster and
/// packs less), a direct conv otherwise.
pub(crate) fn conv_algorithm_without_f4(spec: &ConvSpec, out_shape: [usize; 4], machine: &Machine) -> ConvAlgorithm {
    let [batch, out_channels, out_height, out_width] = out_shape;
    let pixels = batch.saturating_mul(out_height).saturating_mul(out_width);
    let f2 = winograd::applies(spec)
        && spec.in_channels.min(out_channels) >= F2_MIN_CHANNELS
        && !(machine.wide_fma && pixels <= F2_MAX_PIXELS);
    match f2 {
        true => ConvAlgorithm::WinogradF2,
        false => direct(spec, pixels, machine.isa),
    }
}

/// The direct conv's layout for `spec` with `pixels` output pixels per
/// forward on `isa`'s path.
fn direct(spec: &ConvSpec, pixels: usize, isa: gemm::Isa) -> ConvAlgorithm {
    let taps = spec.kernel[0].saturating_mul(spec.kernel[1]);
    let deep_window = taps > 1 && spec.in_channels.saturating_mul(taps) >= LANE_MIN_DEPTH;
    match pixels <= LANE_MAX_PIXELS || (isa != gemm::Isa::Scalar && deep_window) {
        true => ConvAlgorithm::DirectLanes,
        false => ConvAlgorithm::DirectPanels,
    }
}

/// Packed weights shared by the compiles of one graph at several batch
/// sizes ([`crate::BatchedModel`]): convs keyed by node name and
/// algorithm, so a conv whose algorithm does not change with the batch is
/// packed once (ResNet18's packed Winograd weights are ~4× its 3×3
/// weights: ~150 MB per compiled size when not shared), and linear layers
/// by node name (their panels do not depend on the batch). Only sound for
/// compiles of one template graph on one engine (the same weights,
/// attributes and path).
#[derive(Debug, Default)]
pub(crate) struct PackedCache {
    convs: Shared<(String, ConvAlgorithm), CpuConv>,
    linears: Shared<String, linear::CpuLinear>,
}

/// Values packed once per key and shared.
type Shared<K, V> = std::sync::Mutex<std::collections::HashMap<K, Arc<V>>>;

/// The value under `key` in `map`, packing it with `pack` on first use.
fn get_or_pack<K: Eq + std::hash::Hash, V>(
    map: &Shared<K, V>,
    key: K,
    pack: impl FnOnce() -> candle_core::Result<V>,
) -> candle_core::Result<Arc<V>> {
    if let Some(value) = map.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(value);
    }
    let value = Arc::new(pack()?);
    if let Ok(mut map) = map.lock() {
        map.entry(key).or_insert_with(|| Arc::clone(&value));
    }
    Ok(value)
}

impl PackedCache {
    /// The conv packed for `node` and `algorithm`: from `cache` when given
    /// (packing it with `pack` on first use), else packed with `pack`.
    pub(crate) fn conv(
        cache: Option<&Self>,
        node: &str,
        algorithm: ConvAlgorithm,
        pack: impl FnOnce() -> candle_core::Result<CpuConv>,
    ) -> candle_core::Result<Arc<CpuConv>> {
        match cache {
            Some(cache) => get_or_pack(&cache.convs, (node.to_string(), algorithm), pack),
            None => pack().map(Arc::new),
        }
    }

    /// The linear layer packed for `node`, as [`PackedCache::conv`].
    pub(crate) fn linear(
        cache: Option<&Self>,
        node: &str,
        pack: impl FnOnce() -> candle_core::Result<linear::CpuLinear>,
    ) -> candle_core::Result<Arc<linear::CpuLinear>> {
        match cache {
            Some(cache) => get_or_pack(&cache.linears, node.to_string(), pack),
            None => pack().map(Arc::new),
        }
    }
}

/// A step run by one of wick's CPU kernels, with its operands by role.
/// Every one returns fresh storage, never a view of an operand: the
/// executor recycles values only these kernels make and read (`recycle`).
#[derive(Debug)]
pub(crate) enum CpuKernel {
    /// A conv (with its epilogue and fused pool) whose weights were packed
    /// at compile time: it reads only `x` and the `residual`, if any.
    Conv {
        conv: Arc<CpuConv>,
        x: Slot,
        residual: Option<Slot>,
        /// `[N, C, 1, 1]` factors of `x`'s channels, on `isa`'s path.
        scale: Option<Slot>,
        isa: gemm::Isa,
    },
    /// A depthwise conv on the output of a 1×1 conv or a stem (`expand`,
    /// weights blocked by the depthwise conv's lanes) applied to `x`, without
    /// making that output ([`crate::expansion`]).
    ExpandedDepthwise {
        expand: conv::depthwise::ExpandWeights,
        conv: Arc<CpuConv>,
        x: Slot,
    },
    /// A depthwise conv (or [`Self::ExpandedDepthwise`], with `expand`)
    /// with the in-place 1×1 conv `projection` (and its `residual`) run on
    /// its output, without making that output ([`crate::expansion`]).
    ProjectedDepthwise {
        expand: Option<conv::depthwise::ExpandWeights>,
        conv: Arc<CpuConv>,
        x: Slot,
        projection: Arc<CpuConv>,
        residual: Option<Slot>,
    },
    /// The max pool, on its path.
    MaxPool2d { pool: pool::MaxPool, x: Slot },
    /// An elementwise activation, on the instruction-set path `isa`.
    Activation {
        isa: gemm::Isa,
        activation: Activation,
        x: Slot,
    },
    /// The global average pool, on `isa`.
    GlobalAvgPool2d { isa: gemm::Isa, x: Slot },
    /// `a · s` with `s` one value per plane of `a` (`[N, C, 1, 1]`), on `isa`.
    ChannelScale { isa: gemm::Isa, a: Slot, s: Slot },
    /// `x · scale[c] + shift[c]` (a batch norm folded at compile time), on `isa`.
    ChannelAffine {
        isa: gemm::Isa,
        scale: Vec<f32>,
        shift: Vec<f32>,
        x: Slot,
    },
    /// A linear layer whose weights and bias were kept at compile time.
    Linear { linear: Arc<linear::CpuLinear>, x: Slot },
}

impl CpuKernel {
    /// The slots the kernel reads at run time.
    pub(crate) fn reads(&self) -> Vec<Slot> {
        match self {
            CpuKernel::Conv { x, residual, scale, .. } => std::iter::once(*x).chain(*residual).chain(*scale).collect(),
            CpuKernel::ProjectedDepthwise { x, residual, .. } => std::iter::once(*x).chain(*residual).collect(),
            CpuKernel::ExpandedDepthwise { x, .. }
            | CpuKernel::MaxPool2d { x, .. }
            | CpuKernel::Activation { x, .. }
            | CpuKernel::GlobalAvgPool2d { x, .. }
            | CpuKernel::ChannelAffine { x, .. }
            | CpuKernel::Linear { x, .. } => vec![*x],
            CpuKernel::ChannelScale { a, s, .. } => vec![*a, *s],
        }
    }

    /// Runs on the values in `slots`.
    pub(crate) fn run(&self, value: impl Fn(Slot) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        match self {
            CpuKernel::Conv {
                conv,
                x,
                residual,
                scale,
                isa,
            } => conv.run_scaled(
                *isa,
                &value(*x)?,
                residual.map(&value).transpose()?.as_ref(),
                scale.map(&value).transpose()?.as_ref(),
            ),
            CpuKernel::ExpandedDepthwise { expand, conv, x } => conv.run_expanded(expand, &value(*x)?),
            CpuKernel::ProjectedDepthwise {
                expand,
                conv,
                x,
                projection,
                residual,
            } => conv.run_projected(
                expand.as_ref(),
                &value(*x)?,
                projection,
                residual.map(&value).transpose()?.as_ref(),
            ),
            CpuKernel::MaxPool2d { pool, x } => pool.run(&value(*x)?),
            CpuKernel::Activation { isa, activation, x } => activation::activation(*isa, *activation, &value(*x)?),
            CpuKernel::GlobalAvgPool2d { isa, x } => plane::global_avg_pool2d(*isa, &value(*x)?),
            CpuKernel::ChannelScale { isa, a, s } => plane::channel_scale(*isa, &value(*a)?, &value(*s)?),
            CpuKernel::ChannelAffine { isa, scale, shift, x } => plane::channel_affine(*isa, &value(*x)?, scale, shift),
            CpuKernel::Linear { linear, x } => linear.run(&value(*x)?),
        }
    }
}

#[cfg(test)]
mod tests;
