//! One pooled row of a max pool from its window's input rows, with SIMD
//! kernels for ResNet's window (3 wide, stride 2, padding 1) that keep the
//! column maxima in registers: the general path ([`max_rows`] then
//! [`pool_row`]) stores them and reads them straight back one and two
//! columns on, loads that straddle two vector stores still in flight,
//! which the store buffer cannot forward (`perf`: a quarter of ResNet18's
//! fused stem at batch 10 on an Emerald Rapids Xeon, on the compare after
//! such a load).

use crate::cpu::epilogue::in_place;
use crate::cpu::gemm::Isa;
use crate::cpu::pool::{max_rows, pool_row};
use wick_ir::Activation;

/// `out[x]` = the max over `rows` (whole rows of `width`, at least one)
/// and columns `x·stride − pad .. + kernel` clipped to the row, `[kernel,
/// stride, pad]` = `window`, `pad <= kernel / 2`, then `act(max + bias)`
/// with `epilogue` = `(bias, act)` if given (in registers on the SIMD
/// kernels); `column_max` and `window_max` are scratch of `width` values.
/// NaN wins, as in [`crate::cpu::pool::nan_max`]. Inlined into the
/// caller's [`Isa::run`] body, so the general path vectorises for `isa` too.
#[inline(always)]
pub(crate) fn pool_window_row(
    isa: Isa,
    rows: &[f32],
    width: usize,
    window: [usize; 3],
    [column_max, window_max]: [&mut [f32]; 2],
    out: &mut [f32],
    epilogue: Option<(f32, Option<Activation>)>,
) {
    // Element by element: `window == [3, 2, 1]` compiled to three stores
    // and one 16-byte load of them, which the store buffer cannot forward
    // (a stall per pooled row).
    let [kernel, stride, pad] = window;
    let resnet = kernel == 3
        && stride == 2
        && pad == 1
        && width > 0
        && rows.len().is_multiple_of(width)
        && out.len() <= width.div_ceil(2);
    match isa {
        // SAFETY: AVX-512F is only handed out where the CPU has it; the
        // row count and widths were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if resnet => return unsafe { x86::resnet_avx512(rows, width, out, epilogue) },
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if resnet => return unsafe { x86::resnet_avx2(rows, width, out, epilogue) },
        _ => {}
    }
    max_rows(rows, width, column_max);
    pool_row(column_max, window, window_max, out);
    if let Some((bias, activation)) = epilogue {
        in_place(out, bias, None, activation);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::cpu::activation::{sigmoid_avx2, sigmoid_avx512};
    use crate::cpu::epilogue::vector_activation;
    use std::arch::x86_64::*;
    use wick_ir::Activation;

    /// `a` unless `b` is larger or NaN, `a` when `a` is NaN: `nan_max`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn nan_max512(a: __m512, b: __m512) -> __m512 {
        let a_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
        _mm512_mask_mov_ps(_mm512_max_ps(a, b), a_nan, a)
    }

    /// The column maxima over `rows` (rows `width` apart) of the 16
    /// columns from `at`, −∞ past `width`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn column_max512(rows: &[f32], width: usize, at: usize) -> __m512 {
        let inside = width.saturating_sub(at).min(16);
        let mask: __mmask16 = ((1u32 << inside) - 1) as __mmask16;
        let low = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = low;
        for (r, row) in rows.chunks_exact(width).enumerate() {
            // SAFETY: lanes past `inside` are masked off (never read);
            // `at + inside <= width` within this row.
            let v = unsafe { _mm512_mask_loadu_ps(low, mask, row.as_ptr().add(at.min(width))) };
            acc = if r == 0 { v } else { nan_max512(acc, v) };
        }
        acc
    }

    /// `out[x] = max(c[2x − 1], c[2x], c[2x + 1])` over the valid columns,
    /// `c` the column maxima of `rows`; 16 outputs per step from the 32
    /// columns `2x0..`, split into even and odd ones, the previous odd
    /// column carried across steps in a register.
    ///
    /// # Safety
    /// AVX-512F; `rows` is whole rows of `width` (> 0) and `out.len() <=
    /// ceil(width / 2)`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn resnet_avx512(
        rows: &[f32],
        width: usize,
        out: &mut [f32],
        epilogue: Option<(f32, Option<Activation>)>,
    ) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let mut carry = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut last = [0f32; 16];
        for x0 in (0..out.len()).step_by(16) {
            // SAFETY: the loads are masked to each row (`column_max512`).
            let (a, b) = unsafe {
                (
                    column_max512(rows, width, 2 * x0),
                    column_max512(rows, width, 2 * x0 + 16),
                )
            };
            let (e, o) = (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
            // Column 2x − 1: the odd columns one lane up, the last step's
            // last odd column in lane 0.
            let p = _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(o),
                _mm512_castps_si512(carry),
            ));
            carry = o;
            // Order as the general path: the window's columns left to right.
            let mut v = nan_max512(nan_max512(p, e), o);
            if let Some((bias, activation)) = epilogue {
                v = vector_activation!(
                    activation,
                    _mm512_add_ps(v, _mm512_set1_ps(bias)),
                    _mm512_set1_ps,
                    _mm512_setzero_ps,
                    _mm512_add_ps,
                    _mm512_mul_ps,
                    _mm512_max_ps,
                    _mm512_min_ps,
                    sigmoid_avx512
                );
            }
            // Whole stores (a masked store cannot forward to the loads
            // of the epilogue that reads the row next: a stall per row).
            let n = (out.len() - x0).min(16);
            if n == 16 {
                // SAFETY: 16 outputs from `x0`, within `out`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(x0), v) };
            } else {
                // SAFETY: a local array of 16.
                unsafe { _mm512_storeu_ps(last.as_mut_ptr(), v) };
                out[x0..].copy_from_slice(&last[..n]);
            }
        }
    }

    /// [`nan_max512`] on AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn nan_max256(a: __m256, b: __m256) -> __m256 {
        let a_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a);
        _mm256_blendv_ps(_mm256_max_ps(a, b), a, a_nan)
    }

    /// [`column_max512`] for 8 columns on AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn column_max256(rows: &[f32], width: usize, at: usize) -> __m256 {
        let inside = width.saturating_sub(at).min(8) as i32;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(inside), lanes);
        let low = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut acc = low;
        for (r, row) in rows.chunks_exact(width).enumerate() {
            // SAFETY: lanes past `inside` are masked off (never read).
            let v = unsafe { _mm256_maskload_ps(row.as_ptr().add(at.min(width)), mask) };
            let v = _mm256_blendv_ps(low, v, _mm256_castsi256_ps(mask));
            acc = if r == 0 { v } else { nan_max256(acc, v) };
        }
        acc
    }

    /// [`resnet_avx512`] with 8 outputs per step.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`resnet_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn resnet_avx2(
        rows: &[f32],
        width: usize,
        out: &mut [f32],
        epilogue: Option<(f32, Option<Activation>)>,
    ) {
        let up = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
        let mut carry = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut last = [0f32; 8];
        for x0 in (0..out.len()).step_by(8) {
            // SAFETY: the loads are masked to each row (`column_max256`).
            let (a, b) = unsafe {
                (
                    column_max256(rows, width, 2 * x0),
                    column_max256(rows, width, 2 * x0 + 8),
                )
            };
            // Even and odd columns: within 128-bit lanes, then the 64-bit
            // halves in order.
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xd8>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0x88>(a, b),
            )));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xd8>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0xdd>(a, b),
            )));
            let p = _mm256_blend_ps::<1>(_mm256_permutevar8x32_ps(o, up), _mm256_permutevar8x32_ps(carry, up));
            carry = o;
            let mut v = nan_max256(nan_max256(p, e), o);
            if let Some((bias, activation)) = epilogue {
                v = vector_activation!(
                    activation,
                    _mm256_add_ps(v, _mm256_set1_ps(bias)),
                    _mm256_set1_ps,
                    _mm256_setzero_ps,
                    _mm256_add_ps,
                    _mm256_mul_ps,
                    _mm256_max_ps,
                    _mm256_min_ps,
                    sigmoid_avx2
                );
            }
            let n = (out.len() - x0).min(8);
            if n == 8 {
                // SAFETY: 8 outputs from `x0`, within `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(x0), v) };
            } else {
                // SAFETY: a local array of 8.
                unsafe { _mm256_storeu_ps(last.as_mut_ptr(), v) };
                out[x0..].copy_from_slice(&last[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// ResNet's window on every path equals the general path (NaN
        /// where it has NaN; the maxima exactly, the activation after them
        /// within 8 ulp: its vector and scalar forms differ), for 1 to 3 rows of any width from 1 to
        /// several vectors, with NaNs and infinities in the rows, with or
        /// without a bias and any activation after the max.
        #[test]
        fn paths_equal_the_general_path(
            width in 1usize..80, count in 1usize..4, seed in any::<u64>(),
            specials in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..3), 0..3),
            epilogue in proptest::option::of((-1f32..1.0, proptest::option::of(0usize..6))),
        ) {
            let epilogue = epilogue.map(|(bias, a)| (bias, a.map(|i| Activation::ALL[i])));
            let mut next = crate::test_util::uniform(seed);
            let mut rows: Vec<f32> = (0..width * count).map(|_| next()).collect();
            let len = rows.len();
            for (at, kind) in specials {
                rows[at.index(len)] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind];
            }
            let pooled = (width + 2 - 3) / 2 + 1;
            let mut want = vec![0f32; pooled];
            let (mut c, mut w) = (vec![0f32; width], vec![0f32; width]);
            max_rows(&rows, width, &mut c);
            pool_row(&c, [3, 2, 1], &mut w, &mut want);
            if let Some((bias, activation)) = epilogue {
                in_place(&mut want, bias, None, activation);
            }
            for isa in Isa::available() {
                let mut got = vec![7f32; pooled];
                pool_window_row(isa, &rows, width, [3, 2, 1], [&mut c, &mut w], &mut got, epilogue);
                for (x, (a, b)) in got.iter().zip(&want).enumerate() {
                    let close = (a - b).abs() <= 8.0 * f32::EPSILON * b.abs().max(f32::MIN_POSITIVE);
                    prop_assert!(a == b || (a.is_nan() && b.is_nan()) || close, "{isa:?} x{x}: {a} vs {b}");
                }
            }
        }
    }
}
