//! A conv fused in front of the blocked depthwise conv, computed band by
//! band straight into the depthwise conv's scratch, so its output is never
//! written out by one kernel and copied in, transposed, by the next: a 1×1
//! conv (MobileNets' and EfficientNets' expansion), or a conv of a small
//! window on few channels (their stem, 3×3 stride 2 on the image's three
//! channels), whose band of windows ([`Window`]) is first gathered into
//! scratch as the rows of a 1×1 conv's input. Each position's vector is
//! `bias + Σ_k w[k] · x[k]`, then the activation.
//!
//! The depthwise conv's band scratch is `[rows][W'][lanes]`: a position's
//! vector holds `lanes` channels, which is what a 1×1 conv with the output
//! channels in the lanes produces. A task computes two blocks' bands;
//! per step, `T` consecutive positions of the band's input rows (a step
//! runs across row ends): `2·T` accumulators, and for each input channel
//! two loads of weights and `T` broadcasts of the input, each serving both
//! blocks. Two blocks against one, alone, interleaved per call on the
//! Intel Xeon VM (AVX-512, 2 threads): MobileNetV2's shapes at batch 1
//! 0.94-0.99× except 32 → 192 on 28×28 (1.14×: half the tasks), 160 →
//! 960 on 7×7 0.93-0.98×.

use super::{channels_innermost, Geometry};
use crate::cpu::data::gather_strided_on;
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use candle_core::bail;
use std::ops::Range;
use wick_ir::{Activation, Conv2dAttrs};

/// The window a fused conv of more than one tap (or with a stride or
/// padding) reads for each output position: gathered per band, one row of
/// the band's positions per input channel and tap (`[C·kh·kw][positions]`,
/// zeros where the window reaches into the padding), and then summed as a
/// 1×1 conv of `C·kh·kw` input channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// The conv's input channels.
    pub(crate) channels: usize,
    /// Its input `[H, W]`.
    pub(crate) size: [usize; 2],
    /// `[kh, kw]`.
    pub(crate) kernel: [usize; 2],
    /// Its stride, padding and dilation (one group).
    pub(crate) attrs: Conv2dAttrs,
}

impl Window {
    /// The conv's output `[OH, OW]` (the depthwise conv's input), or
    /// `None` where a size overflows or the window is larger than the
    /// padded input.
    fn output(&self) -> Option<[usize; 2]> {
        let side = |axis: usize| {
            let padded = self.size[axis].checked_add(self.attrs.padding[axis].checked_mul(2)?)?;
            let reach = (self.kernel[axis].checked_sub(1)?).checked_mul(self.attrs.dilation[axis])?;
            Some(padded.checked_sub(reach.checked_add(1)?)? / self.attrs.stride[axis].max(1) + 1)
        };
        Some([side(0)?, side(1)?])
    }

    /// Gathers the windows of output rows `rows` (`width` positions each)
    /// from `x` (one image's `channels` planes `[H, W]`) into `out`, one
    /// run of `rows.len() · width` values per channel and tap.
    fn gather(&self, isa: Isa, x: &[f32], rows: Range<usize>, width: usize, out: &mut [f32]) {
        let [height, in_width] = self.size;
        let ([kh, kw], a) = (self.kernel, self.attrs);
        let positions = rows.len() * width;
        let taps = (0..self.channels).flat_map(|c| (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (c, ky, kx))));
        for ((c, ky, kx), run) in taps.zip(out.chunks_exact_mut(positions.max(1))) {
            // Output column `o` reads input column `o·sw + kx·dw − pw`:
            // inside the row for `o` in `lo..hi`.
            let (sw, offset, pw) = (a.stride[1].max(1), kx * a.dilation[1], a.padding[1]);
            let lo = pw.saturating_sub(offset).div_ceil(sw).min(width);
            let hi = (in_width + pw).saturating_sub(offset).div_ceil(sw).clamp(lo, width);
            for (y, line) in rows.clone().zip(run.chunks_exact_mut(width.max(1))) {
                // Input row `y·sh + ky·dh − ph`, if inside the plane.
                let at = (y * a.stride[0] + ky * a.dilation[0]).checked_sub(a.padding[0]);
                match at.filter(|&r| r < height) {
                    Some(r) if lo < hi => {
                        let src = &x[(c * height + r) * in_width..][..in_width];
                        line[..lo].fill(0.0);
                        line[hi..].fill(0.0);
                        gather_strided_on(isa, &src[lo * sw + offset - pw..], sw, &mut line[lo..hi]);
                    }
                    _ => line.fill(0.0),
                }
            }
        }
    }
}

