//! The lane product's chunk kernels on AVX-512 (tiles of up to 12 pixels,
//! 24 accumulators) and AVX2 (up to 6), the weights' next chunk
//! prefetched as they go.

use super::{Ahead, Chunk, Prefetch, LANES, MAX_TILE};
use std::arch::x86_64::*;

/// [`super::chunk_scalar`] on AVX-512F, in tiles of up to
/// [`MAX_TILE`] pixels (tiles of equal size, so no tiny remainder).
///
/// The first tile reads the chunk's weights from memory, the others
/// from L1; each prefetches its share of the next ones (`next`) into
/// L2 ([`Ahead`]).
///
/// # Safety
/// AVX-512F; `wg` has `kc·32` values, `v` `kc` rows of `cols` (the
/// last may end after `pixels`), `mg` `pixels·32`; `pixels <= cols`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn chunk_avx512(c: &Chunk<'_>, mg: &mut [f32]) {
    let Chunk {
        wg,
        next,
        v,
        kc,
        cols,
        pixels,
        first,
        ..
    } = *c;
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (tiles, each) = equal_tiles(pixels, MAX_TILE);
        for (t, (p0, r)) in each.enumerate() {
            let (vp, mp) = (v.as_ptr().add(p0), mg.as_mut_ptr().add(p0 * LANES));
            macro_rules! dispatch {
                ($($n:literal)*) => {
                    let ahead = Ahead::share(next.unwrap_or(wg.as_ptr()), t, tiles);
                    match (r, next.is_some()) {
                        $(($n, true) => tile_avx512::<$n, true>(wg.as_ptr(), ahead, vp, mp, kc, cols, first),
                          ($n, false) => tile_avx512::<$n, false>(wg.as_ptr(), ahead, vp, mp, kc, cols, first),)*
                        _ => unreachable!("tile of {r} pixels"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
        }
    }
}

/// `pixels` as tiles of at most `max`, sizes differing by at most one
/// (no tiny remainder): how many, and `(first pixel, pixels)` each.
fn equal_tiles(pixels: usize, max: usize) -> (usize, impl Iterator<Item = (usize, usize)>) {
    let tiles = pixels.div_ceil(max.max(1));
    let each = (0..tiles).scan(0, move |p0, t| {
        let (first, r) = (*p0, (pixels - *p0).div_ceil(tiles - t));
        *p0 += r;
        Some((first, r))
    });
    (tiles, each)
}

/// Most pixels per AVX2 micro-tile.
const AVX2_TILE: usize = 6;

/// [`super::chunk_scalar`] on AVX2 + FMA, in tiles of up to
/// [`AVX2_TILE`] pixels × 16 lanes (half a lane group): 12 accumulators,
/// per depth step 2 loads of `w` and one broadcast of `v` per pixel for
/// 12 FMAs (two pixels × 32 lanes, 8 accumulators, loaded 6 values per
/// 8 FMAs and left the FMA latency barely covered: ResNet18's layer4
/// F(2×2) convs, alternating forwards on Zen 3, 0.91-0.95× the time at
/// batch 10 and 0.95× at batch 1; its lane-layout direct convs 0.92-0.96×).
///
/// # Safety
/// As [`chunk_avx512`], with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn chunk_avx2(c: &Chunk<'_>, mg: &mut [f32]) {
    let Chunk {
        wg,
        next,
        v,
        kc,
        cols,
        pixels,
        first,
        halves,
    } = *c;
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (tiles, each) = equal_tiles(pixels, AVX2_TILE);
        for (t, (p0, r)) in each.enumerate() {
            let (vp, mp) = (v.as_ptr().add(p0), mg.as_mut_ptr().add(p0 * LANES));
            for (half, _) in [0, 16].into_iter().zip(halves).filter(|(_, computed)| *computed) {
                let (wp, mp) = (wg.as_ptr().add(half), mp.add(half));
                // Each tile's first computed half prefetches its share of
                // both halves' next chunk (as on AVX-512).
                let prefetches = (half == 0 || !halves[0]) && next.is_some();
                let ahead = Ahead::share(next.unwrap_or(wp), t, tiles);
                macro_rules! dispatch {
                    ($($n:literal)*) => {
                        match (r, prefetches) {
                            $(($n, true) => tile_avx2::<$n, true>(wp, ahead, vp, mp, kc, cols, first),
                              ($n, false) => tile_avx2::<$n, false>(wp, ahead, vp, mp, kc, cols, first),)*
                            _ => unreachable!("tile of {r} pixels"),
                        }
                    };
                }
                dispatch!(1 2 3 4 5 6);
            }
        }
    }
}

