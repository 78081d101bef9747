//! The SIMD panel products of a shallow `V` in row sweeps: for each block
//! of whole column slices (48 columns on AVX-512, 16 on AVX2), each row
//! tile of the weights (an 8-row panel; AVX2's 6- and 4-row tiles) runs
//! across every slice of the block before the next one starts, where the
//! deeper products run column slice by column slice ([`super::panel`]'s
//! `gemm_avx512` and `gemm_avx2`). A tile of a shallow product does few
//! FMAs for the vectors it stores (and, with a residual, loads) across its
//! output rows a plane apart: slice by slice, a 1×1 conv's tiles write a
//! few lines in each of all its output planes, more streams than the
//! hardware prefetchers follow; in a sweep they write along a tile's
//! planes. The block's slices (`v`'s rows in place, copied by the first
//! tiles as they read them, or packed before: at most 192 KiB) stay in the
//! L2 for the other rows.
//!
//! With AVX2 forced on the Intel Xeon VM (2 threads), AVX2 sweeps (of
//! streamed outputs too, see [`applies`]) against none (alternating
//! forwards, `scripts/ab_builds.py`): ResNet50 at batch 1 0.991× the time
//! (quartiles 0.988-0.998; per node its 64-deep convs 0.85-0.95×), at
//! batch 10 0.973× (0.956-0.991); ResNet18 at batch 1 and 10, MobileNetV2
//! at batch 1 and 10, MobileNetV3-Large at batch 1 and 10 and
//! EfficientNet-B0 at batch 10 level (0.990-1.003×). Sweeps 256 deep on
//! AVX2 (blocks of 12 slices) were level again (ResNet50 0.994× and
//! 0.988×; its 256-deep convs alone 0.98-1.01×).

use super::panel::x86::{
    avx2_leads, avx2_tile_rows, micro_avx2, micro_avx2_tall, micro_avx512, streams, TileColumns, TileEpilogue,
    TileWeights, AVX2_TALL_ROWS,
};
use super::right::RightLayout;
use super::{StoreEpilogue, PANEL_GRANULE, PANEL_ROWS, WIDE_TILE};

/// The deepest product that runs in row sweeps. Zen 4, 2 threads, batch
/// 1, sweeps against slices in one process (`xtask compare`, forwards
/// alternating A B B A, 300 pairs): 1×1 convs alone, 64 -> 256 on 56×56
/// 0.90× the time, 128 -> 512 on 28×28 0.94×, 256 -> 1024 on 14×14 level
/// (so 256 deep runs by slices). In ResNet50, per node by the minimum of
/// three alternating profiles: its 64-deep convs (layer1's conv3 with
/// their residual, the downsample, layer1.0.conv1) 0.87-0.90×, the
/// 128-deep layer2 conv3s 0.93-0.95×; whole forwards within the host's
/// noise (ResNet50 batch 1 1.00×, batch 10 0.994×; MobileNetV2,
/// MobileNetV3-Large, EfficientNet-B0 0.99-1.01×).
pub(super) const MAX_DEPTH: usize = 128;

/// Whole slices per block: a block of 128-deep slices is 192 KiB, within
/// the L2 beside the output's lines.
const BLOCK_SLICES: usize = 8;

/// Whole 16-column slices per block of an AVX2 sweep ([`avx2`]): as many
/// columns as an AVX-512 block's (384; 192 KiB of 128-deep slices).
const AVX2_BLOCK_SLICES: usize = BLOCK_SLICES * WIDE_TILE / PANEL_GRANULE;

/// Whether a `[rows, depth, cols]` product runs in row sweeps ([`avx512`],
/// [`avx2`]): shallow, at least two panels and two AVX-512 slices of
/// columns. Streamed outputs (stores past the caches) too: with AVX2
/// forced on the Intel Xeon VM, ResNet50 at batch 10 (whose 64-deep
/// layer1 convs and their residuals, 32 MB each, stream) took 0.991× the
/// time of sweeps of cached outputs only (quartiles 0.982-0.999, 20
/// alternating rounds), 0.987× that of no AVX2 sweeps at all; on AVX-512
/// level (0.994×; MobileNetV2 and EfficientNet-B0 at batch 10 0.998× and
/// 1.006×).
pub(super) fn applies([rows, depth, cols]: [usize; 3]) -> bool {
    depth <= MAX_DEPTH && rows > PANEL_ROWS && cols >= 2 * WIDE_TILE
}

/// One tile of a sweep, as [`sweep`] hands it to a path's micro-tile.
struct SweepTile {
    /// The tile's weights.
    w: TileWeights,
    /// Its columns of `v`: in place, copied as it reads them (`packing`),
    /// or read from the block's copy.
    columns: TileColumns,
    packing: bool,
    /// Its first output value.
    mp: *mut f32,
    e: Option<TileEpilogue>,
    /// The next slice of a row-major `v`, which the first row's tiles
    /// prefetch.
    next: Option<*const f32>,
    /// Its rows, and its first column's distance from the block's.
    height: usize,
    in_block: usize,
}

