//! The panel product's x86 micro-tiles: one register-blocked tile body
//! (`micro_tile!`) instantiated per path and height, the operands' and
//! epilogue's descriptions they take, and the streaming-store helpers; the
//! AVX-512 and AVX2 products that drive them live in [`avx512`] and
//! [`avx2`].

use super::{PANEL_ROWS, PANEL_TILES};
use crate::cpu::activation::{sigmoid_avx2, sigmoid_avx512};
use crate::cpu::epilogue::vector_activation;
use crate::cpu::gemm::StoreEpilogue;
use std::arch::x86_64::*;
use wick_ir::Activation;

mod avx2;
mod avx512;

pub(in crate::cpu::gemm) use avx2::{avx2_leads, avx2_tile_rows, gemm_avx2};
#[cfg(test)]
pub(in crate::cpu::gemm) use avx512::avx512_tile_rows;
pub(in crate::cpu::gemm) use avx512::{avx512_slice, avx512_slice_width, gemm_avx512};

/// How far ahead of a micro-tile's depth step (in floats of the packed
/// weights: 128 steps of a panel's 8 rows, 4 KiB) its weights are
/// prefetched into L2. The weights are the operand that comes from
/// memory when they do not stay in cache between forwards (ResNet18's
/// 3×3 and Winograd-transformed weights: 90 MiB packed; a Winograd
/// product on few tiles streams ~1 MiB of them per product); their
/// panels lie one after the other, but a tile's FMAs wait on them where
/// the hardware prefetchers alone do not run far enough ahead.
/// Alternating forwards of one compiled model on the Intel Xeon VM
/// (AVX-512, 2 threads) against no weight prefetch: ResNet18 0.89-0.93×
/// the time at batch 10 (256 floats ahead: 0.93×; 2048 and 4096:
/// 0.90-0.92×) and 0.90× at batch 1, ResNet34 b1 0.85×, ResNet50 b1
/// 0.95× and b10 0.975×; MobileNetV2, MobileNetV3-Large and
/// EfficientNet-B0 at batch 1 and 10 level (0.98-1.02×). AVX2 forced:
/// ResNet18 b1 0.95×, b10 0.97×. On AVX2 only the tiles that lead
/// prefetch (`avx2_leads`: the block's first column slice, which
/// brings the weights in); every AVX-512 tile does.
const U_AHEAD: usize = 1024;

/// One micro-tile's share of a [`StoreEpilogue`]: the bias of its first
/// row, the residual at its first value (null without one) and the
/// residual's row stride.
#[derive(Clone, Copy)]
pub(in crate::cpu::gemm) struct TileEpilogue {
    bias: *const f32,
    residual: *const f32,
    stride: usize,
    activation: Option<Activation>,
}

impl TileEpilogue {
    /// The share of `e` for the tile whose first value is `m[row][col]`
    /// (indexing checked: a tile starts inside `m`).
    pub(in crate::cpu::gemm) fn at(e: Option<StoreEpilogue>, row: usize, col: usize) -> Option<Self> {
        e.map(|e| TileEpilogue {
            bias: e.bias[row..].as_ptr(),
            residual: e
                .residual
                .map_or(std::ptr::null(), |r| r.data[row * r.stride + col..].as_ptr()),
            stride: e.residual.map_or(0, |r| r.stride),
            activation: e.activation,
        })
    }
}

/// Rows per tall AVX-512 micro-tile: 24 accumulators (12 × 32
/// columns; 27 of the 32 registers, no spill), 2 loads of `v` and 12
/// broadcasts of `u` per depth step for 24 FMAs, against 16 FMAs per 2
/// loads and 8 broadcasts for 8 rows; each slice of `v` passes once
/// per 12 rows rather than 8. Intel Xeon VM (Emerald Rapids, 2
/// threads), forwards alternating in one process, 8-row tiles against
/// these: ResNet50 at batch 10 1.02-1.08× the time (1×1 convs alone
/// 0.98-1.05×), batch 1 0.99-1.05×, ResNet18, ResNet34, MobileNetV2
/// and EfficientNet-B0 within the host's noise (0.97-1.03×).
pub(in crate::cpu::gemm) const AVX512_TALL_ROWS: usize = 12;

/// Whether `epi` asks for streaming stores.
pub(in crate::cpu::gemm) fn streams(epi: Option<StoreEpilogue>) -> bool {
    epi.is_some_and(|e| e.stream)
}

