//! A conv fused in front of the blocked depthwise conv, computed band by
//! band straight into the depthwise conv's scratch, so its output is never
//! written out by one kernel and copied in, transposed, by the next: a 1×1
//! conv (MobileNets' and EfficientNets' expansion), or a conv of a small
//! window on few channels (their stem, 3×3 stride 2 on the image's three
//! channels), whose input rows for the band are first copied into scratch
//! with their padding ([`Window`]), each position's values then read there
//! through a table of tap offsets. Each position's vector is `bias + Σ_k
//! w[k] · x[k]`, then the activation.
//!
//! The depthwise conv's band scratch is `[rows][W'][lanes]`: a position's
//! vector holds `lanes` channels, which is what a 1×1 conv with the output
//! channels in the lanes produces. A task computes two blocks' bands;
//! per step, `T` consecutive positions of the band's input rows (a step
//! runs across row ends): `2·T` accumulators, and for each input channel
//! two loads of weights and `T` broadcasts of the input, each serving both
//! blocks ([`STEP_AVX512_PAIR`], [`STEP_AVX2_PAIR`]). Two blocks against
//! one, alone, interleaved per call on the Intel Xeon VM (AVX-512, 2
//! threads): MobileNetV2's shapes at batch 1 0.94-0.99× except 32 → 192
//! on 28×28 (1.14×: half the tasks), 160 → 960 on 7×7 0.93-0.98×.

pub(crate) use super::window::{Window, MAX_WINDOW_DEPTH};
use super::{channels_innermost, Geometry};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use candle_core::bail;
use std::ops::Range;
use wick_ir::Activation;

/// A fused conv's weights and biases with its output channels in blocks
/// of the depthwise conv's lanes.
#[derive(Debug)]
pub(crate) struct ExpandWeights {
    /// Channels per block: the path's vector width.
    pub(super) lanes: usize,
    /// Values summed per output position: a 1×1 conv's input channels,
    /// a window's `C·kh·kw`.
    pub(super) depth: usize,
    /// Its output channels: the depthwise conv's channels.
    pub(super) out_channels: usize,
    /// `[C_pad / lanes][depth][lanes]`, zero past the last channel.
    weight: Vec<f32>,
    /// `[C_pad]`, zero past the last channel.
    bias: Vec<f32>,
    activation: Option<Activation>,
    /// The window read per position; `None` for a 1×1 conv (stride 1,
    /// no padding), which reads its input planes in place.
    window: Option<Window>,
}