/// How a path cuts a sweep: `width`-column slices in blocks of `block`,
/// tiles of `height(rows left)` rows.
struct Cut {
    width: usize,
    block: usize,
    height: fn(usize) -> usize,
}

/// The loops of a row sweep over the `[rows, depth, cols]` product's whole
/// slices (`cols / width · width` columns), handing `tile` each tile in
/// order; returns the first column left. Each block's slices are copied
/// side by side into `layout.pack()` (if not null) by the first row's
/// tiles, slice `k` at `k·depth·width`. The paths mark their `tile`
/// closures `#[inline(always)]`: otherwise each stayed a function of its
/// own, one more call per tile, and ResNet50 at batch 1 (AVX-512) took
/// 1.013-1.017× the time.
///
/// # Safety
/// The operands as the path's product states (`gemm_avx512`, `gemm_avx2`),
/// with `cut` its tiles' shapes; `layout.pack()` (if not null) valid for
/// writes of `depth·cols` values nothing else accesses meanwhile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sweep(
    u: *const f32,
    v: *const f32,
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
    cut: Cut,
    mut tile: impl FnMut(SweepTile),
) -> usize {
    let Cut { width, block, height } = cut;
    let whole = cols / width * width;
    let pack = layout.pack();
    // SAFETY: every tile's pointers lie within the bounds the path's
    // product states for its columns and rows (whole slices, the rows its
    // tiles cut); the copies stay within `depth·cols` values of `pack`.
    unsafe {
        for c0 in (0..whole).step_by(block * width) {
            let c1 = whole.min(c0 + block * width);
            let mut row = 0;
            while row < rows {
                let h = height(rows - row);
                let w = TileWeights::from_row(u, row, depth);
                for t0 in (c0..c1).step_by(width) {
                    let (at, vs) = layout.at(t0);
                    let copy = pack.wrapping_add((t0 - c0) * depth);
                    // The first row's tiles prefetch the next slice of a
                    // row-major `v` from its planes and copy theirs where
                    // it is copied; the other rows read the copies (or the
                    // block's rows of `v` again, from the L2).
                    let next =
                        (layout.row_major() && row == 0 && t0 + width < cols).then(|| v.wrapping_add(t0 + width));
                    let columns = match (pack.is_null(), row) {
                        (true, _) => TileColumns::rows(v.add(at), vs),
                        (false, 0) => TileColumns::rows(v.add(at), vs).packing(copy),
                        (false, _) => TileColumns::rows(copy, width),
                    };
                    tile(SweepTile {
                        w,
                        columns,
                        packing: !pack.is_null() && row == 0,
                        mp: m.add(row * ms + t0),
                        e: TileEpilogue::at(epi, row, t0),
                        next,
                        height: h,
                        in_block: t0 - c0,
                    });
                }
                row += h;
            }
        }
    }
    whole
}

/// The product's whole 48-column slices (`cols / 48 · 48` columns) in row
/// sweeps of [`BLOCK_SLICES`]-slice blocks of 8-row panels; returns the
/// first column left for the slice-by-slice product.
///
/// # Safety
/// As `gemm_avx512`, with [`applies`] true, and `layout.pack()` (if not
/// null) valid for writes of `depth·cols` values nothing else accesses
/// meanwhile: a block's slices are copied side by side, slice `k` at
/// `k·depth·48`. Where `epi` streams, so do the tiles; the caller fences
/// their stores.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn avx512(
    u: *const f32,
    v: *const f32,
    layout: RightLayout,
    m: *mut f32,
    size: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
) -> usize {
    const V: usize = WIDE_TILE / 16;
    let depth = size[1];
    let stream = streams(epi);
    let cut = Cut {
        width: WIDE_TILE,
        block: BLOCK_SLICES,
        height: |_| PANEL_ROWS,
    };
    // SAFETY: `sweep` hands out tiles within the operands this function's
    // contract states; every tile leads.
    unsafe {
        sweep(
            u,
            v,
            layout,
            m,
            size,
            ms,
            epi,
            cut,
            #[inline(always)]
            |t| {
                // The tile's store mode and whether it copies (every tile leads).
                macro_rules! tile {
                    ($s:literal) => {
                        match t.packing {
                            true => micro_avx512::<V, $s, false, false, true, true>(
                                t.w, t.columns, t.mp, depth, ms, t.e, t.next,
                            ),
                            false => micro_avx512::<V, $s, false, false, false, true>(
                                t.w, t.columns, t.mp, depth, ms, t.e, t.next,
                            ),
                        }
                    };
                }
                match stream {
                    true => tile!(true),
                    false => tile!(false),
                }
            },
        )
    }
}