/// Orders this thread's streaming stores (weakly ordered) before its
/// later stores, such as the one that tells another thread the task
/// is done, if it streamed.
#[inline]
fn fence_streams(stream: bool) {
    if stream {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
}

/// Where a micro-tile's weights lie: row `r`'s at `at + d·8 + r` for
/// rows before `split`, at `at + d·8 + r + jump` from there on (a tile
/// that runs into the next panel).
#[derive(Clone, Copy)]
pub(in crate::cpu::gemm) struct TileWeights {
    pub(in crate::cpu::gemm) at: *const f32,
    pub(in crate::cpu::gemm) split: usize,
    pub(in crate::cpu::gemm) jump: usize,
}

/// Where a micro-tile's rows of `v` lie: row `d` at `at + d·stride`, or
/// (a `TABLE` tile) at `at + table[d]`; and where, if `pack` is not
/// null, the tile copies them as it reads them: row `d`'s values at
/// `pack + d·w` (`w` the tile's width), one slice of packed tiles.
#[derive(Clone, Copy)]
pub(in crate::cpu::gemm) struct TileColumns {
    pub(in crate::cpu::gemm) at: *const f32,
    pub(in crate::cpu::gemm) stride: usize,
    pub(in crate::cpu::gemm) table: *const usize,
    pub(in crate::cpu::gemm) pack: *mut f32,
}

impl TileColumns {
    /// Rows `stride` apart from `at`, not copied.
    pub(in crate::cpu::gemm) fn rows(at: *const f32, stride: usize) -> Self {
        TileColumns {
            at,
            stride,
            table: std::ptr::null(),
            pack: std::ptr::null_mut(),
        }
    }

    /// These columns, copied into `pack` as a tile reads them (none
    /// where `pack` is null).
    pub(in crate::cpu::gemm) fn packing(self, pack: *mut f32) -> Self {
        TileColumns { pack, ..self }
    }
}

impl TileWeights {
    /// The weights of the tile from row `row` of `u`, panels `depth`
    /// deep from `u` on: its rows past the panel's last read theirs a
    /// panel on. (Pointer arithmetic only: the tile reads them.)
    pub(in crate::cpu::gemm) fn from_row(u: *const f32, row: usize, depth: usize) -> Self {
        TileWeights {
            at: u.wrapping_add(row / PANEL_ROWS * depth * PANEL_ROWS + row % PANEL_ROWS),
            split: PANEL_ROWS - row % PANEL_ROWS,
            jump: depth.saturating_sub(1) * PANEL_ROWS,
        }
    }
}

/// Defines `$name::<V, STREAM, ACC, TABLE, PACK, LEAD>`, one `$rows × $lanes·V`
/// micro-tile on the `$feature` path: `m[r·ms + j] = Σ_d U[r][d] ·
/// V[d][j]` with the weights `U` where `u` says ([`TileWeights`]) and
/// `V`'s rows where `v` says ([`TileColumns`]: `v.stride` apart, or
/// with `TABLE` at `v.table`'s offsets) (with `ACC`,
/// added to the values `m` holds: a later depth chunk),
/// `$rows` accumulator rows of `V` vectors, `v` loaded once per depth
/// step, `u` broadcast per row, the epilogue (if any) applied as the
/// sums are stored. The one body both SIMD paths share; each picks the
/// shape its register file holds.
///
/// The tile's rows in the next panel (from `u.split` on) are known at
/// compile time for the splits the path's tiles meet (`$splits`; `$rows`:
/// none): each row's weights are then a fixed offset from one of two
/// pointers, where a split known only at run time kept one pointer per
/// row, each advanced every depth step (LLVM's strength reduction): on
/// AVX2, six `add`s per twelve FMAs. Intel Xeon VM, 2 threads: with
/// AVX2 forced, ResNet18's layer2.0.conv1 (3×3 stride 2, 64 -> 128 on
/// 28×28) alone at batch 1 0.94× the time, ResNet50's 64 -> 256 on
/// 56×56 0.94×; `bench` medians of 5 alternating runs, ResNet18 batch
/// 1 0.955× (12.58 -> 12.02 ms), ResNet50 0.967×, MobileNetV2 0.99×,
/// ResNet18 batch 10 0.97×; on AVX-512 ResNet18 batch 1 0.97×,
/// ResNet50 0.975×, MobileNetV2 and ResNet50 batch 10 level.
macro_rules! micro_tile {
    ($name:ident, $body:ident, $feature:literal, $vector:ty, $rows:expr, [$($splits:literal),*], $lanes:expr,
     $zero:ident, $load:ident, $splat:ident, $fmadd:ident, $store:ident, $stream:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {
        /// # Safety
        /// As for the tile's body (below).
        #[inline]
        #[target_feature(enable = $feature)]
        pub(in crate::cpu::gemm) unsafe fn $name<const V: usize, const STREAM: bool, const ACC: bool,
            const TABLE: bool, const PACK: bool, const LEAD: bool>(u: TileWeights, v: TileColumns, mp: *mut f32,
            depth: usize, ms: usize, epi: Option<TileEpilogue>, next: Option<*const f32>) {
            // SAFETY: the caller upholds the body's contract.
            unsafe {
                match u.split {
                    s if s >= $rows => {
                        $body::<V, STREAM, ACC, TABLE, PACK, LEAD, { $rows }>(u, v, mp, depth, ms, epi, next)
                    }
                    $($splits => $body::<V, STREAM, ACC, TABLE, PACK, LEAD, $splits>(u, v, mp, depth, ms, epi, next),)*
                    _ => $body::<V, STREAM, ACC, TABLE, PACK, LEAD, { usize::MAX }>(u, v, mp, depth, ms, epi, next),
                }
            }
        }
        micro_tile_body!($body, $feature, $vector, $rows, $lanes, $zero, $load, $splat, $fmadd, $store,
            $stream, $add, $mul, $max, $min, $sigmoid);
    };
}

/// The body of [`micro_tile`]'s tiles, with `SPLIT` the tile's first
/// row in the next panel (`usize::MAX`: `u.split`, read at run time).
macro_rules! micro_tile_body {
    ($name:ident, $feature:literal, $vector:ty, $rows:expr, $lanes:expr,
     $zero:ident, $load:ident, $splat:ident, $fmadd:ident, $store:ident, $stream:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {
        /// # Safety
        /// The CPU has the path's features; `u.at` has `8·depth` values
        /// from the tile's first row on (and from `u.jump` on, if a
        /// row lies past `u.split`), `v` has `lanes·V` values in each
        /// of its `depth` rows (with `TABLE`, `v.table` has `depth`
        /// offsets), `mp` as many in each of `rows` rows of stride
        /// `ms`; `epi`'s bias has `rows` values
        /// and its residual `lanes·V` in each of `rows` rows. `next`,
        /// if given, is prefetched along `v`'s rows (`lanes·V` values
        /// each, stride `vs`): a hint that never faults, its pointers
        /// formed with wrapping arithmetic and never dereferenced.
        /// With `ACC`, the tile's values in `m` were written before.
        /// With `PACK` (a compile-time switch: a branch in the loop
        /// cost LLVM the accumulators' registers on 8 × 48 tiles), the
        /// tile copies `v`'s rows to `v.pack`, valid for writes of
        /// `depth·lanes·V` values that nothing else accesses meanwhile.
        /// `SPLIT` (unless `usize::MAX`) must equal `u.split` or, for a
        /// tile within one panel, be at least `$rows`. Only a `LEAD` tile
        /// prefetches (the weights [`U_AHEAD`] on, and `next`): a
        /// compile-time switch too, so that the others' depth loop has
        /// no hint and no branch on `next`.
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn $name<
            const V: usize,
            const STREAM: bool,
            const ACC: bool,
            const TABLE: bool,
            const PACK: bool,
            const LEAD: bool,
            const SPLIT: usize,
        >(
            u: TileWeights,
            v: TileColumns,
            mp: *mut f32,
            depth: usize,
            ms: usize,
            epi: Option<TileEpilogue>,
            next: Option<*const f32>,
        ) {
            // SAFETY: within the bounds of the contract above.
            unsafe {
                // Where row `r`'s weights lie from `u.at`: past
                // `u.split`, in the next panel.
                let split = if SPLIT == usize::MAX { u.split } else { SPLIT };
                let rows_at: [usize; $rows] = std::array::from_fn(|r| if r < split { r } else { r + u.jump });
                let mut acc = [[$zero(); V]; $rows];
                if ACC {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        for (j, acc) in acc.iter_mut().enumerate() {
                            *acc = $load(mp.add(r * ms + $lanes * j));
                        }
                    }
                }
                let (mut vp, mut ur, vs) = (v.at, u.at, v.stride);
                if let Some(e) = epi.filter(|e| !e.residual.is_null()) {
                    // The next tile's residual rows, a hint as above.
                    for r in 0..$rows {
                        let row = e.residual.wrapping_add(r * e.stride + $lanes * V);
                        for line in (0..$lanes * V).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line).cast());
                        }
                    }
                }
                // The tile's rows lie in one panel, or two from `u.split` on.
                let two_panels = split < $rows;
                for d in 0..depth {
                    // Hints only, as `next`'s: the weights `U_AHEAD` on
                    // in the tile's panels (past their end: the next
                    // tile's, or no address read at all). Leading tiles
                    // only (see `LEAD`).
                    if LEAD {
                        _mm_prefetch::<_MM_HINT_T1>(ur.wrapping_add(U_AHEAD).cast());
                    }
                    if LEAD && two_panels {
                        _mm_prefetch::<_MM_HINT_T1>(ur.wrapping_add(u.jump + U_AHEAD).cast());
                    }
                    if let Some(next) = next.filter(|_| LEAD) {
                        // A hint: never faults, whatever the address.
                        let row = next.wrapping_add(d * vs);
                        for line in (0..$lanes * V).step_by(16) {
                            // Into L1, but for a wide tile into L2: a 48-column
                            // slice 144 deep is 27 KiB, and the next one
                            // beside it evicted the one in use
                            // (MobileNetV2's 56×56 projections at batch 10:
                            // 0.89-0.94× the time, the model 0.99×).
                            match $lanes * V > PANEL_TILES {
                                true => _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(line).cast()),
                                false => _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line).cast()),
                            }
                        }
                    }
                    // With `TABLE`, row d lies at `v.table[d]` from `v.at`.
                    let row = if TABLE { v.at.add(*v.table.add(d)) } else { vp };
                    let b: [$vector; V] = std::array::from_fn(|j| $load(row.add($lanes * j)));
                    if PACK {
                        for (j, &b) in b.iter().enumerate() {
                            $store(v.pack.add((d * V + j) * $lanes), b);
                        }
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = $splat(*ur.add(rows_at[r]));
                        for j in 0..V {
                            acc[j] = $fmadd(a, b[j], acc[j]);
                        }
                    }
                    vp = vp.add(vs);
                    ur = ur.add(PANEL_ROWS);
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (j, &acc) in acc.iter().enumerate() {
                        let mut v = acc;
                        if let Some(e) = epi {
                            v = $add(v, $splat(*e.bias.add(r)));
                            if !e.residual.is_null() {
                                v = $add(v, $load(e.residual.add(r * e.stride + $lanes * j)));
                            }
                            v = vector_activation!(e.activation, v, $splat, $zero, $add, $mul, $max, $min, $sigmoid);
                        }
                        let at = mp.add(r * ms + $lanes * j);
                        // Streamed only at the aligned address it needs.
                        if STREAM && (at as usize).is_multiple_of($lanes * 4) {
                            $stream(at, v)
                        } else {
                            $store(at, v)
                        }
                    }
                }
            }
        }
    };
}

