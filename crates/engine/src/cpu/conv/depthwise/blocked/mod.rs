//! The depthwise conv on planes up to 112 wide (every depthwise conv of
//! the MobileNets and EfficientNets at 224×224) with the channels in the
//! vector lanes: per image, a block of 16 channels (8 on AVX2) is copied, a band
//! of rows at a time (a quarter of the L2), into a zero-padded scratch
//! `[rows][W'][16]`, every output position is then one vector of sums over
//! the `kh·kw` taps (a vector of 16 channels' weights per tap, no lane
//! wasted whatever the plane's width), the epilogue is applied in
//! registers, and the band is copied back into its 16 NCHW planes.
//!
//! The plane-wise segments ([`super::simd`]) fill a vector with one row's
//! columns: on a 7×7 output a row is half an AVX-512 vector and each of
//! its 25 taps (5×5) a load, a multiply-add and a lane mask for 7 sums.
//! MobileNetV3-Large's 5×5 convs on 960 channels of 7×7 took 0.81 ms at
//! batch 10 on Zen 4 that way against ONNX Runtime's 0.25 (its NCHWc
//! layout keeps channels in the lanes throughout). The SIMD bodies (the
//! sums and the register transposes) are in [`simd`].

use super::super::ConvShape;
use crate::cpu::data::{with_scratch, CACHE_LINE_FLOATS};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use crate::cpu::output::Output;
use crate::cpu::parallel::{try_for_each, try_shares};
use crate::machine::Machine;
use band_copy::{pack, pad, unpack};
use bands::{by_bands, cut_tasks, Rows, Work};
use candle_core::bail;
pub(crate) use expand::{ExpandWeights, Window, MAX_WINDOW_DEPTH};
use wick_ir::{Activation, Conv2dAttrs};

/// Output planes of at most this many columns take the blocked path; the
/// segments fill their vectors on wider rows. Zen 4, AVX-512, alone, ms
/// blocked / segments (medians of 40): MobileNetV3's 960 channels 7×7 5×5
/// at batch 10 0.32-0.37 / 0.76-0.77, 672 channels 14×14 3×3 0.56-0.68 /
/// 0.77-0.78, 120 channels 28×28 5×5 0.48-0.52 / 0.64-0.68; in bands of a
/// quarter of the L2, 144 channels 56×56 3×3 2.2-2.5 / 2.6-3.3, 96
/// channels 112×112 stride 2 3.8-4.0 / 5.9-6.0 (batch 1: 0.19-0.21 /
/// 0.26-0.28); but 32 channels on 112×112 outputs 0.23-0.24 / 0.15-0.19
/// at batch 1 (16 channels at batch 10 level), so outputs up to 56
/// columns took it then. Since the tasks go band by band where bands end
/// on cache lines (every band of a 112-wide plane does: [`by_bands`]), the
/// 112×112 stage gains too: Intel Xeon VM, 2 threads, alternating
/// forwards, MobileNetV2's 32 channels 0.130 -> 0.104 ms at batch 1 (AVX2
/// forced 0.170 -> 0.134), 1.18 -> 0.99 ms at batch 10, EfficientNet-B0's
/// 0.174 -> 0.155, MobileNetV3-Large's 16 channels 0.074 -> 0.051;
/// forwards level to 0.985×.
pub(super) const MAX_OUT_WIDTH: usize = 112;

/// Channels per block on `isa`'s path: its vector width (`None` on the
/// portable path, which has no blocked form).
fn path_lanes(isa: Isa) -> Option<usize> {
    match isa {
        Isa::Avx512 => Some(16),
        Isa::Avx2Fma => Some(8),
        _ => None,
    }
}

/// The channels per block of the blocked form on `isa` for an output
/// `out_width` wide, if such an output takes it.
pub(crate) fn lanes_for(isa: Isa, out_width: usize) -> Option<usize> {
    path_lanes(isa).filter(|_| out_width <= MAX_OUT_WIDTH)
}

/// A depthwise conv's weights and biases with the channels innermost.
#[derive(Debug)]
pub(super) struct BlockedWeights {
    /// Channels per block: the path's vector width.
    pub(super) lanes: usize,
    /// `[C_pad / lanes][kh·kw][lanes]`, zero past the last channel.
    weight: Vec<f32>,
    /// `[C_pad]`, zero past the last channel.
    bias: Vec<f32>,
    /// Bytes one band's padded input and sums aim at: a quarter of the L2.
    pub(super) band_bytes: usize,
    /// Blocks per task of a fused 1×1 conv when set (tests: both forms
    /// on small shapes); [`expand::BLOCKS`] otherwise.
    pub(super) blocks_per_task: Option<usize>,
}

