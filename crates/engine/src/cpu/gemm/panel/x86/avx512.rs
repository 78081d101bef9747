//! The AVX-512 panel product: 8 × 48 micro-tiles across whole 48-column
//! slices, 12- and 8-row tiles 32 or 16 columns wide for the rest, a deep
//! product's depth chunks, and the slice and tile loops the gathered
//! product shares.

use super::AVX512_TALL_ROWS;
use super::{fence_streams, micro_avx512, micro_avx512_tall, streams, TileColumns, TileEpilogue, TileWeights};
use crate::cpu::gemm::panel::{DepthChunks, PANEL_GRANULE, PANEL_ROWS, PANEL_TILES, WIDE_TILE};
use crate::cpu::gemm::right::RightLayout;
use crate::cpu::gemm::{row_sweep, StoreEpilogue};

/// # Safety
/// The CPU has AVX-512F; `u` holds at least `rows·depth` values, `v` a
/// `[depth, cols]` operand laid out as `layout` says (`(depth - 1)·vs +
/// cols` values row-major, `depth·cols` packed in 48-column slices),
/// `m` is valid for writes of `(rows - 1)·ms + cols` (nothing else
/// accesses the elements written); `rows % 8 == 0`, `cols % 16 == 0`,
/// `ms >= cols` (and a row-major `vs`). Every pointer formed is `panel·depth·8 + d·8 + r <
/// rows·depth` (u), `at + d·vs + 16·j + 15` inside `v` for `(at, vs) =
/// layout.at(t0)` (row-major: `d·vs + t0 + 16·j + 15 < (depth - 1)·vs +
/// cols`; packed: within the tile's slice, `depth` rows of its width),
/// `row·ms + t0 + 16·j + 15 < (rows - 1)·ms + cols` for each of the
/// `rows` rows (m);
/// `epi`'s bias has `rows` values and its residual, if any, spans
/// `m`'s rows and columns at its own stride. 8 × 48 micro-tiles
/// ([`WIDE_TILE`]) as far as whole ones reach, the rest in tiles of 12
/// rows (across panels) and 8 ([`avx512_column_tiles`]), 32 or 16
/// columns wide. `layout.pack()`, if not null (with a row-major `v`),
/// is valid for writes of `depth·cols` values nothing else accesses
/// meanwhile: each column slice's first tile copies its rows of `v`
/// there, the slice's other tiles read them from there (one slice at a
/// time, or a row sweep's block of them side by side).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(in crate::cpu::gemm) unsafe fn gemm_avx512(
    u: &[f32],
    v: &[f32],
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
    chunks: Option<DepthChunks>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (u, v) = (u.as_ptr(), v.as_ptr());
        let stream = streams(epi);
        let pack = layout.pack();
        // Slices of `WIDE_TILE` columns as far as whole ones reach,
        // then one of 32 or 16 for the rest: a packed operand's slices
        // are cut the same way ([`crate::cpu::gemm::right`]). A shallow product's
        // whole slices in row sweeps instead ([`row_sweep`]).
        let size = [rows, depth, cols];
        let mut t0 = match row_sweep::applies(size) {
            true => row_sweep::avx512(u, v, layout, m, size, ms, epi),
            false => 0,
        };
        // A deep product on a row-major `v` in depth chunks, if asked.
        if let Some(c) = chunks.filter(|c| c.depth < depth && layout.row_major() && pack.is_null()) {
            avx512_chunked(u, v, layout, m, size, ms, epi, [t0, c.depth.max(1), c.rows]);
            return;
        }
        while t0 < cols {
            let width = avx512_slice_width(t0, cols);
            // The first tile's pass prefetches the next slice of `v`:
            // its rows are a plane apart in a 1×1 conv, too many
            // streams for the hardware prefetchers. MobileNetV2's
            // projections (24-32 outputs, little reuse of a slice) at
            // batch 10 on Zen 4: 18.7-19.1 -> 15.9-16.5 ms in all (an
            // L2 hint there: 19.2-21.5; a wide slice's hint is L2 all
            // the same, see the micro-tiles). (Packed tiles lie one
            // after the other: the hardware's prefetchers follow them.)
            // One `depth × width` slice of `v` stays in cache while the
            // (contiguous, prefetch-friendly) weight panels stream past
            // it.
            let next = (layout.row_major() && t0 + width < cols).then(|| v.wrapping_add(t0 + width));
            let (at, vs) = layout.at(t0);
            let columns = TileColumns::rows(v.add(at), vs).packing(pack);
            avx512_slice::<false>(u, columns, m, [rows, depth, t0, width], ms, epi, next);
            t0 += width;
        }
        fence_streams(stream);
    }
}