/// The AVX2 product (`cols` whole 16-column slices) in row sweeps of
/// [`AVX2_BLOCK_SLICES`]-slice blocks: each 6-row tile (4-row at a block
/// of rows' end, as `gemm_avx2` cuts them) runs across the block's slices
/// before the next tile's rows start.
///
/// # Safety
/// As `gemm_avx2`, with [`applies`] true (so one depth chunk), and
/// `layout.pack()` (if not null) valid for writes of `depth·cols` values
/// nothing else accesses meanwhile: a block's slices are copied side by
/// side, slice `k` at `k·depth·16`. Where `epi` streams, so do the tiles;
/// the caller fences their stores.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn avx2(
    u: *const f32,
    v: *const f32,
    layout: RightLayout,
    m: *mut f32,
    size: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
) {
    const W: usize = PANEL_GRANULE / 8;
    let depth = size[1];
    let stream = streams(epi);
    let cut = Cut {
        width: PANEL_GRANULE,
        block: AVX2_BLOCK_SLICES,
        height: avx2_tile_rows,
    };
    // SAFETY: `sweep` hands out tiles within the operands this function's
    // contract states.
    unsafe {
        sweep(
            u,
            v,
            layout,
            m,
            size,
            ms,
            epi,
            cut,
            #[inline(always)]
            |t| {
                // A tile leads (prefetches the weights ahead) on the block's
                // first slice, and where it prefetches `v` (`avx2_leads`).
                let lead = avx2_leads(t.in_block, t.next.is_some());
                // The tile's store mode, whether it copies and whether it leads.
                macro_rules! tile {
                    ($tile:ident, $s:literal) => {
                        match (t.packing, lead) {
                            (true, _) => {
                                $tile::<W, $s, false, false, true, true>(t.w, t.columns, t.mp, depth, ms, t.e, t.next)
                            }
                            (false, true) => {
                                $tile::<W, $s, false, false, false, true>(t.w, t.columns, t.mp, depth, ms, t.e, t.next)
                            }
                            (false, false) => {
                                $tile::<W, $s, false, false, false, false>(t.w, t.columns, t.mp, depth, ms, t.e, None)
                            }
                        }
                    };
                }
                match (t.height == AVX2_TALL_ROWS, stream) {
                    (true, true) => tile!(micro_avx2_tall, true),
                    (true, false) => tile!(micro_avx2_tall, false),
                    (false, true) => tile!(micro_avx2, true),
                    (false, false) => tile!(micro_avx2, false),
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::MAX_DEPTH;
    use crate::cpu::gemm::test_case::Case;
    use crate::cpu::gemm::{pack_tiles, panel_gemm_strided, Isa, StoreEpilogue};

    /// Products the sweeps take (one block of slices and a rest, several
    /// blocks, the deepest and a 1-deep one) equal the f64 product with
    /// the epilogue (bias, residual, ReLU) on every path, whether `v` is
    /// read in place (its output stored through the caches or streamed),
    /// packed first or packed as the product goes; `m`'s gaps past `cols`
    /// stay untouched.
    #[test]
    fn sweeps_match_plain_product() {
        for (panels, depth, cols) in [(3, 64, 400), (2, MAX_DEPTH, 848), (5, 1, 96), (4, 100, 2 * 48)] {
            let case = Case::new(panels, depth, cols);
            let Case { rows, ms, stride, .. } = case;
            let (size, v) = (case.size(), case.v());
            let check = |isa: Isa, got: &[f32], how: &str| {
                for r in 0..rows {
                    for c in 0..cols {
                        let terms = (0..depth)
                            .map(|d| f64::from(case.plain[r * depth + d]) * f64::from(case.v[d * stride + c]));
                        let (bias, residual) = (case.bias[r], case.residual[r * ms + c]);
                        let sum = terms.clone().sum::<f64>() + f64::from(bias) + f64::from(residual);
                        let bound =
                            1.01 * (depth + 2) as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>()
                                + 4.0 * f64::from(f32::EPSILON) * f64::from(bias.abs() + residual.abs());
                        let got = f64::from(got[r * ms + c]);
                        assert!(
                            (got - sum.max(0.0)).abs() <= bound,
                            "{isa:?} {how} {size:?} r{r} c{c}: {got} vs {sum}"
                        );
                    }
                    if r + 1 < rows {
                        assert!(
                            got[r * ms + cols..(r + 1) * ms].iter().all(|x| x.is_nan()),
                            "{isa:?} {how} wrote a gap"
                        );
                    }
                }
            };
            for isa in Isa::available() {
                let mut m = vec![f32::NAN; case.len()];
                panel_gemm_strided(isa, &case.packed, v, &mut m, ms, size, Some(case.epilogue()));
                check(isa, &m, "in place");
                let streamed = StoreEpilogue {
                    stream: true,
                    ..case.epilogue()
                };
                let mut m = vec![f32::NAN; case.len()];
                panel_gemm_strided(isa, &case.packed, v, &mut m, ms, size, Some(streamed));
                check(isa, &m, "in place, streamed");
                let mut tiles = vec![f32::NAN; depth * cols];
                let first = pack_tiles(isa, v, [depth, cols], &mut tiles, None);
                let mut m = vec![f32::NAN; case.len()];
                panel_gemm_strided(isa, &case.packed, first, &mut m, ms, size, Some(case.epilogue()));
                check(isa, &m, "packed first");
                check(isa, &case.packing_as_it_goes(isa), "packed as it goes");
            }
        }
    }
}
