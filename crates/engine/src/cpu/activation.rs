//! The elementwise activations on CPU f32 tensors: one pass, chunks in
//! parallel, each chunk compiled for the instruction-set path (candle's
//! `clamp` makes two passes and two temporaries; ReLU6 on MobileNetV2 took
//! most of its forward that way).

use crate::cpu::data::with_cpu_f32;
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::output::Output;
use candle_core::Tensor;
use rayon::prelude::*;
use wick_ir::Activation;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `activation(x)` for a CPU f32 tensor of any shape, on `isa`.
pub(crate) fn activation(isa: Isa, activation: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let len = x.elem_count();
    let mut out = Output::new(len, "activation output")?;
    with_cpu_f32("CPU activation", &x, None, |data, _| {
        out.extend_from_slice(data);
        Ok(())
    })?;
    out.values_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| in_place(isa, Some(activation), chunk));
    out.into_tensor(x.dims())
}

/// `values` through `activation`, if any, in place on `isa`: sigmoid and
/// SiLU in the path's vector form ([`sigmoid_slice`]), the others as
/// plain loops the path's compiler vectorises.
pub(crate) fn in_place(isa: Isa, activation: Option<Activation>, values: &mut [f32]) {
    let Some(activation) = activation else {
        return;
    };
    if !(is_sigmoid(activation) && sigmoid_slice(isa, activation == Activation::Silu, values)) {
        isa.run(Apply { activation, values })
    }
}

/// Whether `activation` is sigmoid or SiLU: the two with a vector form
/// of their own ([`sigmoid_slice`]).
pub(crate) fn is_sigmoid(activation: Activation) -> bool {
    matches!(activation, Activation::Sigmoid | Activation::Silu)
}

/// Sigmoid (or SiLU, `x · sigmoid(x)`) over `values` in place with the
/// vector form that the kernels' in-register epilogues use
/// ([`sigmoid_avx2`], [`sigmoid_avx512`]), every value one vector's lane
/// (the last few through a padded copy): `false`, nothing done, on the
/// scalar path. The scalar form compiled for a path vectorises too, but
/// with a division and a NaN blend: EfficientNet-B0's stem (3×3 stride
/// 2, its products written through scratch) spent 18-29% of its `perf`
/// samples alone at batch 10 in that loop, most on its `vdivps` (Zen 3).
/// In the model at batch 10 (`scripts/ab-nodes.sh`, each node against
/// the median node): the stem 0.92× the time, the squeeze-and-excitation
/// FCs with SiLU (`gemv.rs`, the activation kernel) 0.7-0.95×.
pub(crate) fn sigmoid_slice(isa: Isa, silu: bool, values: &mut [f32]) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only handed out when the CPU has AVX-512F.
        Isa::Avx512 => unsafe { x86::sigmoid_slice_avx512(values, silu) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA.
        Isa::Avx2Fma => unsafe { x86::sigmoid_slice_avx2(values, silu) },
        _ => return false,
    }
    true
}

/// One chunk, in place.
struct Apply<'a> {
    activation: Activation,
    values: &'a mut [f32],
}

impl IsaBody for Apply<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let values = self.values;
        // One loop per activation (a constant in each), so each vectorises
        // on its own.
        match self.activation {
            Activation::Relu => values.iter_mut().for_each(|v| *v = scalar(Activation::Relu, *v)),
            Activation::Relu6 => values.iter_mut().for_each(|v| *v = scalar(Activation::Relu6, *v)),
            Activation::HardSwish => values.iter_mut().for_each(|v| *v = scalar(Activation::HardSwish, *v)),
            Activation::HardSigmoid => values.iter_mut().for_each(|v| *v = scalar(Activation::HardSigmoid, *v)),
            Activation::Sigmoid => values.iter_mut().for_each(|v| *v = scalar(Activation::Sigmoid, *v)),
            Activation::Silu => values.iter_mut().for_each(|v| *v = scalar(Activation::Silu, *v)),
        }
    }
}

