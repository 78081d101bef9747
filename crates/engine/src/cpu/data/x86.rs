//! The gathers' AVX-512 bodies: a stride-2 gather by permutes, and the
//! three taps of a 3-wide stride-2 kernel row from one pass over the line.

use std::arch::x86_64::*;

/// [`super::gather_stride2_taps3`]: per 16 outputs, the 33 values
/// from `start + 32j` on in three masked loads (lanes outside `line`
/// off, so zero), the even, odd and next-even positions permuted out of
/// them, and masked stores of the outputs' lanes.
///
/// # Safety
/// AVX-512F; `start + 2·(outs' length + 16) + 48` fits an isize.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn stride2_taps3_avx512(line: &[f32], start: isize, outs: [&mut [f32]; 3]) {
    let n = outs[0].len();
    let len = line.len() as isize;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // Positions 2..=30 by two, and 31 in the last lane (replaced by
    // position 32, the third load's first lane).
    let next = _mm512_setr_epi32(2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 31);
    // Lanes `l` of a load at `p` with `0 <= p + l < len`.
    let inside = |p: isize| -> __mmask16 {
        let (lo, hi) = ((-p).clamp(0, 16) as u32, (len - p).clamp(0, 16) as u32);
        match hi > lo {
            true => (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as __mmask16,
            false => 0,
        }
    };
    let base = line.as_ptr();
    let [o0, o1, o2] = outs.map(|out| out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: every load's lanes are masked to `0..len` of `line` (a
    // masked-off lane is not read and does not fault; the pointers are
    // formed with wrapping arithmetic); the stores' lanes below `n`.
    unsafe {
        while i < n {
            let p = start + 2 * i as isize;
            let a = _mm512_maskz_loadu_ps(inside(p), base.wrapping_offset(p));
            let b = _mm512_maskz_loadu_ps(inside(p + 16), base.wrapping_offset(p + 16));
            let c = _mm512_maskz_loadu_ps(inside(p + 32) & 1, base.wrapping_offset(p + 32));
            let third = _mm512_permutex2var_ps(a, next, b);
            let third = _mm512_mask_broadcastss_ps(third, 1 << 15, _mm512_castps512_ps128(c));
            let store = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
            _mm512_mask_storeu_ps(o0.add(i), store, _mm512_permutex2var_ps(a, even, b));
            _mm512_mask_storeu_ps(o1.add(i), store, _mm512_permutex2var_ps(a, odd, b));
            _mm512_mask_storeu_ps(o2.add(i), store, third);
            i += 16;
        }
    }
}

/// `out[k] = src[2k]`, 16 at a time; masked loads for the values past
/// `src`'s end that a vector would reach (never read: a masked lane
/// does not fault), a masked store for the last vector.
///
/// # Safety
/// AVX-512F; `src` holds `2(out.len() − 1) + 1` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn stride2_avx512(src: &[f32], out: &mut [f32]) {
    let n = out.len();
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mask = |lanes: usize| -> __mmask16 { ((1u32 << lanes.min(16)) - 1) as __mmask16 };
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    let mut k = 0;
    // SAFETY: the lanes read lie below 2(n − 1) + 1 (`avail`), within
    // `src` (a masked-off lane is not read, and does not fault); the
    // lanes stored below n.
    unsafe {
        while k < n {
            let take = (n - k).min(16);
            let avail = 2 * take - 1;
            let lo = _mm512_maskz_loadu_ps(mask(avail), s.add(2 * k));
            // Wrapping: past `src`'s end when every lane is masked off.
            let hi = _mm512_maskz_loadu_ps(mask(avail.saturating_sub(16)), s.wrapping_add(2 * k + 16));
            let v = _mm512_permutex2var_ps(lo, even, hi);
            _mm512_mask_storeu_ps(o.add(k), mask(take), v);
            k += 16;
        }
    }
}
