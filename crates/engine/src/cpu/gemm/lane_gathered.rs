//! The lane product with the pixels' operand read in place through a
//! table of offsets: `m[g][p][l] = Σ_d w[g·LANES + l][d] · data[table[d] +
//! at(p)]`, the direct conv's lane layout without im2col. Row `d = (c, ky,
//! kx)` of the im2col columns of an output row is a run of values `step`
//! apart at `table[d]` past the row's start: in the conv's input itself at
//! the conv's stride (`conv::direct::unpadded`), or consecutive in a copy
//! (the column phases of `conv::direct::phased`, the im2col columns of a
//! few border pixels); each micro-tile broadcasts its pixels from there
//! (one or two output rows) as [`super::lane_gemm`] broadcasts them from
//! the copied columns, in the same order of sums.

use super::lane::{chunk_offset, next_chunk_offset, Ahead, LANES, LANE_CHUNK};
use super::{Gathered, Isa};
use std::ops::Range;

/// Most pixels per AVX-512 tile (`2·pixels` accumulators of the 32).
pub(crate) const AVX512_TILE: usize = 14;
/// Most pixels per AVX2 tile (`2·pixels` accumulators of the 16, half a
/// lane group at a time).
pub(crate) const AVX2_TILE: usize = 6;

/// Most pixels per tile on `isa`.
pub(crate) fn max_tile(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => AVX512_TILE,
        Isa::Avx2Fma | Isa::Scalar => AVX2_TILE,
    }
}

/// Most runs (output rows) per tile on `isa`: two on AVX-512 (its tiles
/// of 2 × 7 cover a 7-wide plane's row pairs whole), up to the tile's six
/// pixels on AVX2 (a 7-wide plane in columns of 6 × 1: 5.4 pixels a tile
/// against 4.5 in row pairs of 2 × 3 and 2 × 2).
pub(crate) fn max_runs(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 2,
        Isa::Avx2Fma | Isa::Scalar => AVX2_TILE,
    }
}

/// A micro-tile: `rows` (at most [`max_runs`]) runs of `width` pixels; run `j`'s pixel
/// `i` reads `data[table[d] + start + j·pitch + i·step]` (`step` 1 or 2)
/// and is pixel `col + j·col_pitch + i·col_step` of the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneTile {
    pub(crate) start: usize,
    pub(crate) pitch: usize,
    /// Values between a run's pixels in the data: 1 or [`MAX_STEP`].
    pub(crate) step: usize,
    pub(crate) col: usize,
    pub(crate) col_pitch: usize,
    /// Product pixels between a run's pixels.
    pub(crate) col_step: usize,
    pub(crate) width: usize,
    pub(crate) rows: usize,
}

/// The widest step between a run's pixels in the data (a stride-2 conv's
/// input read in place).
pub(crate) const MAX_STEP: usize = 2;

impl LaneTile {
    /// The tile's furthest offset into the data past a table entry and its
    /// last pixel, if they fit `usize`.
    fn reach(&self) -> Option<(usize, usize)> {
        let last = self.rows.checked_sub(1)?;
        let within = self.width.checked_sub(1)?;
        let data = last
            .checked_mul(self.pitch)?
            .checked_add(self.start)?
            .checked_add(within.checked_mul(self.step)?)?;
        let pixel = last
            .checked_mul(self.col_pitch)?
            .checked_add(self.col)?
            .checked_add(within.checked_mul(self.col_step)?)?;
        Some((data, pixel))
    }
}

/// Where some of a product's pixels are read: the data and its table,
/// and the tiles that read them.
pub(crate) struct Source<'a> {
    pub(crate) v: Gathered<'a>,
    pub(crate) tiles: Vec<LaneTile>,
}

