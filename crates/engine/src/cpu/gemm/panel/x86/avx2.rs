//! The AVX2 panel product: 6 × 16 micro-tiles (4 × 16 for a block's
//! last rows), deep products in depth chunks and row blocks, and the
//! prefetch hints along a tile's rows.

use super::{fence_streams, micro_avx2, micro_avx2_tall, streams, TileColumns, TileEpilogue, TileWeights};
use super::{AVX2_ROWS, AVX2_TALL_ROWS};
use crate::cpu::gemm::panel::{chunks_depth, PANEL_GRANULE, PANEL_ROWS};
use crate::cpu::gemm::right::RightLayout;
use crate::cpu::gemm::{row_sweep, Isa, StoreEpilogue};
use std::arch::x86_64::*;

/// The height of the next AVX2 micro-tile with `left` rows (a multiple
/// of 2, from a multiple of 8) left in the block: tall ones, and short
/// ones for the last 4 or 8 rows, which 6-row tiles cannot cover.
pub(in crate::cpu::gemm) fn avx2_tile_rows(left: usize) -> usize {
    match left {
        4 | 8 => AVX2_ROWS,
        _ => AVX2_TALL_ROWS,
    }
}

/// Whether an AVX2 micro-tile of the column slice from `t0` leads: it
/// prefetches the weights ahead of its depth steps (and `v`'s next
/// slice, if it is the one that does: `prefetches_v`). The block's
/// first slice leads (its weights come from memory: a forward's
/// weights outgrow the caches), the later slices find the weights in
/// cache and run without the hints, which cost issue slots there: one
/// or two prefetches and a branch on `next` per 12 FMAs. One thread on
/// the Zen 3 VM, the product alternating with a copy of the tile
/// without hints in one process (`v` packed): 192 × 1024 × 192 at
/// 0.71-0.94 of that copy's rate with the hints in every tile, 1.00-1.04
/// with leading tiles only; 264 × 64 × 784 0.62-0.89 and 0.93-0.95;
/// 256 × 256 × 3136 0.71-0.91 and 0.93-0.98. Whole forwards,
/// `cargo xtask compare` (2 threads, 40-100 interleaved pairs, every
/// tile leading as variant B): ResNet50 at batch 1 and 10 1.03× and
/// 1.075× the time with every tile leading, ResNet18 at batch 10
/// 1.045× (batch 1 level), MobileNetV3-Large 1.035×, MobileNetV2
/// 1.02×, EfficientNet-B0 1.014×, ResNet34 1.01× (all batch 1).
pub(in crate::cpu::gemm) fn avx2_leads(t0: usize, prefetches_v: bool) -> bool {
    t0 == 0 || prefetches_v
}

/// The most depth per chunk: a 16-column slice of `v` this deep is
/// 12 KiB, well inside the L1 beside the weights' stream.
const AVX2_CHUNK_DEPTH: usize = 192;
/// Rows of `u` per block of a chunked product: 128 rows of a chunk are
/// at most 96 KiB, under a fifth of a 512 KiB L2 (Zen 3's, the smallest
/// of the x86 machines measured).
const AVX2_BLOCK_ROWS: usize = 128;

/// How many tiles (16 columns) ahead along its rows the product
/// prefetches the rows of a row-major `v`, of the output and of the
/// residual.
const AVX2_AHEAD: usize = 4;

/// Depth per chunk and rows per block of an AVX2 product `depth` deep
/// with `rows` rows: the whole product where a slice of `v` fits the
/// L1 (chunking cost 10-17% on ResNet18's layer4 F(4×4) products, 512
/// deep, on Zen 3), else even chunks of at most [`AVX2_CHUNK_DEPTH`]
/// (multiples of 8) and blocks of [`AVX2_BLOCK_ROWS`]. ResNet18 at batch
/// 10 on Zen 3, alternating forwards: its stride-2 3×3 convs (576, 1152
/// and 2304 deep) 0.92×, 0.93× and 0.83× the unchunked time. A
/// `packed` `v` runs whole to [`crate::cpu::gemm::panel::AVX2_MAX_PACKED_DEPTH`]
/// ([`chunks_depth`]).
fn avx2_blocks(depth: usize, rows: usize, packed: bool) -> (usize, usize) {
    match chunks_depth(Isa::Avx2Fma, depth, packed) {
        false => (depth.max(1), rows.max(1)),
        true => (
            depth.div_ceil(depth.div_ceil(AVX2_CHUNK_DEPTH)).next_multiple_of(8),
            AVX2_BLOCK_ROWS,
        ),
    }
}