/// Most values a [`Window`] gathers per position (`C·kh·kw`): the stems
/// of the MobileNets and EfficientNets read 27.
pub(crate) const MAX_WINDOW_DEPTH: usize = 64;

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
    /// The window gathered per position; `None` for a 1×1 conv (stride 1,
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

    /// Scratch values the gathered windows of `rows` input rows of `width`
    /// take (none for a 1×1 conv), if that does not overflow.
    pub(super) fn window_len(&self, rows: usize, width: usize) -> Option<usize> {
        match self.window {
            None => Some(0),
            Some(_) => self.depth.checked_mul(rows)?.checked_mul(width),
        }
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
    // The values each position sums: `depth` runs of `plane` values, the
    // band's rows `span` of them.
    let (src, plane, span) = match e.window {
        None => (x, height * width, rows.start * width..rows.end * width),
        Some(w) => {
            let positions = rows.len() * width;
            let windows = &mut windows[..e.depth * positions];
            w.gather(isa, x, rows.clone(), width, windows);
            (&*windows, positions, 0..positions)
        }
    };
    sums(isa, g, e, blocks, (src, plane, span), (padded, stride), r0);
}

/// [`fill`]'s sums: the positions `span` of `src`'s `depth` runs of
/// `plane` values, the band's rows from `r0` on.
fn sums(
    isa: Isa,
    g: &Geometry,
    e: &ExpandWeights,
    blocks: Range<usize>,
    (x, plane, span): (&[f32], usize, Range<usize>),
    (padded, stride): (&mut [f32], usize),
    r0: usize,
) {
    let width = g.size[1];
    let (lanes, cin) = (g.lanes, e.depth);
    let count = blocks.len();
    let weight = &e.weight[blocks.start * cin * lanes..][..count * cin * lanes];
    let bias = &e.bias[blocks.start * lanes..][..count * lanes];
    // The checks the SIMD bodies rely on: every value read is inside `x`
    // (`depth` runs of `plane`, the span inside each), every position
    // written inside its block's band.
    let rows = span.len().div_ceil(width.max(1));
    assert!(
        e.lanes == lanes
            && (1..=BLOCKS).contains(&count)
            && span.end <= plane
            && (cin == 0 || x.len() >= (cin - 1) * plane + span.end)
            && g.input_len <= stride
            && padded.len() >= (count - 1) * stride + g.input_len
            && (span.is_empty() || g.at(r0 + rows - 1, width) <= g.input_len)
    );
    // The band's rows are one run of positions in each input plane (rows
    // follow each other there): steps run across row ends (on 7-wide
    // planes too), each position's vector to its own place.
    let main = match (isa, count) {
        (Isa::Avx2Fma, 2) => STEP_AVX2_PAIR,
        _ => STEP,
    };
    // Where the next position's vector goes, and its row and column.
    let (mut row, mut col) = (r0, 0);
    let mut next = g.at(row, col);
    let mut q = span.start;
    while q < span.end {
        let step = match span.end - q {
            n if n >= main => main,
            n if n >= main / 2 => main / 2,
            _ => 1,
        };
        let mut run = Run {
            // Empty without input channels (no value is read then).
            src: x.get(q..).unwrap_or_default(),
            plane,
            weight,
            bias,
            lanes,
            activation: e.activation,
            padded: &mut *padded,
            stride,
            at: [0; STEP],
        };
        // Written in place and the step's body borrowing the run: the
        // positions built here and copied into it (16-byte loads of 8-byte
        // stores just made, which the CPU cannot forward) stalled each
        // step (`perf`: two thirds of this function's time on that copy).
        for a in &mut run.at[..step] {
            *a = next;
            (col, next) = (col + 1, next + lanes);
            if col == width {
                (row, col) = (row + 1, 0);
                next = g.at(row, col);
            }
        }
        macro_rules! on {
            ($body:ident, $($blocks:literal: [$($step:literal),*]),*) => {
                match (count, step) {
                    // SAFETY: the path's features are present (the caller's
                    // `isa`); `src` holds `step` values of each of the `cin`
                    // planes (positions `q..q + step <= span.end <= plane`),
                    // and each position's vector lies in each block's band
                    // (its row and column inside the checked rows).
                    $($(($blocks, $step) => unsafe { $body::<$step, $blocks>(&mut run) },)*)*
                    _ => portable(&mut run, step),
                }
            };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if lanes == 16 => on!(avx512, 1: [14, 7, 1], 2: [14, 7, 1]),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma if lanes == 8 => on!(avx2, 1: [14, 7, 1], 2: [6, 3, 1]),
            _ => portable(&mut run, step),
        }
        q += step;
    }
}