/// [`gemm_avx512`] in depth chunks of `kc` and blocks of `mc` rows
/// (`v` row-major, not packed), columns from `t0` on: each chunk's
/// slice of `v` stays in L1 while the block's weights pass it; each
/// chunk adds its sums to the last one's in `m`, the epilogue (and
/// streaming stores) with the last.
///
/// # Safety
/// As [`gemm_avx512`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_chunked(
    u: *const f32,
    v: *const f32,
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
    [t_start, kc, mc]: [usize; 3],
) {
    // SAFETY: the caller upholds `gemm_avx512`'s contract; each chunk
    // reads rows `k0..k0 + chunk` of the same columns and weights.
    unsafe {
        let chunks = depth.div_ceil(kc);
        let mc = mc.next_multiple_of(PANEL_ROWS);
        for k in 0..chunks {
            let k0 = k * kc;
            let chunk = kc.min(depth - k0);
            let part = DepthPart {
                k0,
                len: chunk,
                first: k == 0,
                last: k + 1 == chunks,
            };
            for r0 in (0..rows).step_by(mc) {
                let r1 = rows.min(r0 + mc);
                let mut t0 = t_start;
                while t0 < cols {
                    let width = avx512_slice_width(t0, cols);
                    let (at, vs) = layout.at(t0);
                    let columns = TileColumns::rows(v.add(at + k0 * vs), vs);
                    // The block's first tile prefetches the chunk's rows
                    // of the next slice, as the whole product's does.
                    let next = (t0 + width < cols).then(|| columns.at.wrapping_add(width));
                    let at = [r0, r1, depth, t0];
                    match width {
                        WIDE_TILE => avx512_part_tiles::<{ WIDE_TILE / 16 }>(u, columns, m, at, ms, epi, next, part),
                        PANEL_TILES => {
                            avx512_part_tiles::<{ PANEL_TILES / 16 }>(u, columns, m, at, ms, epi, next, part)
                        }
                        _ => avx512_part_tiles::<1>(u, columns, m, at, ms, epi, next, part),
                    }
                    t0 += width;
                }
            }
        }
        fence_streams(streams(epi));
    }
}

/// Which depth a chunked product's call covers: `k0..k0 + len`, the
/// first chunk (sums start at zero) and the last (epilogue).
#[derive(Clone, Copy)]
struct DepthPart {
    k0: usize,
    len: usize,
    first: bool,
    last: bool,
}

/// [`avx512_column_tiles`] for rows `r0..r1` (multiples of 8) and one
/// depth part of a chunked product, `columns` at the part's first row.
/// A loop of its own: with the part and the accumulate switch folded
/// into `avx512_column_tiles` (one tile loop for both), the chunked
/// ResNet50 layer4.0.conv2 shape at batch 10 took 12.6-12.8 ms against
/// 9.3-9.7, and the whole products slowed too (ResNet50 b10 1.014×,
/// ResNet18 b1 1.028×, alternating builds on the Intel Xeon VM).
///
/// # Safety
/// As [`avx512_column_tiles`], for those rows and depths.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_part_tiles<const V: usize>(
    u: *const f32,
    columns: TileColumns,
    m: *mut f32,
    [r0, r1, depth, t0]: [usize; 4],
    ms: usize,
    epi: Option<StoreEpilogue>,
    next: Option<*const f32>,
    part: DepthPart,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let stream = streams(epi) && part.last;
        let wide = 16 * V == WIDE_TILE;
        let mut row = r0;
        while row < r1 {
            let height = if wide { PANEL_ROWS } else { avx512_tile_rows(r1 - row) };
            let w = TileWeights::from_row(u.add(part.k0 * PANEL_ROWS), row, depth);
            let mp = m.add(row * ms + t0);
            let e = TileEpilogue::at(epi.filter(|_| part.last), row, t0);
            let next = next.filter(|_| row == r0);
            let tall = !wide && height == AVX512_TALL_ROWS;
            let len = part.len;
            macro_rules! tile {
                ($stream:literal, $acc:literal) => {
                    match tall {
                        true => {
                            micro_avx512_tall::<V, $stream, $acc, false, false, true>(w, columns, mp, len, ms, e, next)
                        }
                        false => micro_avx512::<V, $stream, $acc, false, false, true>(w, columns, mp, len, ms, e, next),
                    }
                };
            }
            match (stream, part.first) {
                (true, true) => tile!(true, false),
                (true, false) => tile!(true, true),
                (false, true) => tile!(false, false),
                (false, false) => tile!(false, true),
            }
            row += height;
        }
    }
}

/// The width of the AVX-512 column slice from column `t0` of `cols` (a
/// multiple of [`PANEL_GRANULE`]): [`WIDE_TILE`] as far as whole ones
/// reach, then one of 32 or 16 columns for the rest.
pub(in crate::cpu::gemm) fn avx512_slice_width(t0: usize, cols: usize) -> usize {
    match cols - t0 {
        _ if t0 < cols / WIDE_TILE * WIDE_TILE => WIDE_TILE,
        n if n >= PANEL_TILES => PANEL_TILES,
        _ => PANEL_GRANULE,
    }
}

