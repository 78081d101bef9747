//! The gathered lane product's tiles on AVX-512 and AVX2: each pixel
//! broadcast from where the table of offsets says.

use super::{Ahead, Chunk, LaneTile, LANES};
use crate::cpu::gemm::lane::Prefetch;
use std::arch::x86_64::*;

/// [`super::tile_scalar`] on AVX-512F: dispatches the tile's shape.
///
/// # Safety
/// AVX-512F; the operands as [`super::lane_gemm_gathered`] checks them,
/// at most [`super::AVX512_TILE`] pixels.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_avx512(c: &Chunk<'_>, t: &LaneTile, mg: &mut [f32]) {
    let kc = c.table.len();
    let (wp, tab) = (c.wg.as_ptr(), c.table.as_ptr());
    // SAFETY: the caller upholds this function's `# Safety` contract;
    // the pointers below are the tile's first value and pixel.
    unsafe {
        let dp = c.data.as_ptr().add(t.start);
        let mp = mg.as_mut_ptr().add(t.col * LANES);
        let (pitch, mpitch) = (t.pitch, [t.col_pitch * LANES, t.col_step * LANES]);
        macro_rules! dispatch {
            ($($w:literal $h:literal),*) => {
                let ahead = c.ahead.unwrap_or(Ahead::share(wp, 0, 1));
                match (t.width, t.rows, c.ahead.is_some(), t.step) {
                    $(($w, $h, true, 1) => avx512::<$w, $h, true, 1>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                      ($w, $h, false, 1) => avx512::<$w, $h, false, 1>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                      ($w, $h, true, 2) => avx512::<$w, $h, true, 2>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                      ($w, $h, false, 2) => avx512::<$w, $h, false, 2>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),)*
                    _ => unreachable!("tile of {} x {} pixels, step {}", t.rows, t.width, t.step),
                }
            };
        }
        dispatch!(1 1, 2 1, 3 1, 4 1, 5 1, 6 1, 7 1, 8 1, 9 1, 10 1, 11 1, 12 1, 13 1, 14 1,
                  1 2, 2 2, 3 2, 4 2, 5 2, 6 2, 7 2);
    }
}

/// [`super::tile_scalar`] on AVX2 + FMA, half a lane group (16 lanes)
/// at a time.
///
/// # Safety
/// AVX2 and FMA; the operands as [`super::lane_gemm_gathered`] checks
/// them, at most [`super::AVX2_TILE`] pixels.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2(c: &Chunk<'_>, t: &LaneTile, mg: &mut [f32]) {
    let kc = c.table.len();
    let tab = c.table.as_ptr();
    // SAFETY: as in `tile_avx512`; each half reads its 16 lanes of the
    // weights and products.
    unsafe {
        let dp = c.data.as_ptr().add(t.start);
        let (pitch, mpitch) = (t.pitch, [t.col_pitch * LANES, t.col_step * LANES]);
        for half in [0, 16] {
            let (wp, mp) = (c.wg.as_ptr().add(half), mg.as_mut_ptr().add(t.col * LANES + half));
            let prefetches = c.ahead.is_some() && half == 0;
            let ahead = c.ahead.unwrap_or(Ahead::share(wp, 0, 1));
            macro_rules! dispatch {
                ($($w:literal $h:literal),*) => {
                    match (t.width, t.rows, prefetches, t.step) {
                        $(($w, $h, true, 1) => avx2::<$w, $h, true, 1>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                          ($w, $h, false, 1) => avx2::<$w, $h, false, 1>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                          ($w, $h, true, 2) => avx2::<$w, $h, true, 2>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),
                          ($w, $h, false, 2) => avx2::<$w, $h, false, 2>(wp, ahead, tab, dp, pitch, mp, mpitch, kc, c.first),)*
                        _ => unreachable!("tile of {} x {} pixels, step {}", t.rows, t.width, t.step),
                    }
                };
            }
            dispatch!(1 1, 2 1, 3 1, 4 1, 5 1, 6 1, 1 2, 2 2, 3 2, 1 3, 2 3, 1 4, 1 5, 1 6);
        }
    }
}

/// Defines `$name::<W, H, AHEAD, S>`: `H` runs of `W` pixels `S` values
/// apart × two vectors of `$lanes` lanes (`2·W·H` accumulators across
/// the chunk); per depth step two loads of weights and a broadcast per
/// pixel from its row (`S` a constant, so each broadcast's address is
/// the row's plus a fixed displacement). With `AHEAD`, the tile's share
/// of the weights read next (`ahead`) is prefetched into L2 as it goes,
/// as in the im2col product's tiles (both halves' lines on AVX2, from
/// its first half). The one body both paths share: on
/// AVX-512 one call covers the 32 lanes of a group, on AVX2 one half.
macro_rules! micro_tile {
    ($name:ident, $feature:literal, $lanes:expr, $zero:ident, $load:ident, $splat:ident,
     $fmadd:ident, $store:ident) => {
        /// # Safety
        /// The path's features; reads `wp[d·32..][..2·lanes]`,
        /// `tab[..kc]`, `dp[tab[d] + j·pitch + i·S]` for `j < H`, `i <
        /// W`, reads/writes `mp[j·mpitch[0] + i·mpitch[1]..][..2·lanes]`.
        #[inline]
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const W: usize, const H: usize, const AHEAD: bool, const S: usize>(
            wp: *const f32,
            ahead: Ahead,
            tab: *const usize,
            dp: *const f32,
            pitch: usize,
            mp: *mut f32,
            mpitch: [usize; 2],
            kc: usize,
            first: bool,
        ) {
            // SAFETY: the caller upholds this function's `# Safety` contract.
            unsafe {
                let mut acc = [[[$zero(); 2]; W]; H];
                if !first {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let at = mp.add(j * mpitch[0] + i * mpitch[1]);
                            *acc = [$load(at), $load(at.add($lanes))];
                        }
                    }
                }
                let (mut wp, mut prefetch) = (wp, Prefetch::new(ahead));
                for d in 0..kc {
                    if AHEAD {
                        prefetch.step();
                    }
                    let row = dp.add(*tab.add(d));
                    let (w0, w1) = ($load(wp), $load(wp.add($lanes)));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let row = row.add(j * pitch);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let a = $splat(*row.add(i * S));
                            acc[0] = $fmadd(a, w0, acc[0]);
                            acc[1] = $fmadd(a, w1, acc[1]);
                        }
                    }
                    wp = wp.add(LANES);
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (i, acc) in acc.iter().enumerate() {
                        let at = mp.add(j * mpitch[0] + i * mpitch[1]);
                        $store(at, acc[0]);
                        $store(at.add($lanes), acc[1]);
                    }
                }
            }
        }
    };
}

#[rustfmt::skip]
micro_tile!(avx512, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
    _mm512_storeu_ps);
#[rustfmt::skip]
micro_tile!(avx2, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
    _mm256_storeu_ps);