/// Defines `$name::<R, AHEAD>`: `R` pixels × two vectors of `$lanes`
/// lanes (`2·R` accumulators in registers across the chunk; on AVX-512
/// one call covers the 32 lanes of a group, on AVX2 one half). With
/// `AHEAD`, the tile's depth steps also prefetch its share ([`Ahead`])
/// of the weights the task reads next (its next lane group's chunk, or
/// after its last group its first group's next chunk; on AVX2 both
/// halves' lines, from each tile's first half), so the next chunk is on
/// its way from memory while this one is computed; at batch 1 the
/// weights come from DRAM (ResNet18's layer4 convs stream 9.4 MB each).
/// With the first tile prefetching a step every step (before the
/// fifty-sixth session), ResNet18 at batch 1 on the Intel Xeon VM
/// (AVX-512, 2 threads; forwards of one compiled model alternating with
/// the earlier scheme, every tile prefetching 16 depth steps ahead into
/// L1): 0.97× the time in six runs of 100 forwards; ResNet50 and
/// MobileNetV2 / EfficientNet-B0 at batch 1 and ResNet18 at batch 10
/// level (0.99-1.01×). Until the fiftieth session the target was always
/// the chunk right after this one in the packed stream, which after a
/// task's last group is another task's (tasks own runs of groups, the
/// next chunk of theirs is a chunk's worth of groups on): with the real
/// next chunk, `scripts/ab_builds.py` on the Intel Xeon VM (AVX-512),
/// MobileNetV2 0.990×, ResNet50 0.993×, EfficientNet-B0 0.995×, ResNet18
/// 0.994× (batch 1; AVX2 forced level), after the same change in
/// [`lane_gathered`](crate::cpu::gemm::lane_gathered). AVX2 forced on the
/// Intel Xeon VM, alternating forwards against no prefetch: ResNet18
/// batch 1 0.93-0.95× the time, ResNet50 batch 1 0.98×, ResNet18 batch 10
/// level. The same body as the gathered product's tiles, but for where
/// each pixel comes from (here `vp[d·cols + i]`, a row per depth step).
macro_rules! chunk_tile {
    ($name:ident, $feature:literal, $lanes:expr, $zero:ident, $load:ident, $splat:ident,
     $fmadd:ident, $store:ident) => {
        /// # Safety
        /// The path's features; reads `wp[d·32..][..2·lanes]` and
        /// `vp[d·cols + i]` for `d < kc`, `i < R`, reads/writes
        /// `mp[i·32..][..2·lanes]`.
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn $name<const R: usize, const AHEAD: bool>(
            wp: *const f32,
            ahead: Ahead,
            vp: *const f32,
            mp: *mut f32,
            kc: usize,
            cols: usize,
            first: bool,
        ) {
            // SAFETY: the caller upholds this function's `# Safety` contract.
            unsafe {
                let mut acc = [[$zero(); 2]; R];
                if !first {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        acc[0] = $load(mp.add(i * LANES));
                        acc[1] = $load(mp.add(i * LANES + $lanes));
                    }
                }
                let (mut wp, mut vp, mut prefetch) = (wp, vp, Prefetch::new(ahead));
                for _ in 0..kc {
                    if AHEAD {
                        prefetch.step();
                    }
                    let (w0, w1) = ($load(wp), $load(wp.add($lanes)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let a = $splat(*vp.add(i));
                        acc[0] = $fmadd(a, w0, acc[0]);
                        acc[1] = $fmadd(a, w1, acc[1]);
                    }
                    wp = wp.add(LANES);
                    vp = vp.add(cols);
                }
                for (i, acc) in acc.iter().enumerate() {
                    $store(mp.add(i * LANES), acc[0]);
                    $store(mp.add(i * LANES + $lanes), acc[1]);
                }
            }
        }
    };
}

#[rustfmt::skip]
chunk_tile!(tile_avx512, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
    _mm512_storeu_ps);
#[rustfmt::skip]
chunk_tile!(tile_avx2, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
    _mm256_storeu_ps);