impl ExpandWeights {
    /// Channels per block.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes
    }

    /// The fused conv's input channels.
    pub(crate) fn in_channels(&self) -> usize {
        self.window.map_or(self.depth, |w| w.channels)
    }

    /// The depthwise conv's input `[H, W]` from the fused conv's input
    /// `size`: the same for a 1×1 conv; an error where a window's input is
    /// not the size it was built for.
    pub(crate) fn output_size(&self, size: [usize; 2]) -> candle_core::Result<[usize; 2]> {
        match self.window {
            None => Ok(size),
            Some(w) if w.size == size => w.output().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "fused conv: the output of a {:?} window on {size:?} overflows",
                    w.kernel
                ))
            }),
            Some(w) => bail!("fused conv: an input of {size:?}, built for {:?}", w.size),
        }
    }

    /// Values of one image of the fused conv's input whose output is
    /// `size` (`[H, W]`), if that does not overflow.
    pub(super) fn image_len(&self, [height, width]: [usize; 2]) -> Option<usize> {
        match self.window {
            None => self.depth.checked_mul(height)?.checked_mul(width),
            Some(w) => w.channels.checked_mul(w.size[0])?.checked_mul(w.size[1]),
        }
    }

    /// Scratch values the copy of a window's input for `rows` output rows
    /// takes (none for a 1×1 conv), if that does not overflow.
    pub(super) fn window_len(&self, rows: usize) -> Option<usize> {
        self.window.map_or(Some(0), |w| w.copy_len(rows))
    }

    /// `weight` (`[out_channels, depth]`: a 1×1 conv's, or with `window`
    /// a conv's `[O, C, kh, kw]` flattened) and `epilogue`'s biases and
    /// activation, blocked `lanes` channels at a time; an error when the
    /// lengths disagree, a window's depth is not `C·kh·kw` or past
    /// [`MAX_WINDOW_DEPTH`], or its output overflows.
    pub(crate) fn new(
        weight: &[f32],
        [out_channels, depth]: [usize; 2],
        epilogue: &Epilogue,
        lanes: usize,
        window: Option<Window>,
    ) -> candle_core::Result<Self> {
        if out_channels.checked_mul(depth) != Some(weight.len()) {
            bail!(
                "fused conv: {} weights for {out_channels} × {depth} values per position",
                weight.len()
            )
        }
        if let Some(w) = window {
            let taps = w.kernel[0].checked_mul(w.kernel[1]);
            if taps.and_then(|t| t.checked_mul(w.channels)) != Some(depth) || depth > MAX_WINDOW_DEPTH {
                bail!(
                    "fused conv: a {:?} window on {} channels for {depth} values per position (at most {MAX_WINDOW_DEPTH})",
                    w.kernel,
                    w.channels
                )
            }
            if w.output().is_none() || w.attrs.stride.contains(&0) || w.attrs.dilation.contains(&0) {
                bail!(
                    "fused conv: a {:?} window on {:?} under {:?}",
                    w.kernel,
                    w.size,
                    w.attrs
                )
            }
        }
        let Some((blocked, bias)) = channels_innermost(weight, [out_channels, depth], lanes, epilogue) else {
            bail!("fused conv: {out_channels} × {depth} weights in blocks of {lanes} overflow")
        };
        Ok(Self {
            lanes,
            depth,
            out_channels,
            weight: blocked,
            bias,
            activation: epilogue.activation(),
            window,
        })
    }
}

/// Blocks a task of the fused conv takes: their inputs computed together,
/// each input value broadcast once for both.
pub(super) const BLOCKS: usize = 2;

/// Computes input rows `rows` of the expanded planes, the channels of
/// blocks `blocks` (at most [`BLOCKS`]), into their bands' scratch rows
/// from `r0` on: block `blocks.start + j`'s band `j · stride` values into
/// `padded` (as [`super::pack`] fills one; the padding is its caller's).
/// `x` holds one image's input (a 1×1 conv's `depth` planes `[H, W]`, a
/// window's `C` planes of its size); `windows` at least
/// [`ExpandWeights::window_len`] values of scratch for `rows`.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill(
    isa: Isa,
    g: &Geometry,
    e: &ExpandWeights,
    blocks: Range<usize>,
    x: &[f32],
    (padded, stride): (&mut [f32], usize),
    (rows, r0): (Range<usize>, usize),
    windows: &mut [f32],
) {
    let [height, width] = g.size;
    assert!((rows.is_empty() || rows.end <= height) && x.len() >= e.image_len(g.size).unwrap_or(usize::MAX));
    // A window's tap offsets (here, so that `Reads` holds a slice).
    let taps;
    let reads = match e.window {
        None => Reads::Planes {
            x,
            plane: height * width,
            span: rows.start * width..rows.end * width,
        },
        Some(w) => {
            // Within `windows`: its caller sized it for a band's rows.
            let copy = &mut windows[..w.copy_len(rows.len()).unwrap_or(usize::MAX)];
            let plane = w.copy(x, rows.clone(), copy);
            taps = w.taps(plane);
            Reads::Window {
                copy,
                taps: &taps[..e.depth.min(MAX_WINDOW_DEPTH)],
                row: w.attrs.stride[0] * w.pitch(),
                sx: w.attrs.stride[1],
                rows: rows.len(),
            }
        }
    };
    sums(isa, g, e, blocks, reads, (padded, stride), r0);
}

/// Where [`fill`]'s positions read their values.
enum Reads<'a> {
    /// A 1×1 conv's input planes: positions `span` of each of `depth`
    /// planes of `plane` values (steps run on across row ends).
    Planes {
        x: &'a [f32],
        plane: usize,
        span: Range<usize>,
    },
    /// A window's copy ([`Window::copy`]): the position at band row `i`,
    /// column `c` starts at `i · row + c · sx`, its value `k` `taps[k]`
    /// on (steps stop at row ends).
    Window {
        copy: &'a [f32],
        taps: &'a [usize],
        row: usize,
        sx: usize,
        rows: usize,
    },
}