impl BlockedWeights {
    /// `weight` (`[C, kh·kw]`) and `epilogue`'s biases for the vectors of
    /// `machine`'s path, bands from its L2; `None` on the portable path.
    pub(super) fn new(weight: &[f32], channels: usize, epilogue: &Epilogue, machine: Machine) -> Option<Self> {
        let lanes = path_lanes(machine.isa)?;
        let taps = weight.len().checked_div(channels)?;
        let (blocked, bias) = channels_innermost(weight, [channels, taps], lanes, epilogue)?;
        Some(Self {
            lanes,
            weight: blocked,
            bias,
            band_bytes: machine.block_bytes() / 4,
            blocks_per_task: None,
        })
    }
}

/// `weight` (`[channels][per]`: a depthwise conv's taps, a 1×1 conv's
/// input channels) with the channels innermost in blocks of `lanes`,
/// `[C_pad / lanes][per][lanes]`, and `epilogue`'s biases `[C_pad]`, both
/// zero past the last channel; `None` when a size overflows or `weight`
/// is shorter than `channels · per`.
pub(super) fn channels_innermost(
    weight: &[f32],
    [channels, per]: [usize; 2],
    lanes: usize,
    epilogue: &Epilogue,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let padded = channels.checked_next_multiple_of(lanes)?;
    if lanes == 0 || weight.len() < channels.checked_mul(per)? {
        return None;
    }
    let mut blocked = vec![0.0; padded.checked_mul(per)?];
    for (c, filter) in weight.chunks_exact(per.max(1)).take(channels).enumerate() {
        let block = &mut blocked[c / lanes * per * lanes..][..per * lanes];
        for (k, &w) in filter.iter().enumerate() {
            block[k * lanes + c % lanes] = w;
        }
    }
    let bias = (0..padded)
        .map(|c| if c < channels { epilogue.bias(c) } else { 0.0 })
        .collect();
    Some((blocked, bias))
}

/// Where a call's reads and writes fall in the block scratch; worked out
/// (and bounded) once per call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    lanes: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: [usize; 2],
    /// Input `[H, W]`.
    size: [usize; 2],
    /// Output `[OH, OW]`.
    out: [usize; 2],
    /// Output columns computed per row: `OW` rounded up to the tile.
    out_width: usize,
    /// Columns of a padded input row in the scratch.
    padded_width: usize,
    /// Output rows per band: one band's input and sums within the budget.
    band_rows: usize,
    /// Values of one band's padded input, `[(band_rows - 1)·sh + (kh -
    /// 1)·dh + 1][padded_width][lanes]`.
    input_len: usize,
    /// Values of one band's sums, `[band_rows][out_width][lanes]`.
    output_len: usize,
}

impl Geometry {
    /// Where input column `x` of scratch row `row` starts in a band.
    #[inline(always)]
    fn at(&self, row: usize, x: usize) -> usize {
        (row * self.padded_width + x + self.padding[1]) * self.lanes
    }

    /// Padded input rows a band of `rows` output rows reads.
    fn band_input_rows(&self, rows: usize) -> usize {
        (rows - 1) * self.stride[0] + (self.kernel[0] - 1) * self.dilation[0] + 1
    }

