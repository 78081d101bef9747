//! A 1×1 conv fused in front of the blocked depthwise conv (MobileNets'
//! and EfficientNets' expansion): each band's padded input is computed
//! from the 1×1 conv's input, one vector of the block's channels per
//! position (`bias + Σ_k w[k] · x[k]`, then the activation), straight into
//! the band's scratch, so the expanded tensor is never written out by one
//! kernel and copied in, transposed, by the next.
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
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use candle_core::bail;
use std::ops::Range;
use wick_ir::Activation;

/// A 1×1 conv's weights and biases with its output channels in blocks of
/// the depthwise conv's lanes.
#[derive(Debug)]
pub(crate) struct ExpandWeights {
    /// Channels per block: the path's vector width.
    pub(super) lanes: usize,
    /// The 1×1 conv's input channels.
    pub(crate) in_channels: usize,
    /// Its output channels: the depthwise conv's channels.
    pub(super) out_channels: usize,
    /// `[C_pad / lanes][in_channels][lanes]`, zero past the last channel.
    weight: Vec<f32>,
    /// `[C_pad]`, zero past the last channel.
    bias: Vec<f32>,
    activation: Option<Activation>,
}

impl ExpandWeights {
    /// Channels per block.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes
    }

    /// `weight` (`[out_channels, in_channels]`, a 1×1 conv's) and
    /// `epilogue`'s biases and activation, blocked `lanes` channels at a
    /// time; an error when the lengths disagree.
    pub(crate) fn new(
        weight: &[f32],
        [out_channels, in_channels]: [usize; 2],
        epilogue: &Epilogue,
        lanes: usize,
    ) -> candle_core::Result<Self> {
        if out_channels.checked_mul(in_channels) != Some(weight.len()) {
            bail!(
                "fused 1×1 conv: {} weights for {out_channels} × {in_channels} channels",
                weight.len()
            )
        }
        let Some((blocked, bias)) = channels_innermost(weight, [out_channels, in_channels], lanes, epilogue) else {
            bail!("fused 1×1 conv: {out_channels} × {in_channels} weights in blocks of {lanes} overflow")
        };
        Ok(Self {
            lanes,
            in_channels,
            out_channels,
            weight: blocked,
            bias,
            activation: epilogue.activation(),
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
/// `x` holds one image's `in_channels` planes `[H, W]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill(
    isa: Isa,
    g: &Geometry,
    e: &ExpandWeights,
    blocks: Range<usize>,
    x: &[f32],
    (padded, stride): (&mut [f32], usize),
    rows: Range<usize>,
    r0: usize,
) {
    let [height, width] = g.size;
    let (lanes, cin) = (g.lanes, e.in_channels);
    let count = blocks.len();
    let weight = &e.weight[blocks.start * cin * lanes..][..count * cin * lanes];
    let bias = &e.bias[blocks.start * lanes..][..count * lanes];
    // The checks the SIMD bodies rely on: every input row read is inside
    // `x`, every position written inside its block's band.
    assert!(
        e.lanes == lanes
            && (1..=BLOCKS).contains(&count)
            && x.len() >= cin * height * width
            && g.input_len <= stride
            && padded.len() >= (count - 1) * stride + g.input_len
            && (rows.is_empty() || (rows.end <= height && g.at(r0 + rows.len() - 1, width) <= g.input_len))
    );
    // The band's rows are one run of positions in each input plane (rows
    // follow each other there): steps run across row ends (on 7-wide
    // planes too), each position's vector to its own place.
    let plane = height * width;
    let span = rows.start * width..rows.end * width;
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