/// One value through `activation` in f32, as PyTorch writes it (the one
/// copy of the f32 formulas: this kernel and the conv epilogues use it,
/// but for sigmoid and SiLU on the SIMD paths, which take the vector form
/// of the same formula, [`sigmoid_avx2`] / [`sigmoid_avx512`]).
#[inline(always)]
pub(crate) fn scalar(activation: Activation, v: f32) -> f32 {
    match activation {
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
        Activation::HardSwish => v * ((v + 3.0).clamp(0.0, 6.0) / 6.0),
        Activation::HardSigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
        Activation::Sigmoid => sigmoid(v),
        Activation::Silu => v * sigmoid(v),
    }
}

/// 2^126: from here on `1 / d` is subnormal, and sigmoid is 0 on every path.
const FLUSH: f32 = 8.507_059e37;

/// `1 / (1 + e^-x)` in f32 with [`exp`]: 0 where `1 + e^-x` reaches
/// [`FLUSH`] (`x` below about -87.3, -inf included), whose reciprocal
/// would be subnormal, on every path (AVX2's reciprocal estimate flushes
/// it, AVX-512's is made to; so SiLU of -inf is NaN on every path, as `x
/// / (1 + e^-x)` is in PyTorch); 1 for very positive `x`, NaN for NaN.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let d = 1.0 + exp(-x);
    if d >= FLUSH {
        0.0
    } else {
        1.0 / d
    }
}

/// `e^x` in f32 without a library call, so the loops it is in vectorise
/// (libm's `expf` made SiLU the most expensive part of EfficientNet's
/// convs): Cephes' `expf`, `x = n·ln 2 + r` with `|r| <= ln 2 / 2` and a
/// degree-6 polynomial for `e^r`, `2^n` built from its exponent bits.
/// Within 2 ulp of `e^x` for `x` in [-87.3, 88.0]; inputs outside are
/// clamped there (results of ~1e-38 and ~1.6e38, where the true value
/// underflows or overflows f32); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.0);
    // Round to nearest by adding and subtracting 1.5·2^23 (no `floor`
    // call on paths without SSE4.1; the loops stay vectorised).
    const ROUND: f32 = 12_582_912.0;
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 127]: a normal power of two. `shifted` is the
    // integer 1.5·2^23 + n exactly (ulp 1 there), so its bits are those of
    // 1.5·2^23 plus n: integer arithmetic on the bits, where `n as i32`
    // (a saturating conversion) compiled to a scalar convert and `cmov`
    // per lane and cost 12% of EfficientNet-B0's forward on Zen 4.
    let biased = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if x.is_nan() {
        x
    } else {
        e_r * scale
    }
}