/// Lane groups `groups` of the product (see the module docs) over the
/// tiles of every source, each chunk of weights read once for all of
/// them: `w` packed by [`super::pack_lanes`] with `rows` rows (a multiple
/// of [`LANES`]) and the depth of every source's table, `m`
/// `[groups.len()][pixels][LANES]`; each tile at most [`max_tile`]
/// pixels; `isa` one of [`Isa::available`]. Panics when an operand is
/// short, the tables' depths differ or a tile is out of bounds (checked
/// arithmetic).
pub(crate) fn lane_gemm_gathered(
    isa: Isa,
    (w, rows): (&[f32], usize),
    sources: &[Source],
    (m, pixels): (&mut [f32], usize),
    groups: Range<usize>,
) {
    let depth = sources.first().map_or(0, |s| s.v.table.len());
    assert!(
        sources.iter().all(|s| s.v.table.len() == depth),
        "tables of different depths"
    );
    assert!(rows.is_multiple_of(LANES) && groups.end <= rows / LANES);
    assert!(rows.checked_mul(depth).is_some_and(|n| w.len() >= n));
    assert!(groups
        .len()
        .checked_mul(pixels)
        .and_then(|n| n.checked_mul(LANES))
        .is_some_and(|n| m.len() >= n));
    for Source { v, tiles } in sources {
        let far = v.table.iter().copied().max().unwrap_or(0);
        for tile in tiles {
            assert!((1..=max_runs(isa)).contains(&tile.rows) && tile.width.saturating_mul(tile.rows) <= max_tile(isa));
            assert!((1..=MAX_STEP).contains(&tile.step), "tile step {}", tile.step);
            let reach = tile.reach();
            assert!(
                reach.is_some_and(
                    |(data, pixel)| data.checked_add(far).is_some_and(|d| d < v.data.len()) && pixel < pixels
                ),
                "tile {tile:?} past its operands"
            );
        }
    }
    if depth == 0 {
        m[..groups.len() * pixels * LANES].fill(0.0);
        return;
    }
    // Tiles per chunk: each prefetches its share of the next ([`Ahead`]).
    let count = sources.iter().map(|s| s.tiles.len()).sum();
    for k0 in (0..depth).step_by(LANE_CHUNK) {
        let kc = LANE_CHUNK.min(depth - k0);
        for (i, g) in groups.clone().enumerate() {
            let wg = &w[chunk_offset(k0, kc, g, rows)..][..kc * LANES];
            let next = next_chunk_offset((k0, kc), g, &groups, (depth, depth), rows);
            let mg = &mut m[i * pixels * LANES..][..pixels * LANES];
            let tiles = sources
                .iter()
                .flat_map(|s| s.tiles.iter().map(move |tile| (&s.v, tile)));
            for (t, (v, tile)) in tiles.enumerate() {
                let chunk = Chunk {
                    wg,
                    table: &v.table[k0..k0 + kc],
                    data: v.data,
                    first: k0 == 0,
                    ahead: next.map(|at| Ahead::share(w.as_ptr().wrapping_add(at), t, count)),
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `wg` has kc·LANES values; every value the tile
                    // reads, `data[table[d] + start + j·pitch + i·step]`, and
                    // writes, `mg[(col + j·col_pitch + i·col_step)·LANES..][..LANES]`,
                    // lies within its slice (checked above); the tile has at
                    // most AVX512_TILE pixels and a step of 1 or 2; the CPU
                    // has AVX-512F.
                    Isa::Avx512 => unsafe { x86::tile_avx512(&chunk, tile, mg) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above, for AVX2 + FMA and AVX2_TILE.
                    Isa::Avx2Fma => unsafe { x86::tile_avx2(&chunk, tile, mg) },
                    _ => tile_scalar(&chunk, tile, mg),
                }
            }
        }
    }
}

/// One lane group's chunk of the depth: its weights (`kc·LANES`), the
/// chunk's table entries; `first` starts the sums from zero; `ahead`,
/// where the weights read next start (the next group's in this chunk, or
/// after the task's last group its first group's in the next chunk), is
/// prefetched by the chunk's tiles, each its share of it ([`Ahead`],
/// spread over the tiles since the fifty-sixth session: ResNet18 at batch
/// 1 0.944× the time, measured there). Until the fiftieth session the
/// target was the chunk right after this one in the packed stream, which
/// after a task's last group is another task's: with the one read next,
/// ResNet18 at batch 1 0.980-0.984× the time (`scripts/ab_builds.py`,
/// Intel Xeon VM, AVX-512; layer4's 7×7 convs per node 0.95-0.97×),
/// ResNet50 level; AVX2 forced level.
struct Chunk<'a> {
    wg: &'a [f32],
    table: &'a [usize],
    data: &'a [f32],
    first: bool,
    ahead: Option<Ahead>,
}

