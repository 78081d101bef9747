//! The fully connected layer on CPU f32: `y = x · Wᵀ + b` over the last
//! dimension of `x`, the weights kept as `[out, in]` rows. Each output is a
//! dot product of an input row with a weight row, both contiguous: the
//! weights (the big operand: 5 MB for a 1280 → 1000 classifier) stream
//! through once per [`ROWS`] input rows, blocks of outputs in parallel.
//!
//! The classifiers of the model zoo run at batch 1 to 10, where candle's
//! `matmul` with a transposed right operand plus its bias pass was slower
//! (per-node profile in the model, Zen 4, batch 1 / 10: MobileNetV2's
//! classifier 0.42 / 0.74 ms -> 0.21 / 0.59, ResNet50's 0.73 / 1.48 ->
//! 0.35 / 0.88).

use crate::cpu::data::{with_cpu_f32, SharedOut};
use crate::cpu::gemm::Isa;
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;

/// Outputs per parallel task.
const BLOCK: usize = 32;
/// Input rows that share one pass over a weight row: with four weight
/// rows at a time, 20 vectors of sums (AVX-512's 32 registers; AVX2's 16
/// hold 5 × 2), and batches of 10 in two passes.
const ROWS: usize = 5;

/// A linear layer with its weights and bias kept for the CPU.
#[derive(Debug)]
pub(crate) struct CpuLinear {
    /// `[out_features, in_features]`, contiguous f32 on the CPU: the
    /// graph's tensor itself (its storage shared, not copied: the compiles
    /// of one graph at several batch sizes hold the weights once).
    weight: Tensor,
    /// `[out_features]` (zeros without a bias).
    bias: Vec<f32>,
    out_features: usize,
    in_features: usize,
    isa: Isa,
}

impl CpuLinear {
    /// Keeps `weight` (`[out, in]`, f32) and `bias` (`[out]`) for path `isa`.
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>, isa: Isa) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        if weight.dtype() != candle_core::DType::F32 || !weight.device().is_cpu() {
            bail!(
                "linear weight must be f32 on the CPU, got {:?} on {:?}",
                weight.dtype(),
                weight.device()
            )
        }
        let weight = weight.detach().contiguous()?;
        let bias = match bias {
            Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; out_features],
        };
        if bias.len() != out_features {
            bail!("linear bias has {} values for {out_features} outputs", bias.len())
        }
        Ok(Self {
            weight,
            bias,
            out_features,
            in_features,
            isa,
        })
    }

    /// `x · Wᵀ + b` for a CPU f32 `x` whose last dimension is the input features.
    pub(crate) fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == self.in_features => *last = self.out_features,
            _ => bail!(
                "linear input {:?} must end in the weight's {} input features",
                x.dims(),
                self.in_features
            ),
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.contiguous()?;
        let out = with_cpu_f32("linear", &x, None, |input, _| {
            // A small output (classifiers: rows of 1000): from the heap.
            self.products(input, rows, Vec::new())
        })?;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }

    /// `input · Wᵀ + b` for `rows` rows of the input features (`input`
    /// holds `rows · in_features` values), `[rows, out_features]`, in `out`
    /// (an empty buffer; grown if it holds too few).
    pub(crate) fn products(&self, input: &[f32], rows: usize, mut out: Vec<f32>) -> candle_core::Result<Vec<f32>> {
        let (outs, depth) = (self.out_features, self.in_features);
        if rows.checked_mul(depth) != Some(input.len()) {
            bail!("linear input of {} values is not {rows} rows of {depth}", input.len())
        }
        let Some(out_len) = rows.checked_mul(outs) else {
            bail!("linear output of {rows} x {outs} overflows")
        };
        out.clear();
        if out.try_reserve_exact(out_len).is_err() {
            bail!("cannot allocate {out_len} f32 values for the linear output")
        }
        let dst = SharedOut::new(&mut out, out_len);
        with_cpu_f32("linear weight", &self.weight, None, |weights, _| {
            self.blocks(weights, input, rows, &dst);
            Ok(())
        })?;
        // SAFETY: the blocks cover every column of every row, each written above.
        unsafe { out.set_len(out_len) };
        Ok(out)
    }

    /// Every block of outputs of `rows` input rows into `dst`, in parallel.
    fn blocks(&self, weights: &[f32], input: &[f32], rows: usize, dst: &SharedOut) {
        let (outs, depth) = (self.out_features, self.in_features);
        (0..outs.div_ceil(BLOCK)).into_par_iter().for_each(|block| {
            let cols = block * BLOCK..outs.min((block + 1) * BLOCK);
            let weight = &weights[cols.start * depth..cols.end * depth];
            for r0 in (0..rows).step_by(ROWS) {
                let tile = ROWS.min(rows - r0);
                let mut sums = [[0f32; BLOCK]; ROWS];
                Dots {
                    weight,
                    depth,
                    x: &input[r0 * depth..(r0 + tile) * depth],
                    sums: &mut sums,
                }
                .run(self.isa);
                for (r, sums) in sums.iter().take(tile).enumerate() {
                    // SAFETY: tasks write disjoint output columns
                    // (`cols`) of each row; nothing else touches `out`.
                    let out = unsafe { dst.slice((r0 + r) * outs + cols.start, cols.len()) };
                    for ((o, s), b) in out.iter_mut().zip(sums).zip(&self.bias[cols.clone()]) {
                        *o = s + b;
                    }
                }
            }
        });
    }
}