// Splits each tile meets: AVX-512 tiles start on rows that are
// multiples of 4, AVX2 ones on even rows (of 8-row panels).
#[rustfmt::skip]
micro_tile!(micro_avx512, micro_avx512_body, "avx512f", __m512, PANEL_ROWS, [4], 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, _mm512_stream_ps,
    _mm512_add_ps, _mm512_mul_ps, _mm512_max_ps, _mm512_min_ps, sigmoid_avx512);
#[rustfmt::skip]
micro_tile!(micro_avx512_tall, micro_avx512_tall_body, "avx512f", __m512, AVX512_TALL_ROWS, [4, 8], 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, _mm512_stream_ps,
    _mm512_add_ps, _mm512_mul_ps, _mm512_max_ps, _mm512_min_ps, sigmoid_avx512);
#[rustfmt::skip]
micro_tile!(micro_avx2, micro_avx2_body, "avx2,fma", __m256, AVX2_ROWS, [2], 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, _mm256_stream_ps,
    _mm256_add_ps, _mm256_mul_ps, _mm256_max_ps, _mm256_min_ps, sigmoid_avx2);
#[rustfmt::skip]
micro_tile!(micro_avx2_tall, micro_avx2_tall_body, "avx2,fma", __m256, AVX2_TALL_ROWS, [2, 4], 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, _mm256_stream_ps,
    _mm256_add_ps, _mm256_mul_ps, _mm256_max_ps, _mm256_min_ps, sigmoid_avx2);

/// Half a panel's rows (4) per short AVX2 micro-tile.
const AVX2_ROWS: usize = PANEL_ROWS / 2;
/// Rows per tall AVX2 micro-tile (12 accumulators).
pub(in crate::cpu::gemm) const AVX2_TALL_ROWS: usize = 6;