/// One tile, one chunk: `mg[p][l] (+)= Σ_d wg[d][l] · data[table[d] + at(p)]`.
fn tile_scalar(c: &Chunk<'_>, t: &LaneTile, mg: &mut [f32]) {
    for j in 0..t.rows {
        for i in 0..t.width {
            let acc = &mut mg[(t.col + j * t.col_pitch + i * t.col_step) * LANES..][..LANES];
            if c.first {
                acc.fill(0.0);
            }
            for (d, &offset) in c.table.iter().enumerate() {
                let a = c.data[offset + t.start + j * t.pitch + i * t.step];
                for (acc, &w) in acc.iter_mut().zip(&c.wg[d * LANES..][..LANES]) {
                    *acc += a * w;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::pack_lanes;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every available path equals a plain loop (f64 sums) over the
        /// gathered values within an f32 rounding bound, across chunk
        /// boundaries, partial lane groups, every tile shape the path
        /// takes (runs of pixels side by side and down the rows).
        #[test]
        fn paths_match_plain_product(
            out_rows in 1usize..70,
            depth in 0usize..(2 * LANE_CHUNK + 9),
            width in 1usize..=AVX512_TILE,
            runs in 1usize..=AVX2_TILE,
            step in 1usize..=MAX_STEP,
            col_step in 1usize..3,
            seed in any::<u64>(),
        ) {
            let mut next = crate::test_util::uniform(seed);
            let (pitch, data_len) = (23, 700);
            let data: Vec<f32> = (0..data_len).map(|_| next()).collect();
            let table: Vec<usize> = (0..depth).map(|d| (d * 37 + 11) % 500).collect();
            let plain: Vec<f32> = (0..out_rows * depth).map(|_| next()).collect();
            let padded = out_rows.div_ceil(LANES) * LANES;
            let mut packed = vec![f32::NAN; padded * depth];
            pack_lanes(&plain, out_rows, depth, &mut packed);
            for isa in Isa::available() {
                let max = max_tile(isa);
                let rows = runs.min(max_runs(isa));
                let tile_width = width.min(max / rows);
                // Two tiles: one from value 3, one from value 40 (run 2
                // `pitch` on), their pixels `step` values apart. In the
                // product, with `col_step` 1 the first tile's pixels from 0
                // and the second's after them; with 2 interleaved (the
                // first's the even pixels, the second's the odd).
                let (second, col_pitch) = match col_step {
                    1 => (rows * tile_width, tile_width),
                    _ => (1, 2 * tile_width),
                };
                let tile = |start, col| LaneTile { start, pitch, step, col, col_pitch, col_step, width: tile_width, rows };
                let tiles = [tile(3, 0), tile(40, second)];
                let pixels = 2 * rows * tile_width;
                let at = |t: &LaneTile, p: usize| t.start + p / t.width * t.pitch + p % t.width * t.step;
                let mut m = vec![f32::NAN; padded * pixels];
                let (first, rest) = m.split_at_mut(pixels * LANES);
                let sources = [Source { v: Gathered { data: &data, table: &table }, tiles: tiles.to_vec() }];
                lane_gemm_gathered(isa, (&packed, padded), &sources, (first, pixels), 0..1);
                lane_gemm_gathered(isa, (&packed, padded), &sources, (rest, pixels), 1..padded / LANES);
                for tile in &tiles {
                    for p in 0..tile.rows * tile.width {
                        let pixel = tile.col + p / tile.width * tile.col_pitch + p % tile.width * tile.col_step;
                        for r in 0..padded {
                            let got = f64::from(m[(r / LANES * pixels + pixel) * LANES + r % LANES]);
                            if r >= out_rows {
                                prop_assert_eq!(got, 0.0, "{:?} padding row {}", isa, r);
                                continue;
                            }
                            let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(data[table[d] + at(tile, p)]));
                            let want: f64 = terms.clone().sum();
                            let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                            prop_assert!((got - want).abs() <= bound, "{:?} r={} pixel={}: {} vs {}", isa, r, pixel, got, want);
                        }
                    }
                }
            }
        }
    }

    /// A tile reaching past the data is refused, not read.
    #[test]
    #[should_panic(expected = "past its operands")]
    fn tile_past_the_data_panics() {
        let (data, table, w) = (vec![0f32; 10], vec![0usize, 5], vec![0f32; 2 * LANES]);
        let tile = LaneTile {
            start: 0,
            pitch: 0,
            step: 1,
            col: 0,
            col_pitch: 0,
            col_step: 1,
            width: 6,
            rows: 1,
        };
        let mut m = vec![0f32; 6 * LANES];
        let v = Gathered {
            data: &data,
            table: &table,
        };
        lane_gemm_gathered(
            Isa::Scalar,
            (&w, LANES),
            &[Source { v, tiles: vec![tile] }],
            (&mut m, 6),
            0..1,
        );
    }
}
