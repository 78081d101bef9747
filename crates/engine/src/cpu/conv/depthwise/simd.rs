//! The depthwise conv's segments on the SIMD paths, in intrinsics: one
//! vector of sums per segment (16 columns on AVX-512, 8 on AVX2), one
//! fused multiply-add per tap read straight from the phases, the epilogue
//! (bias, residual, activation) applied in registers and one store per
//! segment. The portable path ([`super::Segments`]) computes the same
//! values with the epilogue as a pass of its own.
//!
//! Written out because the portable form, compiled for these paths, kept
//! its sums in registers but not its epilogue: LLVM left the per-segment
//! bias, activation and partial store as scalar code through the stack
//! (MobileNetV2's 144-channel 56×56 depthwise conv took 273 µs on Zen 4,
//! a third of it outside the multiply-adds).

use super::{Plane, UNITS};
use crate::cpu::epilogue::vector_activation;
use crate::cpu::prefetch;
use wick_ir::Activation;

/// Defines `$name`, the segments of one plane on a SIMD path. The
/// piecewise-linear activations use the vector min/max (operands ordered
/// as `f32::clamp` and `f32::max` treat NaN), sigmoid and SiLU the path's
/// `$sigmoid`.
macro_rules! simd_body {
    ($name:ident, $feature:literal, $vector:ty, $lanes:expr,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident,
     $load_part:ident, $store_part:ident, $sigmoid:path) => {
        /// # Safety
        /// The CPU has the path's features; `p.reach <= p.phases.len()`
        /// and `p.reach >= unit.read + offset + LANES` for every unit and
        /// offset of `p`; `p.weight` has an entry per offset; `p.out` (and
        /// `p.residual`, if any) hold `unit.write + unit.len` values for
        /// every unit.
        #[target_feature(enable = $feature)]
        pub(crate) unsafe fn $name(p: Plane) {
            const LANES: usize = $lanes;
            // SAFETY: every read is within `reach` of the phases, every
            // write within `out` (the caller's contract): a whole vector
            // only where it ends inside `out`, masked to `len` values
            // otherwise (likewise for the residual).
            unsafe {
                let base = p.phases.as_ptr();
                let out = p.out.as_mut_ptr().cast::<f32>();
                let bias = $set1(p.bias);
                // The next group's output lines asked for ahead of its
                // stores (the other thread may hold them: [`prefetch`]).
                let hint = prefetch::available();
                for group in p.units.chunks_exact(UNITS) {
                    if hint {
                        let ahead = out.wrapping_add(group[0].write + UNITS * LANES);
                        for line in (0..UNITS * LANES).step_by(16) {
                            prefetch::write_line(true, ahead.wrapping_add(line));
                        }
                    }
                    let mut acc = [$zero(); UNITS];
                    for (&offset, &w) in p.offsets.iter().zip(p.weight) {
                        let w = $set1(w);
                        for (acc, unit) in acc.iter_mut().zip(group) {
                            *acc = $fmadd(w, $load(base.add(unit.read + offset)), *acc);
                        }
                    }
                    for (&acc, unit) in acc.iter().zip(group) {
                        if unit.len == 0 {
                            continue;
                        }
                        let mut v = $add(acc, bias);
                        // A whole vector is stored wherever it stays inside
                        // the plane, also for a row's last (partial)
                        // segment: the values past it belong to later units
                        // (units go in write order, one plane per call),
                        // which store over them. Only the plane's end is
                        // masked (AVX2's masked store is slow on Zen).
                        let full = unit.write + LANES <= p.out.len();
                        if let Some(r) = p.residual {
                            let r = r.as_ptr().add(unit.write);
                            v = $add(v, if full { $load(r) } else { $load_part(r, unit.len) });
                        }
                        // The activation, in registers (as a closure it
                        // stayed a call per segment on AVX2).
                        let v = vector_activation!(p.activation, v, $set1, $zero, $add, $mul, $max, $min, $sigmoid);
                        if full {
                            $store(out.add(unit.write), v);
                        } else {
                            $store_part(out.add(unit.write), v, unit.len);
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The first `len < 16` values at `p`, zeros after (masked: nothing
    /// past them is read).
    ///
    /// # Safety
    /// AVX-512F; `p` has `len` readable values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_part_avx512(p: *const f32, len: usize) -> __m512 {
        // SAFETY: only the first `len` lanes are read (the caller's contract).
        unsafe { _mm512_maskz_loadu_ps(((1u32 << len) - 1) as __mmask16, p) }
    }

    /// Stores the first `len < 16` lanes of `v` at `p` (masked: nothing
    /// past them is written).
    ///
    /// # Safety
    /// AVX-512F; `p` has `len` writable values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_part_avx512(p: *mut f32, v: __m512, len: usize) {
        // SAFETY: only the first `len` lanes are written (the caller's contract).
        unsafe { _mm512_mask_storeu_ps(p, ((1u32 << len) - 1) as __mmask16, v) }
    }

    /// The lane mask of the first `len < 8` lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn part_mask_avx2(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// As [`load_part_avx512`], 8 lanes.
    ///
    /// # Safety
    /// AVX2; `p` has `len` readable values.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_part_avx2(p: *const f32, len: usize) -> __m256 {
        // SAFETY: masked lanes are not read (the caller's contract covers the rest).
        unsafe { _mm256_maskload_ps(p, part_mask_avx2(len)) }
    }

    /// As [`store_part_avx512`], 8 lanes.
    ///
    /// # Safety
    /// AVX2; `p` has `len` writable values.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_part_avx2(p: *mut f32, v: __m256, len: usize) {
        // SAFETY: masked lanes are not written (the caller's contract covers the rest).
        unsafe { _mm256_maskstore_ps(p, part_mask_avx2(len), v) }
    }

    #[rustfmt::skip]
    simd_body!(segments_avx512, "avx512f", __m512, 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
        _mm512_add_ps, _mm512_mul_ps, _mm512_max_ps, _mm512_min_ps,
        load_part_avx512, store_part_avx512, crate::cpu::activation::sigmoid_avx512);
    #[rustfmt::skip]
    simd_body!(segments_avx2, "avx2,fma", __m256, 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
        _mm256_add_ps, _mm256_mul_ps, _mm256_max_ps, _mm256_min_ps,
        load_part_avx2, store_part_avx2, crate::cpu::activation::sigmoid_avx2);
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{segments_avx2, segments_avx512};