/// [`avx512_column_tiles`] for the slice of columns `t0..t0 + width`
/// ([`avx512_slice_width`]: 48, 32 or 16).
///
/// # Safety
/// As [`avx512_column_tiles`] for those columns.
#[inline]
#[target_feature(enable = "avx512f")]
pub(in crate::cpu::gemm) unsafe fn avx512_slice<const TABLE: bool>(
    u: *const f32,
    columns: TileColumns,
    m: *mut f32,
    [rows, depth, t0, width]: [usize; 4],
    ms: usize,
    epi: Option<StoreEpilogue>,
    next: Option<*const f32>,
) {
    let at = [rows, depth, t0];
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        match width {
            WIDE_TILE => avx512_column_tiles::<{ WIDE_TILE / 16 }, TABLE>(u, columns, m, at, ms, epi, next),
            PANEL_TILES => avx512_column_tiles::<{ PANEL_TILES / 16 }, TABLE>(u, columns, m, at, ms, epi, next),
            _ => avx512_column_tiles::<1, TABLE>(u, columns, m, at, ms, epi, next),
        }
    }
}

/// The tiles of columns `t0..t0 + 16·V` of an AVX-512 panel product
/// ([`gemm_avx512`], and with `TABLE` the gathered one), every row,
/// reading `v`'s rows where `columns` says: 8-row tiles for a
/// [`WIDE_TILE`] slice; otherwise 12-row tiles, and 8-row ones for the
/// last 8 or 16 rows ([`avx512_tile_rows`]). A 12-row tile runs across
/// two 8-row panels (its rows past the first panel's last read their
/// weights a panel on), as AVX2's 6-row tiles do.
///
/// # Safety
/// As [`gemm_avx512`] (or the gathered product), for columns `t0..t0 +
/// 16·V` within `cols`, `columns` locating them; `next` as the
/// micro-tiles take it (a hint, never dereferenced).
#[inline]
#[target_feature(enable = "avx512f")]
pub(in crate::cpu::gemm) unsafe fn avx512_column_tiles<const V: usize, const TABLE: bool>(
    u: *const f32,
    columns: TileColumns,
    m: *mut f32,
    [rows, depth, t0]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
    next: Option<*const f32>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract;
    // each tile reads and writes its rows of the columns stated there.
    unsafe {
        let stream = streams(epi);
        // Wide tiles are one panel high ([`WIDE_TILE`]).
        let wide = 16 * V == WIDE_TILE;
        let mut row = 0;
        while row < rows {
            let height = if wide { PANEL_ROWS } else { avx512_tile_rows(rows - row) };
            debug_assert!(row + height <= rows, "a tile past the rows");
            let w = TileWeights::from_row(u, row, depth);
            let mp = m.add(row * ms + t0);
            let e = TileEpilogue::at(epi, row, t0);
            let next = next.filter(|_| row == 0);
            let tall = !wide && height == AVX512_TALL_ROWS;
            // Every tile leads (prefetches) on AVX-512: the hints cost
            // AVX2's tiles issue slots in the slices after the first
            // (`avx2_leads`), not measured on AVX-512's wider tiles.
            macro_rules! tile {
                ($pack:literal, $columns:expr) => {
                    match (tall, stream) {
                        (true, true) => {
                            micro_avx512_tall::<V, true, false, TABLE, $pack, true>(w, $columns, mp, depth, ms, e, next)
                        }
                        (true, false) => micro_avx512_tall::<V, false, false, TABLE, $pack, true>(
                            w, $columns, mp, depth, ms, e, next,
                        ),
                        (false, true) => {
                            micro_avx512::<V, true, false, TABLE, $pack, true>(w, $columns, mp, depth, ms, e, next)
                        }
                        (false, false) => {
                            micro_avx512::<V, false, false, TABLE, $pack, true>(w, $columns, mp, depth, ms, e, next)
                        }
                    }
                };
            }
            // Where the slice is packed as the product goes
            // (`columns.pack`), its first tile copies it as it reads
            // it and the others read that copy.
            match (row, columns.pack.is_null()) {
                (_, true) => tile!(false, columns),
                (0, false) => tile!(true, columns),
                _ => tile!(false, TileColumns::rows(columns.pack, 16 * V)),
            }
            row += height;
        }
    }
}

/// The height of the next AVX-512 micro-tile with `left` rows (a
/// multiple of 4, from a multiple of 8) left: tall ones, and panel-high
/// ones for the last 8 or 16 rows, which 12-row tiles cannot cover.
pub(in crate::cpu::gemm) fn avx512_tile_rows(left: usize) -> usize {
    match left {
        8 | 16 => PANEL_ROWS,
        _ => AVX512_TALL_ROWS,
    }
}
