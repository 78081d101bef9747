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
mod x86;

#[cfg(test)]
mod tests;