    /// The geometry of `shape` under `attrs` with `tile` output columns per
    /// step and bands of about `band_bytes`, or an error when a size
    /// overflows. Every read of a band's rows falls inside its padded input.
    fn new(
        shape: ConvShape,
        kernel: [usize; 2],
        attrs: Conv2dAttrs,
        [lanes, tile, band_bytes]: [usize; 3],
    ) -> candle_core::Result<Self> {
        let out_width = shape.out_width.next_multiple_of(tile);
        let reach = |n: usize, s: usize, k: usize, d: usize| {
            n.checked_sub(1)?
                .checked_mul(s)?
                .checked_add(k.checked_sub(1)?.checked_mul(d)?)
        };
        let sizes = (|| {
            let padded_height = shape.height.checked_add(2 * attrs.padding[0])?;
            let padded_width = shape
                .width
                .checked_add(2 * attrs.padding[1])?
                .max(reach(out_width, attrs.stride[1], kernel[1], attrs.dilation[1])? + 1);
            // The last row any tap reads is inside the padded height (the
            // output size formula), the last column inside the padded width.
            let last_row = reach(shape.out_height, attrs.stride[0], kernel[0], attrs.dilation[0])?;
            if last_row >= padded_height {
                return None;
            }
            // Rows per band: `b` output rows read `(b - 1)·sh + span` input rows.
            let (row_in, row_out) = (padded_width.checked_mul(lanes * 4)?, out_width.checked_mul(lanes * 4)?);
            let span = reach(1, attrs.stride[0], kernel[0], attrs.dilation[0])? + 1;
            let per_row = attrs.stride[0].checked_mul(row_in)?.checked_add(row_out)?;
            let fixed = span.saturating_sub(attrs.stride[0]).saturating_mul(row_in);
            let band_rows = (band_bytes.saturating_sub(fixed) / per_row.max(1)).clamp(1, shape.out_height.max(1));
            let band_input = reach(band_rows, attrs.stride[0], kernel[0], attrs.dilation[0])? + 1;
            let input_len = band_input.checked_mul(padded_width)?.checked_mul(lanes)?;
            let output_len = band_rows.checked_mul(out_width)?.checked_mul(lanes)?;
            Some((padded_width, band_rows, input_len, output_len))
        })();
        let Some((padded_width, band_rows, input_len, output_len)) = sizes else {
            bail!("depthwise conv: the channel-blocked planes of {shape:?} overflow")
        };
        Ok(Self {
            lanes,
            kernel,
            stride: attrs.stride,
            dilation: attrs.dilation,
            padding: attrs.padding,
            size: [shape.height, shape.width],
            out: [shape.out_height, shape.out_width],
            out_width,
            padded_width,
            band_rows,
            input_len,
            output_len,
        })
    }
}

/// One band's kernel operands, for the SIMD bodies.
struct Kernel<'a> {
    g: Geometry,
    /// Output rows of the band (at most `g.band_rows`).
    rows: usize,
    /// The band's padded input, `[band input rows][padded_width][lanes]`.
    input: &'a [f32],
    /// `[kh·kw][lanes]`.
    weight: &'a [f32],
    /// `[lanes]`.
    bias: &'a [f32],
    /// Bias and activation in registers (else the raw sums).
    fused: bool,
    activation: Option<Activation>,
    /// `[rows][out_width][lanes]`.
    output: &'a mut [f32],
}

/// What a band's padded input is made from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The depthwise conv's input planes `[N, C, H, W]`, copied in.
    Planes(&'a [f32]),
    /// The input `[N, C_in, H_in, W_in]` of a conv (a 1×1 conv, or a
    /// [`expand::Window`]'s) whose output is the depthwise conv's input,
    /// computed into each band ([`expand`]).
    Expanded(&'a [f32], &'a ExpandWeights),
}

impl Source<'_> {
    /// Scratch values a band of `g`'s geometry with `band_rows` output
    /// rows takes for a fused conv's window copy (none for planes or a
    /// 1×1 conv), if that does not overflow.
    fn window_len(&self, g: &Geometry, band_rows: usize) -> Option<usize> {
        match self {
            Source::Planes(_) => Some(0),
            Source::Expanded(_, e) => e.window_len(g.band_input_rows(band_rows)),
        }
    }
}