/// Defines `$exp` and `$sigmoid` on one SIMD path: [`exp`] and
/// [`sigmoid`] lane by lane, the polynomial and the reduction as fused
/// multiply-adds and the reciprocal as the path's estimate refined by one
/// Newton step (`vdivps` was most of SiLU's cost in the conv epilogues:
/// EfficientNet-B0 evaluates ~6 M SiLUs per image). Within 8 ulp of the
/// scalar forms (tested; 4 on the Intel Xeon VM), not bit for bit: the
/// scalar code rounds each multiply and add, and divides. For the kernels that apply the epilogue
/// in registers ([`crate::cpu::epilogue::vector_activation!`]).
macro_rules! vector_sigmoid {
    ($exp:ident, $sigmoid:ident, $feature:literal, $vector:ty, $set1:ident, $set1_epi32:ident,
     $add:ident, $sub:ident, $mul:ident, $fmadd:ident, $fnmadd:ident, $rcp:ident, $max:ident, $min:ident,
     $add_epi32:ident, $sub_epi32:ident, $slli_epi32:ident, $to_bits:ident, $from_bits:ident,
     $flush:ident) => {
        /// [`crate::cpu::activation::exp`] on every lane.
        #[inline]
        #[target_feature(enable = $feature)]
        pub(crate) fn $exp(x: $vector) -> $vector {
            const LN2_HI: f32 = 0.693_359_4;
            const LN2_LO: f32 = -2.121_944_4e-4;
            const ROUND: f32 = 12_582_912.0;
            // `x` the second operand of each: the one min and max return
            // when either is NaN, so NaN runs through to the result (NaN
            // times any scale) with no blend of its own, which cost AVX2's
            // SiLU a compare and a `vblendvps` on the FMA ports per vector.
            let clamped = $min($set1(88.0), $max($set1(-87.3), x));
            let shifted = $fmadd(clamped, $set1(std::f32::consts::LOG2_E), $set1(ROUND));
            let n = $sub(shifted, $set1(ROUND));
            let r = $fnmadd(n, $set1(LN2_LO), $fnmadd(n, $set1(LN2_HI), clamped));
            let mut p = $set1(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
                p = $fmadd(p, r, $set1(c));
            }
            let e_r = $fmadd($mul(p, r), r, $add(r, $set1(1.0)));
            let biased = $add_epi32(
                $sub_epi32($to_bits(shifted), $set1_epi32(ROUND.to_bits() as i32)),
                $set1_epi32(127),
            );
            $mul(e_r, $from_bits($slli_epi32::<23>(biased)))
        }

        /// [`crate::cpu::activation::sigmoid`] on every lane (`-x` as `0 - x`: the same but for
        /// the sign of a zero, which `exp` does not see): `y ≈ 1 / d` from
        /// the estimate, then `y + y·(1 - d·y)`, and 0 where `d` reaches
        /// 2^126, as the scalar form: AVX2's estimate flushes a subnormal
        /// reciprocal to 0 there, AVX-512's does not.
        #[inline]
        #[target_feature(enable = $feature)]
        pub(crate) fn $sigmoid(x: $vector) -> $vector {
            let one = $set1(1.0);
            let d = $add(one, $exp($sub($set1(0.0), x)));
            let y = $rcp(d);
            $flush(d, $fmadd($fnmadd(d, y, one), y, y))
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 0 in the lanes where `d` is at least [`super::FLUSH`], `y` elsewhere
    /// (NaN lanes of `d` keep `y`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn flush_avx512(d: __m512, y: __m512) -> __m512 {
        let big = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, _mm512_set1_ps(super::FLUSH));
        _mm512_mask_blend_ps(big, y, _mm512_setzero_ps())
    }

    /// [`flush_avx512`]'s result on 8 lanes, which AVX2's estimate gives by
    /// itself: `vrcpps` flushes its tiny results (`d` of 2^126 and more) to
    /// 0, and the Newton step keeps 0 (`0 + 0·(1 - d·0)`, `d` finite: at
    /// most `1 + e^88`). The explicit compare and `vblendvps` cost ~10% of
    /// SiLU on Zen 3 (with the NaN blend, 7.4-8.3 ns per vector of 8
    /// against 5.9-6.2 without either, one thread, operands in L1).
    /// `sigmoid_flushes_to_zero_on_every_path` checks it.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn flush_avx2(_d: __m256, y: __m256) -> __m256 {
        y
    }

    /// Defines `$name(values, silu)`: `$sigmoid` (times `x` with `silu`)
    /// over `values` in place, `$lanes` at a time, the last partial vector
    /// through a padded copy.
    macro_rules! sigmoid_slice {
        ($name:ident, $feature:literal, $lanes:expr, $load:ident, $store:ident, $mul:ident, $sigmoid:ident) => {
            /// # Safety
            /// The CPU has the path's features.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(values: &mut [f32], silu: bool) {
                let apply = |x| match silu {
                    true => $mul(x, $sigmoid(x)),
                    false => $sigmoid(x),
                };
                let mut chunks = values.chunks_exact_mut($lanes);
                for chunk in &mut chunks {
                    // SAFETY: `chunk` holds one vector's values.
                    unsafe { $store(chunk.as_mut_ptr(), apply($load(chunk.as_ptr()))) }
                }
                let tail = chunks.into_remainder();
                if !tail.is_empty() {
                    let mut lanes = [0f32; $lanes];
                    lanes[..tail.len()].copy_from_slice(tail);
                    // SAFETY: `lanes` holds one vector's values.
                    unsafe { $store(lanes.as_mut_ptr(), apply($load(lanes.as_ptr()))) }
                    tail.copy_from_slice(&lanes[..tail.len()]);
                }
            }
        };
    }

    sigmoid_slice!(
        sigmoid_slice_avx512,
        "avx512f",
        16,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_mul_ps,
        sigmoid_avx512
    );
    sigmoid_slice!(
        sigmoid_slice_avx2,
        "avx2,fma",
        8,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_mul_ps,
        sigmoid_avx2
    );

    #[rustfmt::skip]
    vector_sigmoid!(exp_avx512, sigmoid_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_set1_epi32,
        _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_rcp14_ps,
        _mm512_max_ps, _mm512_min_ps,
        _mm512_add_epi32, _mm512_sub_epi32, _mm512_slli_epi32, _mm512_castps_si512, _mm512_castsi512_ps,
        flush_avx512);
    #[rustfmt::skip]
    vector_sigmoid!(exp_avx2, sigmoid_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_set1_epi32,
        _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_rcp_ps,
        _mm256_max_ps, _mm256_min_ps,
        _mm256_add_epi32, _mm256_sub_epi32, _mm256_slli_epi32, _mm256_castps_si256, _mm256_castsi256_ps,
        flush_avx2);

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::cpu::activation::{exp, sigmoid};
        use crate::cpu::gemm::Isa;

        /// Both paths' `exp` and `sigmoid` are within 8 ulp of the scalar
        /// forms (NaN for NaN; where the true value is below 1e-37, a
        /// flushed tiny reciprocal on AVX2, within 1e-37) over a sweep past
        /// both clamps and the specials. The Intel Xeon VM gives at most 4
        /// (AVX2's 12-bit estimate, sigmoid of large negative values); the
        /// estimate instructions' tables differ between vendors.
        #[test]
        fn vector_forms_within_8_ulp_of_scalar() {
            let mut values: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 200.0).collect();
            values.extend([
                0.0,
                -0.0,
                1e-40,
                -1e-40,
                1e30,
                -1e30,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                88.0,
                -87.3,
            ]);
            values.resize(values.len().next_multiple_of(16), 0.5);
            let same = |got: f32, want: f32| {
                let ulps = (i64::from(got.to_bits() as i32) - i64::from(want.to_bits() as i32)).abs();
                (got.is_nan() && want.is_nan())
                    || got == want
                    || (got - want).abs() <= 1e-37
                    || (got.is_finite() && got.is_sign_negative() == want.is_sign_negative() && ulps <= 8)
            };
            for isa in Isa::available() {
                for chunk in values.chunks_exact(16) {
                    let mut got = [[0f32; 16]; 2];
                    match isa {
                        // SAFETY: the path's features are present (`Isa::available`).
                        Isa::Avx512 => unsafe {
                            let x = _mm512_loadu_ps(chunk.as_ptr());
                            _mm512_storeu_ps(got[0].as_mut_ptr(), exp_avx512(x));
                            _mm512_storeu_ps(got[1].as_mut_ptr(), sigmoid_avx512(x));
                        },
                        // SAFETY: as above.
                        Isa::Avx2Fma => unsafe {
                            for half in 0..2 {
                                let x = _mm256_loadu_ps(chunk[8 * half..].as_ptr());
                                _mm256_storeu_ps(got[0][8 * half..].as_mut_ptr(), exp_avx2(x));
                                _mm256_storeu_ps(got[1][8 * half..].as_mut_ptr(), sigmoid_avx2(x));
                            }
                        },
                        _ => continue,
                    }
                    for (i, &x) in chunk.iter().enumerate() {
                        assert!(same(got[0][i], exp(x)), "{isa:?} exp({x}): {} vs {}", got[0][i], exp(x));
                        assert!(
                            same(got[1][i], sigmoid(x)),
                            "{isa:?} sigmoid({x}): {} vs {}",
                            got[1][i],
                            sigmoid(x)
                        );
                    }
                }
            }
        }

        /// Where `1 + e^-x` reaches 2^126 (-87.4 and below, -inf) sigmoid
        /// is exactly 0 on both paths and the scalar form, not a
        /// subnormal on some (AVX-512's estimate keeps them, AVX2's
        /// flushes them: the fused max pool's SiLU of -inf differed
        /// between paths); NaN stays NaN; just above, a normal value.
        #[test]
        fn sigmoid_flushes_to_zero_on_every_path() {
            let x = [-87.4f32, -88.0, -100.0, -1e30, f32::NEG_INFINITY, -87.0, f32::NAN, 0.0];
            assert!(x[..5].iter().all(|&v| sigmoid(v) == 0.0) && sigmoid(-87.0) > 0.0 && sigmoid(f32::NAN).is_nan());
            for isa in Isa::available() {
                let mut got = [0f32; 16];
                let mut lanes = [0.5f32; 16];
                lanes[..8].copy_from_slice(&x);
                match isa {
                    // SAFETY: the path's features are present (`Isa::available`).
                    Isa::Avx512 => unsafe {
                        _mm512_storeu_ps(got.as_mut_ptr(), sigmoid_avx512(_mm512_loadu_ps(lanes.as_ptr())));
                    },
                    // SAFETY: as above.
                    Isa::Avx2Fma => unsafe {
                        _mm256_storeu_ps(got.as_mut_ptr(), sigmoid_avx2(_mm256_loadu_ps(lanes.as_ptr())));
                    },
                    _ => continue,
                }
                assert!(got[..5].iter().all(|&g| g == 0.0), "{isa:?}: {:?}", &got[..5]);
                assert!(
                    got[5] >= f32::MIN_POSITIVE && got[6].is_nan(),
                    "{isa:?}: {:?}",
                    &got[5..7]
                );
                assert!((got[7] - 0.5).abs() < 1e-6, "{isa:?}: sigmoid(0) = {}", got[7]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{sigmoid_avx2, sigmoid_avx512};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `exp` within 2 ulp of f64's `exp` over its range, by a sweep.
    #[test]
    fn exp_within_two_ulp() {
        let mut x = -87.3f32;
        while x <= 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!((got - want).abs() <= 2.0 * ulp, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e4) >= 0.0 && exp(-1e4) < 1e-37 && exp(1e4).is_finite());
    }

    /// Every activation on every path this CPU has equals the f64
    /// reference within f32 rounding, over saturating values and a size
    /// that is not a whole number of chunks; NaN stays NaN.
    #[test]
    fn matches_reference_on_every_path() {
        let values: Vec<f32> = (0..CHUNK + 1001)
            .map(|i| (i as f32 - 8000.0) / 300.0)
            .chain([-1e30, 1e30, 88.0, -88.0, 0.0, -0.0])
            .collect();
        let x = Tensor::from_vec(values.clone(), values.len(), &Device::Cpu).unwrap();
        for isa in Isa::available() {
            for act in Activation::ALL {
                let got: Vec<f32> = activation(isa, act, &x).unwrap().to_vec1().unwrap();
                for (&v, &g) in values.iter().zip(&got) {
                    let want = act.reference(f64::from(v));
                    let tol = 4.0 * f64::from(f32::EPSILON) * want.abs().max(1.0);
                    assert!(
                        (f64::from(g) - want).abs() <= tol || (want.is_infinite() && f64::from(g) == want),
                        "{isa:?} {act:?} at {v}: {g} vs {want}"
                    );
                }
            }
            let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
            for act in [Activation::Sigmoid, Activation::Silu, Activation::HardSwish] {
                assert!(activation(isa, act, &nan).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
            }
        }
    }
}