/// Positions per step of one block: 14 sums in registers and the weight
/// vector (AVX2 has 16 registers), a whole number of the models' 7-, 14-,
/// 28-, 56- and 112-wide rows; two blocks' on AVX-512 too (28 sums and two
/// weight vectors of its 32 registers).
const STEP: usize = 14;
/// Positions per step of two blocks on AVX2: 12 sums and two weight vectors.
const STEP_AVX2_PAIR: usize = 6;

/// One step's operands: up to [`STEP`] consecutive positions of the planes.
struct Run<'a> {
    /// The first position's value in channel 0's plane; channel `k`'s
    /// `plane · k` values on.
    src: &'a [f32],
    /// Values per input plane.
    plane: usize,
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

/// The step one value at a time (the portable path).
fn portable(r: &mut Run, step: usize) {
    let lanes = r.lanes.max(1);
    // `[blocks][in_channels][lanes]` over `[blocks][lanes]` (no input
    // channels: the biases alone).
    let cin = r.weight.len() / r.bias.len().max(1);
    for (j, bias) in r.bias.chunks_exact(lanes).enumerate() {
        let weight = &r.weight[j * cin * lanes..][..cin * lanes];
        for t in 0..step {
            for (c, out) in r.padded[j * r.stride + r.at[t]..][..lanes].iter_mut().enumerate() {
                let sum = weight
                    .chunks_exact(lanes)
                    .enumerate()
                    .fold(bias[c], |s, (k, w)| s + w[c] * r.src[k * r.plane + t]);
                *out = crate::cpu::epilogue::activate(r.activation, sum);
            }
        }
    }
}

/// Defines `$name::<T, B>`: one step of `T` positions of `B` blocks,
/// sums in registers.
macro_rules! expand_body {
    ($name:ident, $feature:literal, $lanes:expr,
     $load:ident, $store:ident, $set1:ident, $zero:ident, $fmadd:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {
        /// # Safety
        /// The CPU has the path's features; `T <= STEP`, `r.lanes ==
        /// $lanes`, `r.weight` and `r.bias` hold `B` blocks' vectors,
        /// `r.src` `T` values at each of `in_channels` offsets `k · plane`,
        /// and `r.padded` a vector at each of `j · stride + r.at[..T]`, `j < B`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name<const T: usize, const B: usize>(r: &mut Run) {
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
                    let s = src.add(k * r.plane);
                    // The next step's last value: a line the hardware
                    // prefetchers would not have fetched (a step's 14
                    // values of each of up to hundreds of planes).
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2 * T - 1) as *const i8);
                    for t in 0..T {
                        let v = $set1(*s.add(t));
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