/// [`fill`]'s sums of `reads` into the blocks' bands, the band's rows from `r0` on.
fn sums(
    isa: Isa,
    g: &Geometry,
    e: &ExpandWeights,
    blocks: Range<usize>,
    reads: Reads<'_>,
    (padded, stride): (&mut [f32], usize),
    r0: usize,
) {
    let width = g.size[1];
    let (lanes, cin) = (g.lanes, e.depth);
    let count = blocks.len();
    let weight = &e.weight[blocks.start * cin * lanes..][..count * cin * lanes];
    let bias = &e.bias[blocks.start * lanes..][..count * lanes];
    // The checks the SIMD bodies rely on (each source adds its own: every
    // value read inside it): every position of `rows` rows written inside
    // its block's band.
    let padded_len = padded.len();
    let band_fits = |rows: usize| {
        e.lanes == lanes
            && (1..=BLOCKS).contains(&count)
            && g.input_len <= stride
            && padded_len >= (count - 1) * stride + g.input_len
            && (rows == 0 || g.at(r0 + rows - 1, width) <= g.input_len)
    };
    let main = match (isa, count) {
        (Isa::Avx512, 2) => STEP_AVX512_PAIR,
        (Isa::Avx2Fma, 2) => STEP_AVX2_PAIR,
        _ => STEP,
    };
    let size = |left: usize| match left {
        n if n >= main => main,
        n if n >= main / 2 => main / 2,
        _ => 1,
    };
    let mut run = Run {
        src: &[],
        plane: 0,
        taps: &[],
        sx: 1,
        weight,
        bias,
        lanes,
        activation: e.activation,
        padded,
        stride,
        at: [0; STEP],
    };
    match reads {
        // The band's rows are one run of positions in each input plane
        // (rows follow each other there): steps run across row ends (on
        // 7-wide planes too), each position's vector to its own place.
        Reads::Planes { x, plane, span } => {
            // The last position's last value is inside `x`.
            let fits = span.end <= plane && (cin == 0 || x.len() >= (cin - 1) * plane + span.end);
            assert!(span.is_empty() || (fits && band_fits(span.len().div_ceil(width.max(1)))));
            run.plane = plane;
            // Where the next position's vector goes, and its row and column.
            let (mut row, mut col) = (r0, 0);
            let mut next = g.at(row, col);
            let mut q = span.start;
            while q < span.end {
                let step = size(span.end - q);
                // Empty without input channels (no value is read then).
                run.src = x.get(q..).unwrap_or_default();
                // Written in place and the step's body borrowing the run:
                // the positions built here and copied into it (16-byte
                // loads of 8-byte stores just made, which the CPU cannot
                // forward) stalled each step (`perf`: two thirds of this
                // function's time on that copy).
                for a in &mut run.at[..step] {
                    *a = next;
                    (col, next) = (col + 1, next + lanes);
                    if col == width {
                        (row, col) = (row + 1, 0);
                        next = g.at(row, col);
                    }
                }
                one_step::<false, 1>(isa, count, step, &mut run);
                q += step;
            }
        }
        Reads::Window {
            copy,
            taps,
            row,
            sx,
            rows,
        } => {
            // The last position's last value is inside the copy.
            let last = taps
                .iter()
                .max()
                .map(|&tap| tap + rows.saturating_sub(1) * row + (width.max(1) - 1) * sx);
            let fits = taps.len() == cin && last.is_none_or(|last| rows == 0 || last < copy.len());
            assert!(fits && band_fits(rows));
            (run.taps, run.sx) = (taps, sx);
            for i in 0..rows {
                let mut col = 0;
                while col < width {
                    let step = size(width - col);
                    run.src = &copy[i * row + col * sx..];
                    for (t, a) in run.at[..step].iter_mut().enumerate() {
                        *a = g.at(r0 + i, col + t);
                    }
                    match sx {
                        1 => one_step::<true, 1>(isa, count, step, &mut run),
                        2 => one_step::<true, 2>(isa, count, step, &mut run),
                        _ => portable(&mut run, step),
                    }
                    col += step;
                }
            }
        }
    }
}