/// Runs the blocked depthwise conv of `shape` on `source` into the first
/// `N·C·OH·OW` values of `out`'s allocation (`[N, C, OH, OW]`, every value
/// written; the caller sets the length); `residual`, if any, has the
/// output's shape. Tasks are (image, channel block, band of rows): at
/// batch 1 a few blocks alone left threads idle (MobileNetV3's 72 channels
/// are 5 blocks for 2 threads), so bands are cut small enough for four
/// tasks per thread, and as many for each thread ([`band_rows`](bands::band_rows)).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    blocked: &BlockedWeights,
    epilogue: &Epilogue,
    isa: Isa,
    shape: ConvShape,
    kernel: [usize; 2],
    attrs: Conv2dAttrs,
    source: Source<'_>,
    residual: Option<&[f32]>,
    out: &mut Output,
) -> candle_core::Result<()> {
    let lanes = blocked.lanes;
    let tile = tile(shape.out_width);
    let g = Geometry::new(shape, kernel, attrs, [lanes, tile, blocked.band_bytes])?;
    let channels = shape.channels;
    let (in_plane, out_plane) = (shape.height * shape.width, shape.out_height * shape.out_width);
    let out_len = shape.batch * channels * out_plane;
    let taps = kernel[0] * kernel[1];
    let activation = epilogue.activation();
    // With a residual the plane pass applies the whole epilogue.
    let fused = residual.is_none();
    // Values per image of the input the bands are made from.
    let image_len = match source {
        Source::Planes(_) => channels.checked_mul(in_plane),
        Source::Expanded(_, e) => {
            if e.lanes != lanes || e.out_channels != channels {
                bail!(
                    "depthwise conv: a fused conv of {} channels in blocks of {}, not {channels} in {lanes}",
                    e.out_channels,
                    e.lanes
                )
            }
            e.image_len([shape.height, shape.width])
        }
    };
    let input = match source {
        Source::Planes(input) | Source::Expanded(input, _) => input,
    };
    let input_len = image_len.and_then(|n| n.checked_mul(shape.batch));
    let (Some(image_len), true) = (image_len, input_len == Some(input.len())) else {
        bail!("depthwise conv: an input of {} values for {shape:?}", input.len())
    };
    if residual.is_some_and(|r| r.len() != out_len) {
        bail!("depthwise conv: a residual of another size than {shape:?}'s output")
    }
    if out_len == 0 {
        return Ok(());
    }
    // Blocks per task: a fused 1×1 conv computes two blocks' inputs at
    // once (each input value broadcast once for both). (Tried: one block
    // per task wherever two left fewer than four tasks per thread, so that
    // bands are cut less and recompute fewer of the 1×1 conv's rows;
    // MobileNetV2 and EfficientNet-B0 at batch 1, per node, within the
    // host's noise, ±5%: not kept. One block a task where two cannot be
    // shared evenly: [`cut_tasks`].)
    let preferred = match source {
        Source::Planes(_) => 1,
        Source::Expanded(..) => blocked
            .blocks_per_task
            .unwrap_or(expand::BLOCKS)
            .clamp(1, expand::BLOCKS),
    };
    // Smaller bands than the cache allows where tasks are few (the
    // lengths of `g` stay upper bounds), and one block a task where two
    // cannot be shared evenly among the threads and one can
    // ([`cut_tasks`]; unless a test fixed the blocks per task).
    let blocks = channels.div_ceil(lanes);
    let rows = Rows {
        height: shape.out_height,
        most: g.band_rows,
        stride: g.stride[0],
        // One output row's input rows past the stride's share.
        halo: g.band_input_rows(1).saturating_sub(g.stride[0]),
    };
    let work = Work {
        batch: shape.batch,
        blocks,
        whole: channels.is_multiple_of(lanes),
    };
    let choices: &[usize] = match blocked.blocks_per_task {
        None if preferred > 1 => &[preferred, 1],
        _ => &[preferred],
    };
    let (per_task, band_rows) = cut_tasks(rows, work, choices, rayon::current_num_threads());
    // Each block's padded input from a cache line; then the sums and a
    // fused window's copied input rows.
    let stride = g.input_len.checked_next_multiple_of(CACHE_LINE_FLOATS);
    let windows = source.window_len(&g, band_rows);
    let scratch_len = stride.and_then(|n| {
        n.checked_mul(per_task)?
            .checked_add(g.output_len)?
            .checked_add(windows?)
    });
    let (Some(stride), Some(scratch_len)) = (stride, scratch_len) else {
        bail!("depthwise conv: the channel-blocked planes of {shape:?} overflow")
    };
    let groups = blocks.div_ceil(per_task);
    let g = Geometry { band_rows, ..g };
    let bands = shape.out_height.div_ceil(band_rows);
    let dst = out.shared(out_len);
    let spatial = by_bands(bands, band_rows, shape.out_width, out_plane);
    let body = |task: usize| {
        let (image, group, band) = match spatial {
            true => (task / (groups * bands), task % groups, task / groups % bands),
            false => (task / (groups * bands), task / bands % groups, task % bands),
        };
        let first_block = group * per_task;
        let count = per_task.min(blocks - first_block);
        let first_row = band * band_rows;
        let rows = band_rows.min(shape.out_height - first_row);
        with_scratch(scratch_len, |scratch| {
            let (padded, rest) = scratch.split_at_mut(stride * per_task);
            let (sums, windows) = rest.split_at_mut(g.output_len);
            let mut span = 0..0;
            let mut r0 = 0;
            for one in padded.chunks_exact_mut(stride.max(1)).take(count) {
                (span, r0) = pad(&g, one, first_row, rows);
            }
            match source {
                Source::Planes(_) => {
                    let first = first_block * lanes;
                    let planes =
                        &input[(image * channels + first) * in_plane..][..lanes.min(channels - first) * in_plane];
                    pack(isa, &g, planes, lanes.min(channels - first), padded, span, r0)
                }
                Source::Expanded(_, e) => {
                    let x = &input[image * image_len..][..image_len];
                    let blocks = first_block..first_block + count;
                    expand::fill(isa, &g, e, blocks, x, (padded, stride), (span, r0), windows)
                }
            }
            for (j, padded) in padded.chunks_exact(stride.max(1)).take(count).enumerate() {
                let block = first_block + j;
                let first = block * lanes;
                let k = Kernel {
                    g,
                    rows,
                    input: padded,
                    weight: &blocked.weight[block * taps * lanes..][..taps * lanes],
                    bias: &blocked.bias[first..][..lanes],
                    fused,
                    activation,
                    output: &mut sums[..g.output_len],
                };
                compute(isa, tile, k);
                let planes = lanes.min(channels - first);
                let span = first_row * shape.out_width..(first_row + rows) * shape.out_width;
                let base = (image * channels + first) * out_plane;
                // SAFETY: tasks write disjoint rows (bands) of disjoint
                // planes (image, channel); nothing else touches `out` meanwhile.
                let mut outs: [&mut [f32]; 16] = std::array::from_fn(|c| match c < planes {
                    true => unsafe { dst.slice(base + c * out_plane + span.start, span.len()) },
                    false => &mut [],
                });
                let outs = &mut outs[..planes];
                unpack(isa, &g, sums, outs, rows);
                if let Some(r) = residual {
                    for (c, out) in outs.iter_mut().enumerate() {
                        let at = base + c * out_plane + span.start;
                        epilogue.in_place(first + c, out, Some(&r[at..][..span.len()]));
                    }
                }
            }
        })
    };
    let tasks = shape.batch * groups * bands;
    match spatial {
        true => try_shares(tasks, body),
        false => try_for_each(0..tasks, body),
    }
}

