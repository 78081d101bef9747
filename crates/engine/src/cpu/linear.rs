//! The fully connected layer on CPU f32: `y = x · Wᵀ + b` over the last
//! dimension of `x`. The weights are packed once into panels of a few
//! outputs, `[out / width][in][width]`: each panel's dot products read one
//! contiguous run of memory from front to back, the input rows' values
//! broadcast against a vector of outputs, so the sums come out in the
//! vectors' lanes with no reduction at the end. The weights (the big
//! operand: 5 MB for a 1280 → 1000 classifier) stream through once per
//! [`ROWS`] input rows, panels in parallel.
//!
//! The classifiers of the model zoo run at batch 1 to 10, where candle's
//! `matmul` with a transposed right operand plus its bias pass was slower
//! (per-node profile in the model, Zen 4, batch 1 / 10: MobileNetV2's
//! classifier 0.42 / 0.74 ms -> 0.21 / 0.59, ResNet50's 0.73 / 1.48 ->
//! 0.35 / 0.88). The weights were then read as `[out, in]` rows, four rows
//! at a time; rows of 960 or 1280 values are short streams, which the
//! hardware prefetchers pick up late: on Zen 4 (2 threads, weights not in
//! cache) a 960 -> 32768 layer alone ran at 23 GB/s against ONNX Runtime's
//! 27-35, and in panels at 31 GB/s (0.71× the time, `xtask compare`, 100
//! pairs); MobileNetV3-Large's classifier took 0.16-0.19 ms against
//! 0.22-0.24 (960 -> 1280) per node, the forward 0.975× at batch 1 (AVX2
//! forced 0.98×), MobileNetV2 0.98×, EfficientNet-B0 and ResNet50 level;
//! batch 10 level.

use crate::cpu::data::{with_cpu_f32, SharedOut};
use crate::cpu::gemm::Isa;
use crate::cpu::parallel::for_each;
use crate::cpu::recycle;
use crate::cpu::weight_buffer::WeightBuffer;
use candle_core::{bail, Device, Tensor};

/// Input rows that share one pass over a panel: 2 vectors of sums per row
/// and step of the depth in flight, 20 vectors with two steps (AVX-512's
/// 32 registers) or 10 with one (AVX2's 16); batches of 10 in two passes.
const ROWS: usize = 5;

/// The most outputs per panel ([`width`]).
const WIDTH_MAX: usize = 32;

/// Outputs per panel of the packed weights on `isa`'s path: two vectors.
fn width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        _ => 16,
    }
}

/// A linear layer with its weights packed and its bias kept for the CPU.
#[derive(Debug)]
pub(crate) struct CpuLinear {
    /// The weights in panels ([`pack`]).
    panels: WeightBuffer,
    /// `[out_features]` (zeros without a bias).
    bias: Vec<f32>,
    out_features: usize,
    in_features: usize,
    isa: Isa,
}