/// One step of `step` positions of `count` blocks on `isa`'s body
/// (`WINDOW`: the values through `run.taps`, positions `SX` apart, which
/// is `run.sx`; else `run.plane` apart). The column stride a constant: read
/// at a runtime stride, MobileNetV2's stem fused on AVX-512 took 1.08× the
/// time of its values gathered into contiguous runs first.
fn one_step<const WINDOW: bool, const SX: usize>(isa: Isa, count: usize, step: usize, run: &mut Run) {
    macro_rules! on {
        ($body:ident, $($blocks:literal: [$($step:literal),*]),*) => {
            match (count, step) {
                // SAFETY: the path's features are present (the caller's
                // `isa`); `run.src` holds each of the `step` positions'
                // values ([`sums`] checked the last position's last value),
                // and each position's vector lies in each block's band
                // (its row and column inside the checked rows).
                $($(($blocks, $step) => unsafe { $body::<$step, $blocks, WINDOW, SX>(run) },)*)*
                _ => portable(run, step),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if run.lanes == 16 => on!(avx512, 1: [14, 7, 1], 2: [7, 3, 1]),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if run.lanes == 8 => on!(avx2, 1: [14, 7, 1], 2: [6, 3, 1]),
        _ => portable(run, step),
    }
}

/// Positions per step of one block: 14 sums in registers and the weight
/// vector (AVX2 has 16 registers), a whole number of the models' 7-, 14-,
/// 28-, 56- and 112-wide rows.
const STEP: usize = 14;
/// Positions per step of two blocks on AVX-512: 14 sums and two weight
/// vectors. Two blocks' 14 positions (28 sums, filling 31 of the 32
/// registers) ran the inner loop at about 82% of the FMA peak and the
/// whole kernel at 64% on MobileNetV2's 32 -> 192 expansion (`perf
/// annotate`, one thread, where OpenVINO's expansion runs at 87%). Zen 4,
/// two builds' `xtask chunks` alternating (20-30 rounds, the rounds'
/// median ratio): ten of MobileNetV2's features.6 blocks in a row, one
/// thread, 0.917× the time (4 positions 0.942×, 5 0.918×, 8 0.924×, 10
/// 0.952×); MobileNetV2 0.943× at batch 1 and 0.942× at batch 10 (6
/// positions 0.955×, 8 0.947×), EfficientNet-B0 0.972× and 0.969×,
/// MobileNetV3-Large 0.979× and 0.956×. One block's step left at 14 (7:
/// 0.99-1.03×); AVX2's pair at 6 (3 and 4 positions: 1.10× and 1.03×).
const STEP_AVX512_PAIR: usize = 7;
/// Positions per step of two blocks on AVX2: 12 sums and two weight vectors.
const STEP_AVX2_PAIR: usize = 6;

/// One step's operands: up to [`STEP`] consecutive positions of a row
/// (of the planes, or of a window's copy).
struct Run<'a> {
    /// The first position's first value. Planes: value `k` is `plane · k`
    /// values on, the next position's one on. Window: value `k` is
    /// `taps[k]` values on, the next position's `sx` on.
    src: &'a [f32],
    /// Values per input plane.
    plane: usize,
    taps: &'a [usize],
    sx: usize,
    /// `[blocks][in_channels][lanes]`.
    weight: &'a [f32],
    /// `[blocks][lanes]`.
    bias: &'a [f32],
    /// Channels per block.
    lanes: usize,
    activation: Option<Activation>,
    /// The blocks' bands, `stride` values apart.
    padded: &'a mut [f32],
    stride: usize,
    /// Where each position's vector goes in a block's band.
    at: [usize; STEP],
}

impl Run<'_> {
    /// Where value `k` of position `t` lies in `src`.
    #[inline(always)]
    fn offset<const WINDOW: bool>(&self, k: usize, t: usize) -> usize {
        match WINDOW {
            true => self.taps[k] + t * self.sx,
            false => k * self.plane + t,
        }
    }
}