/// The dot products of up to [`ROWS`] input rows (`x`, `[tile, depth]`) with
/// up to [`BLOCK`] weight rows (`weight`, `[block, depth]`), into `sums[r][j]`.
struct Dots<'a> {
    weight: &'a [f32],
    depth: usize,
    x: &'a [f32],
    sums: &'a mut [[f32; BLOCK]; ROWS],
}

impl Dots<'_> {
    /// Runs on `isa`'s dot product (intrinsics on the SIMD paths: the
    /// portable loop below stayed scalar, its sums on the stack).
    fn run(self, isa: Isa) {
        let depth = self.depth;
        if depth == 0 {
            return;
        }
        let tile = self.x.len() / depth;
        assert!(tile <= ROWS && tile * depth == self.x.len() && self.weight.len() <= BLOCK * depth);
        let row = |r: usize| &self.x[r * depth..][..depth];
        // Only the tile's rows (a const row count per call: short tiles,
        // as at batch 1, do no work for the rows they lack).
        macro_rules! on_tile {
            ($dots:path) => {
                match tile {
                    1 => $dots([row(0)], self.weight, depth, self.sums),
                    2 => $dots([row(0), row(1)], self.weight, depth, self.sums),
                    3 => $dots([row(0), row(1), row(2)], self.weight, depth, self.sums),
                    4 => $dots([row(0), row(1), row(2), row(3)], self.weight, depth, self.sums),
                    _ => $dots(
                        [row(0), row(1), row(2), row(3), row(4)],
                        self.weight,
                        depth,
                        self.sums,
                    ),
                }
            };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only handed out when the CPU has
            // AVX-512F; every row holds `depth` values, `weight` at most
            // `BLOCK` rows of them.
            Isa::Avx512 => unsafe { on_tile!(x86::dots_avx512) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 + FMA.
            Isa::Avx2Fma => unsafe { on_tile!(x86::dots_avx2) },
            _ => {
                for (j, w) in self.weight.chunks_exact(depth).enumerate() {
                    for (sums, x) in self.sums.iter_mut().zip((0..tile).map(row)) {
                        sums[j] = x.iter().zip(w).map(|(x, w)| x * w).sum();
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, ROWS};
    use std::arch::x86_64::*;

    /// Weight rows read at a time for one input row (batch 1), on both
    /// paths. One input row reads the weights once whatever the grouping,
    /// at memory speed, and the prefetchers follow several streams where
    /// one stream left the memory idle: on the Intel Xeon VM (2 threads,
    /// in the model, the weights cold), ResNet50's 2048 -> 1000 took
    /// 0.30-0.35 ms against 0.46-0.60 one row at a time on AVX-512 (0.39-
    /// 0.42 two at a time; one row with four sums, or software prefetch
    /// 1-16 KiB ahead: no gain), 0.33 against 0.40-0.44 on AVX2 (forced);
    /// MobileNetV2's 1280 -> 1000 0.096-0.114 against 0.126-0.172. (On
    /// Zen 4, an earlier session, one row at a time had measured 0.111 ms
    /// against 0.147 for the 1280 -> 1000 layer, its weights in L3 there.)
    const BATCH1_GROUP: usize = 4;

    /// The sum of an AVX2 vector's 8 lanes (a tree: halves, then pairs).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_avx2(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }

    /// Defines `$name`: for each weight row `j` of `weight` (`depth` long,
    /// at most [`BLOCK`] rows), `R` dot products of `x[r]` with it into
    /// `sums[r][j]`. `$group` weight rows at a time ([`BATCH1_GROUP`] for
    /// one input row), one vector of
    /// partial sums per (row, weight row): each weight vector loaded once
    /// for the `R` rows and each input vector once for the `$group`
    /// weight rows, `R·$group` independent sums (enough to hide the
    /// multiply-add latency), each reduced by a tree at the end. One call
    /// per block: a call per weight row cost more than the dot products of
    /// squeeze-and-excitation's short rows. (One weight row at a time, two
    /// partial sums per row reduced lane by lane, four rows a pass: alone
    /// on Zen 4, alternating, batch 10, ResNet50's 2048 -> 1000 took
    /// 0.93-1.07 ms against 0.46-0.52 now, MobileNetV3's 960 -> 1280
    /// 0.36-0.49 against 0.29-0.35.)
    macro_rules! dots {
        ($name:ident, $rows_fn:ident, $group_fn:ident, $feature:literal, $lanes:expr, $group:expr, $vector:ty,
         $zero:ident, $load:ident, $fmadd:ident, $sum:path) => {
            /// # Safety
            /// The CPU has the path's features; `R <= ROWS`; every `x[r]`
            /// holds `depth` values, `weight` at most `BLOCK · depth`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<const R: usize>(
                x: [&[f32]; R],
                weight: &[f32],
                depth: usize,
                sums: &mut [[f32; BLOCK]; ROWS],
            ) {
                let rows = weight.len().checked_div(depth).unwrap_or(0).min(BLOCK);
                // SAFETY: as this function's contract.
                unsafe {
                    match R {
                        1 => $rows_fn::<R, BATCH1_GROUP>(x, weight, depth, rows, sums),
                        _ => $rows_fn::<R, { $group }>(x, weight, depth, rows, sums),
                    }
                }
            }

            /// `sums[r][j]` for the first `rows` weight rows, `J` at a time.
            ///
            /// # Safety
            /// As `$name`; `rows <= BLOCK` and `rows · depth <= weight.len()`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $rows_fn<const R: usize, const J: usize>(
                x: [&[f32]; R],
                weight: &[f32],
                depth: usize,
                rows: usize,
                sums: &mut [[f32; BLOCK]; ROWS],
            ) {
                let whole = rows / J * J;
                // SAFETY: the groups' weight rows are below `rows`, within `weight`.
                unsafe {
                    for j in (0..whole).step_by(J) {
                        $group_fn::<R, J>(x, weight, depth, j, sums);
                    }
                    for j in whole..rows {
                        $group_fn::<R, 1>(x, weight, depth, j, sums);
                    }
                }
            }

            /// `sums[r][j0 + j]` for `j < J`: weight rows `j0..j0 + J`.
            ///
            /// # Safety
            /// As `$name`; `(j0 + J)·depth <= weight.len()`, `j0 + J <= BLOCK`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $group_fn<const R: usize, const J: usize>(
                x: [&[f32]; R],
                weight: &[f32],
                depth: usize,
                j0: usize,
                sums: &mut [[f32; BLOCK]; ROWS],
            ) {
                let whole = depth / $lanes * $lanes;
                let w = &weight[j0 * depth..(j0 + J) * depth];
                let (wp, xp) = (w.as_ptr(), x.map(<[f32]>::as_ptr));
                let mut acc = [[$zero(); J]; R];
                // SAFETY: `c + lanes <= whole <= depth`, within every
                // weight row of the group and every input row.
                unsafe {
                    for c in (0..whole).step_by($lanes) {
                        let wv: [$vector; J] = std::array::from_fn(|j| $load(wp.add(j * depth + c)));
                        for (acc, xp) in acc.iter_mut().zip(xp) {
                            let xv = $load(xp.add(c));
                            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                                *acc = $fmadd(wv, xv, *acc);
                            }
                        }
                    }
                }
                for ((sums, acc), x) in sums.iter_mut().zip(acc).zip(x) {
                    for (j, acc) in acc.into_iter().enumerate() {
                        let w = &w[j * depth..][..depth];
                        let tail: f32 = w[whole..].iter().zip(&x[whole..depth]).map(|(w, x)| w * x).sum();
                        sums[j0 + j] = $sum(acc) + tail;
                    }
                }
            }
        };
    }

    #[rustfmt::skip]
    dots!(dots_avx512, rows_avx512, group_avx512, "avx512f", 16, 4, __m512,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps);
    #[rustfmt::skip]
    dots!(dots_avx2, rows_avx2, group_avx2, "avx2,fma", 8, 2, __m256,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, sum_avx2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals an f64 product within f32 rounding, over
        /// row counts off the row tile, output counts off the block and
        /// depths off the lanes, with and without a bias; leading
        /// dimensions are kept.
        #[test]
        fn matches_f64_product(
            rows in 0usize..11,
            outs in 1usize..70,
            depth in 0usize..50,
            bias in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let d = Device::Cpu;
            let mut next = crate::test_util::uniform(seed);
            let x: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let w: Vec<f32> = (0..outs * depth).map(|_| next()).collect();
            let b: Vec<f32> = (0..outs).map(|_| next()).collect();
            let xt = Tensor::from_vec(x.clone(), (1, rows, depth), &d).unwrap();
            let wt = Tensor::from_vec(w.clone(), (outs, depth), &d).unwrap();
            let bt = Tensor::from_vec(b.clone(), outs, &d).unwrap();
            for isa in Isa::available() {
                let linear = CpuLinear::new(&wt, bias.then_some(&bt), isa).unwrap();
                let got = linear.run(&xt).unwrap();
                prop_assert_eq!(got.dims(), [1, rows, outs]);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for r in 0..rows {
                    for o in 0..outs {
                        let terms = (0..depth).map(|k| f64::from(x[r * depth + k]) * f64::from(w[o * depth + k]));
                        let b = if bias { f64::from(b[o]) } else { 0.0 };
                        let want: f64 = terms.clone().sum::<f64>() + b;
                        let bound = 1.01 * (depth + 1) as f64 * f64::from(f32::EPSILON) * (terms.map(f64::abs).sum::<f64>() + b.abs());
                        let got = f64::from(got[r * outs + o]);
                        prop_assert!((got - want).abs() <= bound, "{isa:?} r={r} o={o}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// Inputs whose last dimension is not the weight's, and biases of another
    /// length, are refused with an error.
    #[test]
    fn refuses_mismatched_operands() {
        let d = Device::Cpu;
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &d).unwrap();
        let linear = CpuLinear::new(&w, None, Isa::Scalar).unwrap();
        for dims in [&[2usize, 5][..], &[4, 2], &[]] {
            let x = Tensor::zeros(dims, candle_core::DType::F32, &d).unwrap();
            assert!(linear.run(&x).is_err(), "{dims:?}");
        }
        let b = Tensor::zeros(2, candle_core::DType::F32, &d).unwrap();
        assert!(CpuLinear::new(&w, Some(&b), Isa::Scalar).is_err());
        let x = Tensor::ones((2, 4), candle_core::DType::F32, &d).unwrap();
        assert_eq!(linear.run(&x).unwrap().dims(), [2, 3]);
    }
}
