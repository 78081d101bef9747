//! The AVX-512 panel product of a shallow `V` in row sweeps: for each block
//! of whole 48-column slices, each 8-row panel of the weights runs across
//! every slice of the block before the next panel starts, where the
//! deeper products run column slice by column slice
//! ([`super::panel`]'s `gemm_avx512`). A tile of a shallow product does
//! few FMAs for the 24 vectors it stores (and, with a residual, loads)
//! across 8 output rows a plane apart: slice by slice, a 1×1 conv's tiles
//! write a few lines in each of all its output planes, more streams than
//! the hardware prefetchers follow; in a sweep they write along 8 planes.
//! The block's slices (`v`'s rows in place, copied by the first panel's
//! tiles as they read them, or packed before: at most 192 KiB) stay in the
//! L2 for the other panels.

use super::panel::x86::{micro_avx512, TileColumns, TileEpilogue, TileWeights};
use super::right::RightLayout;
use super::{StoreEpilogue, PANEL_ROWS, WIDE_TILE};

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

/// Whether a `[rows, depth, cols]` product runs in row sweeps
/// ([`avx512`]): shallow, at least two whole slices and two panels, its
/// output stored through the caches.
pub(super) fn applies([rows, depth, cols]: [usize; 3], stream: bool) -> bool {
    depth <= MAX_DEPTH && !stream && rows > PANEL_ROWS && cols >= 2 * WIDE_TILE
}

/// The product's whole 48-column slices (`cols / 48 · 48` columns) in row
/// sweeps of [`BLOCK_SLICES`]-slice blocks; returns the first column left
/// for the slice-by-slice product.
///
/// # Safety
/// As `gemm_avx512`, with [`applies`] true, and `layout.pack()` (if not
/// null) valid for writes of `depth·cols` values nothing else accesses
/// meanwhile: a block's slices are copied side by side, slice `k` at
/// `k·depth·48`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn avx512(
    u: *const f32,
    v: *const f32,
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
) -> usize {
    const V: usize = WIDE_TILE / 16;
    let whole = cols / WIDE_TILE * WIDE_TILE;
    let pack = layout.pack();
    // SAFETY: every tile reads and writes within the bounds `gemm_avx512`
    // states for its columns and rows (whole slices, 8-row panels); the
    // copies stay within `depth·cols` values of `pack`.
    unsafe {
        for c0 in (0..whole).step_by(BLOCK_SLICES * WIDE_TILE) {
            let c1 = whole.min(c0 + BLOCK_SLICES * WIDE_TILE);
            for row in (0..rows).step_by(PANEL_ROWS) {
                let w = TileWeights::from_row(u, row, depth);
                for t0 in (c0..c1).step_by(WIDE_TILE) {
                    let mp = m.add(row * ms + t0);
                    let e = TileEpilogue::at(epi, row, t0);
                    let (at, vs) = layout.at(t0);
                    let copy = pack.wrapping_add((t0 - c0) * depth);
                    // The first panel's tiles prefetch the next slice of
                    // a row-major `v` from its planes and copy theirs where
                    // it is copied; the other panels read the copies (or
                    // the block's rows of `v` again, from the L2).
                    let next = (layout.row_major() && row == 0 && t0 + WIDE_TILE < cols)
                        .then(|| v.wrapping_add(t0 + WIDE_TILE));
                    match (pack.is_null(), row) {
                        (true, _) => micro_avx512::<V, false, false, false, false, true>(
                            w,
                            TileColumns::rows(v.add(at), vs),
                            mp,
                            depth,
                            ms,
                            e,
                            next,
                        ),
                        (false, 0) => micro_avx512::<V, false, false, false, true, true>(
                            w,
                            TileColumns::rows(v.add(at), vs).packing(copy),
                            mp,
                            depth,
                            ms,
                            e,
                            next,
                        ),
                        (false, _) => micro_avx512::<V, false, false, false, false, true>(
                            w,
                            TileColumns::rows(copy, WIDE_TILE),
                            mp,
                            depth,
                            ms,
                            e,
                            None,
                        ),
                    }
                }
            }
        }
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::MAX_DEPTH;
    use crate::cpu::gemm::test_case::Case;
    use crate::cpu::gemm::{pack_tiles, panel_gemm_strided, Isa};

    /// Products the sweeps take (one block of slices and a rest, several
    /// blocks, the deepest and a 1-deep one) equal the f64 product with
    /// the epilogue (bias, residual, ReLU) on every path, whether `v` is
    /// read in place, packed first or packed as the product goes; `m`'s
    /// gaps past `cols` stay untouched.
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
