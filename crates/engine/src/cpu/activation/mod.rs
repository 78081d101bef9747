//! The elementwise activations on CPU f32 tensors: one pass, chunks in
//! parallel, each chunk compiled for the instruction-set path (candle's
//! `clamp` makes two passes and two temporaries; ReLU6 on MobileNetV2 took
//! most of its forward that way).

use crate::cpu::data::with_cpu_f32;
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::output::Output;
use crate::cpu::parallel::for_each;
use candle_core::Tensor;
use wick_ir::Activation;

/// Elements per item of the parallel loop (`try_for_each` shares them
/// in runs of consecutive items).
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
    for_each(out.values_mut().chunks_mut(CHUNK), |chunk| {
        in_place(isa, Some(activation), chunk)
    });
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
        Isa::Avx512 => {
            // SAFETY: `Isa::Avx512` is only handed out when the CPU has AVX-512F.
            unsafe { x86::sigmoid_slice_avx512(values, silu) };
            true
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // SAFETY: as above, for AVX2 + FMA.
            unsafe { x86::sigmoid_slice_avx2(values, silu) };
            true
        }
        // No SIMD path: the caller runs its scalar loop (off x86-64 this
        // is the only arm, and the operands go unused).
        _ => {
            let _ = (values, silu);
            false
        }
    }
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
mod x86;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{sigmoid_avx2, sigmoid_avx512};

#[cfg(test)]
mod tests;