/// Output columns per step (sums in registers) for rows `out_width` wide:
/// 7 wastes none on the 7-, 14- and 28-wide rows of the models, 8 fills
/// AVX2's registers.
fn tile(out_width: usize) -> usize {
    match out_width.is_multiple_of(7) {
        true => 7,
        false => 8,
    }
}

/// The block's sums on `isa` with `tile` output columns per step.
fn compute(isa: Isa, tile: usize, k: Kernel) {
    // The checks the SIMD bodies rely on.
    let g = k.g;
    assert!(
        k.rows <= g.band_rows
            && k.input.len() >= g.input_len
            && k.output.len() >= g.output_len
            && k.weight.len() >= g.kernel[0] * g.kernel[1] * g.lanes
            && k.bias.len() >= g.lanes
            && g.out_width.is_multiple_of(tile)
    );
    // Stride 1 and 2 as constants (the models' strides), any other as is.
    macro_rules! on_stride {
        ($body:ident, $tile:literal) => {
            match g.stride[1] {
                1 => simd::$body::<$tile, 1>(k),
                2 => simd::$body::<$tile, 2>(k),
                _ => simd::$body::<$tile, 0>(k),
            }
        };
    }
    match (isa, tile) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: 16 lanes are only chosen on `Isa::Avx512` (handed out
        // when the CPU has AVX-512F); the operands' lengths were checked
        // above and `Geometry::new` bounds every read inside the input.
        (Isa::Avx512, 7) => unsafe { on_stride!(blocked_avx512, 7) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx512, _) => unsafe { on_stride!(blocked_avx512, 8) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, 8 lanes on `Isa::Avx2Fma` (AVX2 and FMA).
        (Isa::Avx2Fma, 7) => unsafe { on_stride!(blocked_avx2, 7) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx2Fma, _) => unsafe { on_stride!(blocked_avx2, 8) },
        _ => unreachable!("blocked weights exist only on the SIMD paths"),
    }
}

mod band_copy;
mod bands;
mod expand;
pub(super) mod project;
#[cfg(target_arch = "x86_64")]
mod simd;
mod window;