/// # Safety
/// As [`gemm_avx512`](super::gemm_avx512), with AVX2 and FMA instead of AVX-512F (and
/// packed slices 16 columns wide; `layout.pack()`, valid for writes of
/// `depth·cols` values as there, is only written by a row sweep and by
/// a product in one depth chunk and one block of rows, [`avx2_blocks`],
/// and ignored otherwise). A shallow product runs in row sweeps
/// ([`row_sweep`]). AVX2 has 16
/// vector registers: a micro-tile is 6 rows × 16 columns (12
/// accumulators, 2 loads of `v` and 6 broadcasts of `u` per depth step
/// for 12 FMAs; 15 registers, no spill), the last 4 or 8 rows of a
/// block in tiles of 4 × 16 ([`avx2_tile_rows`]). A 6-row tile runs
/// across two 8-row panels where it must: its rows past the first
/// panel's last read their weights a panel on, so the panels stay the
/// layout every kernel packs. With 8 accumulators (4 × 16 tiles, the
/// FMA latency times its throughput, no slack) ResNet18 at batch 10
/// took 1.13× the time of 6 × 16 on Zen 3 (stride-2 and layer3/4
/// convs 1.16-1.28×), MobileNetV3-Large 1.07× (its 1×1 convs up to
/// 1.20×), alternating forwards. (4 × 24, also 12 accumulators, left
/// LLVM one register short: it spilled an accumulator every step.)
/// The lines of the tiles [`AVX2_AHEAD`] on are prefetched along every
/// row a tile reads or writes (a 1×1 conv's planes, a Winograd
/// product's outputs): a tile's rows are that many streams, too many
/// for the hardware prefetchers, and the loads and stores waited on
/// their lines. Zen 3, alternating forwards: MobileNetV3's 16 -> 64
/// conv on 112×112 planes at batch 1 0.73-0.79× the time without the
/// output's lines; at batch 10 with `v`'s and the residual's 4 tiles
/// ahead rather than 1 and none, its 72 -> 24 + residual on 56×56
/// planes 0.75×, the whole model 0.97×. Once only rows a page or more
/// apart had them; on rows closer too (28×28 planes, 3 KiB apart), in
/// one process, one thread, the micro-kernel on 784 columns ran
/// 1.21-1.37× as fast (level on 96 and 3136), and per node against the
/// model's median node (`scripts/ab-nodes.sh`, Zen 3, two threads)
/// ResNet50's 1×1 convs with a residual on 28×28 at batch 10 took
/// 0.81-0.91× the time, ResNet18's at batch 1 and 10 none slower
/// (its downsamples at batch 10 0.91-0.97×).
#[target_feature(enable = "avx2,fma")]
pub(in crate::cpu::gemm) unsafe fn gemm_avx2(
    u: &[f32],
    v: &[f32],
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
    epi: Option<StoreEpilogue>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract;
    // every tile reads and writes within the bounds stated there.
    unsafe {
        let (u, v) = (u.as_ptr(), v.as_ptr());
        let stream = streams(epi);
        // A shallow product in row sweeps, as on AVX-512
        // ([`row_sweep`]).
        if row_sweep::applies([rows, depth, cols]) {
            row_sweep::avx2(u, v, layout, m, [rows, depth, cols], ms, epi);
            fence_streams(stream);
            return;
        }
        // Column slices outer, as on AVX-512: one `depth × 16` slice
        // of `v` stays in L1 while every row panel's weights stream
        // past it (rows outer re-read all of `v` from L2 per 4 rows:
        // ResNet18 at batch 10, AVX2 forced on Zen 4, alternating runs:
        // medians 162 → 146 ms). Deeper products than the L1 holds a
        // slice of (a row-major `v`; a packed one past 1024 deep) run
        // in depth chunks and row blocks ([`avx2_blocks`]): a chunk's
        // slice stays in L1 while the block's weights (in L2) pass it;
        // each chunk adds its sums to the last one's in `m`, the
        // epilogue comes with the last.
        // The first tile prefetches a row-major `v` `AVX2_AHEAD` slices
        // on; packed tiles lie one after the other: no prefetch.
        let row_major = layout.row_major();
        let (kc, mc) = avx2_blocks(depth, rows, !row_major || !layout.pack().is_null());
        let chunks = depth.div_ceil(kc).max(1);
        // Packed as the product goes (one chunk, one block of rows:
        // the slice's first tile copies it, the others read the copy).
        let pack = match chunks == 1 && mc >= rows {
            true => layout.pack(),
            false => std::ptr::null_mut(),
        };
        for k in 0..chunks {
            let k0 = k * kc;
            let chunk = kc.min(depth - k0);
            let (first, last) = (k == 0, k + 1 == chunks);
            for r0 in (0..rows).step_by(mc) {
                let r1 = rows.min(r0 + mc);
                for t0 in (0..cols).step_by(PANEL_GRANULE) {
                    let (at, vs) = layout.at(t0);
                    let vp = v.add(at + k0 * vs);
                    // The block's first tile prefetches a later slice of `v`.
                    let next =
                        (row_major && t0 + PANEL_GRANULE < cols).then(|| vp.wrapping_add(AVX2_AHEAD * PANEL_GRANULE));
                    let mut row = r0;
                    while row < r1 {
                        let height = avx2_tile_rows(r1 - row);
                        debug_assert!(row + height <= r1, "a tile past its block");
                        let up = TileWeights::from_row(u.add(k0 * PANEL_ROWS), row, depth);
                        let mp = m.add(row * ms + t0);
                        let e = TileEpilogue::at(epi.filter(|_| last), row, t0);
                        let next = next.filter(|_| row == r0);
                        if last {
                            // Hints: never fault, whatever the address.
                            // The output's lines (not for streaming
                            // stores, which need none) and the residual's.
                            let along = AVX2_AHEAD * PANEL_GRANULE;
                            for r in (0..height).filter(|_| !stream) {
                                _mm_prefetch::<_MM_HINT_T0>(mp.wrapping_add(r * ms + along).cast());
                            }
                            for e in e.iter().filter(|e| !e.residual.is_null()) {
                                for r in 0..height {
                                    _mm_prefetch::<_MM_HINT_T0>(e.residual.wrapping_add(r * e.stride + along).cast());
                                }
                            }
                        }
                        const W: usize = PANEL_GRANULE / 8;
                        // The slice's first tile copies what it reads
                        // where it is packed as it goes; the others read
                        // that copy.
                        let packing = !pack.is_null() && row == r0;
                        let columns = match (pack.is_null(), packing) {
                            (true, _) => TileColumns::rows(vp, vs),
                            (false, true) => TileColumns::rows(vp, vs).packing(pack),
                            (false, false) => TileColumns::rows(pack, PANEL_GRANULE),
                        };
                        // The tile's height, its store and accumulate
                        // modes, whether it copies and whether it leads
                        // (prefetches): the block's first slice, whose
                        // weights come from memory, and the tile that
                        // prefetches `v`'s next slice (see `avx2_leads`).
                        macro_rules! tile {
                            ($tile:ident, $pack:literal, $lead:literal) => {
                                match (stream && last, first) {
                                    (true, true) => $tile::<W, true, false, false, $pack, $lead>(
                                        up, columns, mp, chunk, ms, e, next,
                                    ),
                                    (true, false) => {
                                        $tile::<W, true, true, false, $pack, $lead>(up, columns, mp, chunk, ms, e, next)
                                    }
                                    (false, true) => $tile::<W, false, false, false, $pack, $lead>(
                                        up, columns, mp, chunk, ms, e, next,
                                    ),
                                    (false, false) => $tile::<W, false, true, false, $pack, $lead>(
                                        up, columns, mp, chunk, ms, e, next,
                                    ),
                                }
                            };
                        }
                        match (height == AVX2_TALL_ROWS, packing, avx2_leads(t0, next.is_some())) {
                            (true, true, _) => tile!(micro_avx2_tall, true, true),
                            (true, false, true) => tile!(micro_avx2_tall, false, true),
                            (true, false, false) => tile!(micro_avx2_tall, false, false),
                            (false, true, _) => tile!(micro_avx2, true, true),
                            (false, false, true) => tile!(micro_avx2, false, true),
                            (false, false, false) => tile!(micro_avx2, false, false),
                        }
                        row += height;
                    }
                }
            }
        }
        fence_streams(stream);
    }
}