/// The step one value at a time (the portable path).
fn portable(r: &mut Run, step: usize) {
    let lanes = r.lanes.max(1);
    // `[blocks][in_channels][lanes]` over `[blocks][lanes]` (no input
    // channels: the biases alone).
    let cin = r.weight.len() / r.bias.len().max(1);
    let window = !r.taps.is_empty();
    for (j, bias) in r.bias.chunks_exact(lanes).enumerate() {
        let weight = &r.weight[j * cin * lanes..][..cin * lanes];
        for t in 0..step {
            let at = j * r.stride + r.at[t];
            for c in 0..lanes {
                let sum = weight.chunks_exact(lanes).enumerate().fold(bias[c], |s, (k, w)| {
                    let value = match window {
                        true => r.src[r.offset::<true>(k, t)],
                        false => r.src[r.offset::<false>(k, t)],
                    };
                    s + w[c] * value
                });
                r.padded[at + c] = crate::cpu::epilogue::activate(r.activation, sum);
            }
        }
    }
}

/// Defines `$name::<T, B, WINDOW, SX>`: one step of `T` positions of `B`
/// blocks, sums in registers.
macro_rules! expand_body {
    ($name:ident, $feature:literal, $lanes:expr,
     $load:ident, $store:ident, $set1:ident, $zero:ident, $fmadd:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {
        /// # Safety
        /// The CPU has the path's features; `T <= STEP`, `r.lanes ==
        /// $lanes`, `r.weight` and `r.bias` hold `B` blocks' vectors,
        /// `r.src` each value `k < in_channels` of each position `t < T`
        /// at [`Run::offset`] (`r.sx == SX` for a window, `SX == 1` for
        /// planes), and `r.padded` a vector at each of `j · stride +
        /// r.at[..T]`, `j < B`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name<const T: usize, const B: usize, const WINDOW: bool, const SX: usize>(r: &mut Run) {
            use crate::cpu::epilogue::vector_activation;
            use std::arch::x86_64::*;
            const LANES: usize = $lanes;
            let cin = r.weight.len() / (B * LANES);
            // SAFETY: every read and write within the contract above.
            unsafe {
                let (src, weight, dst) = (r.src.as_ptr(), r.weight.as_ptr(), r.padded.as_mut_ptr());
                let mut acc: [[_; T]; B] = std::array::from_fn(|j| [$load(r.bias.as_ptr().add(j * LANES)); T]);
                for k in 0..cin {
                    let w: [_; B] = std::array::from_fn(|j| $load(weight.add((j * cin + k) * LANES)));
                    let s = src.add(r.offset::<WINDOW>(k, 0));
                    if !WINDOW {
                        // The next step's last value: a line the hardware
                        // prefetchers would not have fetched (a step's 14
                        // values of each of up to hundreds of planes). A
                        // window's copy is a few lines, read again and again.
                        _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2 * T - 1) as *const i8);
                    }
                    for t in 0..T {
                        let v = $set1(*s.add(t * SX));
                        for j in 0..B {
                            acc[j][t] = $fmadd(v, w[j], acc[j][t]);
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (t, &acc) in acc.iter().enumerate() {
                        let v = vector_activation!(r.activation, acc, $set1, $zero, $add, $mul, $max, $min, $sigmoid);
                        $store(dst.add(j * r.stride + r.at[t]), v);
                    }
                }
            }
        }
    };
}

#[rustfmt::skip]
expand_body!(avx512, "avx512f", 16,
    _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_fmadd_ps,
    _mm512_add_ps, _mm512_mul_ps, _mm512_max_ps, _mm512_min_ps,
    crate::cpu::activation::sigmoid_avx512);
#[rustfmt::skip]
expand_body!(avx2, "avx2,fma", 8,
    _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_fmadd_ps,
    _mm256_add_ps, _mm256_mul_ps, _mm256_max_ps, _mm256_min_ps,
    crate::cpu::activation::sigmoid_avx2);