impl CpuLinear {
    /// Packs `weight` (`[out, in]`, f32) and keeps `bias` (`[out]`) for path `isa`.
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>, isa: Isa) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        if weight.dtype() != candle_core::DType::F32 || !weight.device().is_cpu() {
            bail!(
                "linear weight must be f32 on the CPU, got {:?} on {:?}",
                weight.dtype(),
                weight.device()
            )
        }
        let bias = match bias {
            Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; out_features],
        };
        if bias.len() != out_features {
            bail!("linear bias has {} values for {out_features} outputs", bias.len())
        }
        let weight = weight.contiguous()?;
        let panels = with_cpu_f32("linear weight", &weight, None, |w, _| {
            pack(w, out_features, in_features, width(isa))
        })?;
        Ok(Self {
            panels,
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
            // From the forward's pool, where the output goes back when
            // dead (from the heap, it would add a buffer to the pool each
            // forward: `recycle::MAX_BUFFERS`).
            let buffer = recycle::take(rows.saturating_mul(self.out_features)).unwrap_or_default();
            self.products(input, rows, buffer)
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
        self.panel_tasks(input, rows, &dst);
        // SAFETY: the panels cover every column of every row, each written above.
        unsafe { out.set_len(out_len) };
        Ok(out)
    }

    /// Every panel's outputs of `rows` input rows into `dst`, a task per
    /// panel, each reading its panel once per [`ROWS`] input rows.
    fn panel_tasks(&self, input: &[f32], rows: usize, dst: &SharedOut) {
        let (outs, depth, width) = (self.out_features, self.in_features, width(self.isa));
        let per_panel = depth * width;
        for_each(0..outs.div_ceil(width), |p| {
            let cols = p * width..outs.min((p + 1) * width);
            let panel = &self.panels[p * per_panel..][..per_panel];
            for r0 in (0..rows).step_by(ROWS) {
                let tile = ROWS.min(rows - r0);
                let mut sums = [[0f32; WIDTH_MAX]; ROWS];
                PanelDots {
                    panel,
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

/// `[out, depth]` row-major weights as panels `[out / width][depth][width]`
/// (outputs past `out` zero), so that a panel's dot products read one
/// contiguous run of memory from front to back.
fn pack(w: &[f32], out: usize, depth: usize, width: usize) -> candle_core::Result<WeightBuffer> {
    let Some(len) = out
        .div_ceil(width)
        .checked_mul(width)
        .and_then(|n| n.checked_mul(depth))
    else {
        bail!("linear weights of {out} x {depth} overflow")
    };
    if Some(w.len()) != out.checked_mul(depth) {
        bail!("linear weights hold {} values, not {out} x {depth}", w.len())
    }
    let mut packed = WeightBuffer::zeroed(len, "linear weights")?;
    if depth > 0 {
        for (o, row) in w.chunks_exact(depth).enumerate() {
            let panel = &mut packed[o / width * depth * width..][..depth * width];
            for (k, &value) in row.iter().enumerate() {
                panel[k * width + o % width] = value;
            }
        }
    }
    Ok(packed)
}

/// Up to [`ROWS`] input rows (`x`, `[tile, depth]`) times one panel
/// (`[depth][width]`), into `sums[r][..width]`.
struct PanelDots<'a> {
    panel: &'a [f32],
    depth: usize,
    x: &'a [f32],
    sums: &'a mut [[f32; WIDTH_MAX]; ROWS],
}

impl PanelDots<'_> {
    /// Runs on `isa`'s path (intrinsics on the SIMD paths).
    fn run(self, isa: Isa) {
        let depth = self.depth;
        if depth == 0 {
            return;
        }
        let tile = self.x.len() / depth;
        let width = width(isa);
        assert!(tile <= ROWS && tile * depth == self.x.len() && self.panel.len() == depth * width);
        let row = |r: usize| &self.x[r * depth..][..depth];
        macro_rules! on_tile {
            ($dots:ident, $u12:expr, $u35:expr) => {
                match tile {
                    1 => x86::$dots::<1, { $u12 }>([row(0)], self.panel, depth, self.sums),
                    2 => x86::$dots::<2, { $u12 }>([row(0), row(1)], self.panel, depth, self.sums),
                    3 => x86::$dots::<3, { $u35 }>([row(0), row(1), row(2)], self.panel, depth, self.sums),
                    4 => x86::$dots::<4, { $u35 }>([row(0), row(1), row(2), row(3)], self.panel, depth, self.sums),
                    _ => x86::$dots::<5, { $u35 }>(
                        [row(0), row(1), row(2), row(3), row(4)],
                        self.panel,
                        depth,
                        self.sums,
                    ),
                }
            };
        }
        // Steps of the depth in flight: as many as the registers hold
        // beside the panel's two vectors and the broadcasts (AVX-512: 16
        // sums for up to 2 rows, 20 for 5; AVX2: 8 and 10).
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only handed out when the CPU has
            // AVX-512F; every row holds `depth` values, the panel `depth`
            // rows of 32 (checked above).
            Isa::Avx512 => unsafe { on_tile!(panel_avx512, 4, 2) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 + FMA and rows of 16.
            Isa::Avx2Fma => unsafe { on_tile!(panel_avx2, 2, 1) },
            _ => {
                for (k, w) in self.panel.chunks_exact(width).enumerate() {
                    for (sums, x) in self.sums.iter_mut().zip((0..tile).map(row)) {
                        for (s, w) in sums.iter_mut().zip(w) {
                            *s += x[k] * w;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ROWS, WIDTH_MAX};
    use std::arch::x86_64::*;

    /// Defines `$name`: `sums[r][..2·lanes]` = `x[r]` times a panel
    /// `[depth][2·lanes]`, each weight vector loaded once for the `R` rows
    /// and multiplied by each row's value broadcast; `U` steps of the
    /// depth in flight, each with sums of its own (added at the end), so
    /// that `2·R·U` independent sums hide the multiply-add latency.
    macro_rules! panel_dots {
        ($name:ident, $feature:literal, $lanes:expr, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $add:ident, $store:ident) => {
            /// # Safety
            /// The CPU has the path's features; `R <= ROWS`; every `x[r]`
            /// holds `depth` values, `panel` `depth · 2 · lanes`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<const R: usize, const U: usize>(
                x: [&[f32]; R],
                panel: &[f32],
                depth: usize,
                sums: &mut [[f32; WIDTH_MAX]; ROWS],
            ) {
                const W: usize = 2 * $lanes;
                debug_assert!(panel.len() >= depth * W && x.iter().all(|x| x.len() >= depth));
                let (w, xp) = (panel.as_ptr(), x.map(<[f32]>::as_ptr));
                let mut acc = [[[$zero(); 2]; R]; U];
                let mut k = 0;
                // SAFETY: `k < depth`: within every input row and the panel.
                unsafe {
                    while k + U <= depth {
                        for (u, acc) in acc.iter_mut().enumerate() {
                            let wv = [$load(w.add((k + u) * W)), $load(w.add((k + u) * W + $lanes))];
                            for (acc, xp) in acc.iter_mut().zip(xp) {
                                let b = $set1(*xp.add(k + u));
                                acc[0] = $fmadd(wv[0], b, acc[0]);
                                acc[1] = $fmadd(wv[1], b, acc[1]);
                            }
                        }
                        k += U;
                    }
                    while k < depth {
                        let wv = [$load(w.add(k * W)), $load(w.add(k * W + $lanes))];
                        for (acc, xp) in acc[0].iter_mut().zip(xp) {
                            let b = $set1(*xp.add(k));
                            acc[0] = $fmadd(wv[0], b, acc[0]);
                            acc[1] = $fmadd(wv[1], b, acc[1]);
                        }
                        k += 1;
                    }
                }
                let (first, rest) = acc.split_at_mut(1);
                for more in rest {
                    for (acc, more) in first[0].iter_mut().zip(more.iter()) {
                        acc[0] = $add(acc[0], more[0]);
                        acc[1] = $add(acc[1], more[1]);
                    }
                }
                for (sums, acc) in sums.iter_mut().zip(&first[0]) {
                    // SAFETY: `W <= WIDTH_MAX` values per row of `sums`.
                    unsafe {
                        $store(sums.as_mut_ptr(), acc[0]);
                        $store(sums.as_mut_ptr().add($lanes), acc[1]);
                    }
                }
            }
        };
    }

    #[rustfmt::skip]
    panel_dots!(panel_avx512, "avx512f", 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps);
    #[rustfmt::skip]
    panel_dots!(panel_avx2, "avx2,fma", 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps);
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
