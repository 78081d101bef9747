//! A small register-blocked f32 matrix product for pre-packed left operands,
//! `M = U · V` with `U` `[rows, depth]` (packed in panels of [`PANEL_ROWS`]
//! rows), `V` `[depth, cols]` row-major (or packed in the micro-tiles'
//! column slices: [`super::right`]) and `M` `[rows, cols]` row-major,
//! `cols` a multiple of [`PANEL_GRANULE`]. Used by the Winograd convolution,
//! whose 36 products per block are too small for a general GEMM's packing
//! to pay off.
//!
//! Paths chosen at run time: AVX-512F, AVX2 + FMA, and portable scalar; each
//! is tested against an f64 product on every machine that has it.

use super::right::{pack_tiles, Right, RightLayout};
use super::Isa;
use crate::cpu::data::SharedOut;
use crate::cpu::epilogue::in_place;
use wick_ir::Activation;

/// Rows of `U` per panel (and per micro-tile).
pub(crate) const PANEL_ROWS: usize = 8;
/// Columns of `V` per full micro-tile.
pub(crate) const PANEL_TILES: usize = 32;
/// Columns per AVX-512 micro-tile and packed slice: 8 rows × 48
/// columns, 24 accumulators as in a 12 × 32 tile, but 3 loads of `v`
/// and 8 broadcasts per 24 FMAs rather than 2 and 12, no tile across
/// two panels, and a 7×7 plane's 49 columns one slice rather than a
/// 32- and a 16-column one (each pass of the weights). Intel Xeon VM
/// (AVX-512, 2 threads), `cargo xtask bench` medians of 4-5 alternating
/// runs against 12 × 32 there: at batch 10 ResNet18 0.97× the time,
/// ResNet50 0.97×, MobileNetV2 0.99×, MobileNetV3-Large and
/// EfficientNet-B0 level; at batch 1 ResNet34 0.99×, ResNet18,
/// ResNet50, MobileNetV2, MobileNetV3-Large 0.99-1.00×, EfficientNet-B0
/// level. Packed operands' slices 48 wide too ([`super::right`]: the
/// 1×1 conv's input packed once for all its runs at batch 1, and scaled
/// inputs), against 32: ResNet50 0.99× at batch 1 and level at batch 10,
/// EfficientNet-B0 0.98× at batch 1, MobileNetV3-Large 0.99× at batch 1
/// and 0.97× at batch 10, MobileNetV2 level. The tile's copy into the
/// packed slice must be a compile-time switch (`PACK`): as a branch in
/// the depth loop it left LLVM short of registers, the accumulators went
/// to the stack, and ResNet50's 128 -> 512 + residual on 28×28 took 2.7×
/// the time.
pub(crate) const WIDE_TILE: usize = 48;
/// `cols` must be a multiple of this (a half micro-tile finishes the row).
pub(crate) const PANEL_GRANULE: usize = 16;

/// Products with a row-major `v` deeper than this run in depth chunks on
/// AVX2: a 16-column slice of `v` 512 deep is 32 KiB, the whole L1.
const AVX2_MAX_DEPTH: usize = 512;

/// [`AVX2_MAX_DEPTH`] for a packed `v` (contiguous slices, or copied into
/// them by the product as it goes): a slice that outgrows the L1 is read
/// in order, which the hardware prefetchers follow, so chunking only adds
/// each chunk's reload of the sums and, in a 1×1 conv, a separate packing
/// pass. On the Zen 3 VM, ResNet50's 1×1 conv 1024 -> 256 on 14×14 at
/// batch 10 alone 0.87-0.88× the time unchunked (two series of 6
/// alternating runs, 12 of 12 faster); in the model (`scripts/ab-nodes.sh`,
/// each node against the median node, a noisy host) its 1024 -> 256 convs
/// 0.92-0.99× and 1024 -> 512 0.84× in one run, level within that run's
/// ±10% in another. Row-major operands stay at 512: with every product
/// unchunked to 1024, the 1024-deep 1×1 stride-2 downsample, which reads
/// its input in place, took 1.06×.
const AVX2_MAX_PACKED_DEPTH: usize = 1024;

/// Whether `isa`'s product `depth` deep runs in depth chunks (AVX2 past
/// [`AVX2_MAX_DEPTH`], past [`AVX2_MAX_PACKED_DEPTH`] where `v` is
/// `packed`): a chunk's rows of `v` stay in the L2 while the weights pass,
/// so `v` as a whole need not fit it.
pub(crate) fn chunks_depth(isa: Isa, depth: usize, packed: bool) -> bool {
    let most = match packed {
        true => AVX2_MAX_PACKED_DEPTH,
        false => AVX2_MAX_DEPTH,
    };
    isa == Isa::Avx2Fma && depth > most
}

/// Packs row-major `plain` `[rows, depth]` into panels
/// `[rows / PANEL_ROWS][depth][PANEL_ROWS]` (`packed` holds `rows` rounded
/// up to whole panels, times `depth`; rows past `rows` are zeros).
pub(crate) fn pack_panels(plain: &[f32], rows: usize, depth: usize, packed: &mut [f32]) {
    let padded = rows.div_ceil(PANEL_ROWS) * PANEL_ROWS;
    assert!(plain.len() == rows * depth && packed.len() == padded * depth);
    packed.fill(0.0);
    for (row, values) in plain.chunks_exact(depth.max(1)).enumerate() {
        for (d, &value) in values.iter().enumerate() {
            packed[panel_index(depth, row, d)] = value;
        }
    }
}

/// Where [`pack_panels`] puts element (`row`, `d`) of a matrix `depth` deep.
pub(crate) fn panel_index(depth: usize, row: usize, d: usize) -> usize {
    (row / PANEL_ROWS * depth + d) * PANEL_ROWS + row % PANEL_ROWS
}

/// `m = u · v`: `u` packed by [`pack_panels`] (`rows × depth`), `v`
/// `[depth, cols]`, `m` `[rows, cols]`; `isa` must be one of [`Isa::available`].
pub(crate) fn panel_gemm(isa: Isa, u: &[f32], v: &[f32], m: &mut [f32], rows: usize, depth: usize, cols: usize) {
    panel_gemm_chunked(isa, u, v, m, [rows, depth, cols], None);
}

/// How a deep product is cut so that a slice of `v` stays in L1 while
/// the weights pass it: depth chunks of `depth` steps, each over blocks
/// of `rows` rows (a multiple of [`PANEL_ROWS`]), each chunk adding to
/// the sums of the last in `m`, the epilogue with the last. Chosen from
/// the caches ([`crate::machine::Machine::depth_chunks`]); the AVX-512
/// path takes it, AVX2 cuts its products itself ([`chunks_depth`]) and the
/// scalar path runs them whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DepthChunks {
    /// Depth steps per chunk (at least 1).
    pub(crate) depth: usize,
    /// Rows per block of a chunk.
    pub(crate) rows: usize,
}

/// [`panel_gemm`] in `chunks`, if given ([`DepthChunks`]): the same sums,
/// added in the same order within a chunk.
pub(crate) fn panel_gemm_chunked(
    isa: Isa,
    u: &[f32],
    v: &[f32],
    m: &mut [f32],
    size: [usize; 3],
    chunks: Option<DepthChunks>,
) {
    let [_, _, cols] = size;
    gemm_checked(
        isa,
        u,
        Strided { data: v, stride: cols }.into(),
        m,
        cols,
        size,
        None,
        chunks,
    );
}

/// [`gemm_into`] on operands it checks first, into an exclusive `m`: the
/// one body of [`panel_gemm_strided`] and [`panel_gemm_chunked`].
#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    isa: Isa,
    u: &[f32],
    v: Right,
    m: &mut [f32],
    m_stride: usize,
    size: [usize; 3],
    epilogue: Option<StoreEpilogue>,
    chunks: Option<DepthChunks>,
) {
    let span = check_operands(isa, u, v, m_stride, size, epilogue);
    assert!(span.is_some_and(|span| m.len() >= span));
    check_chunks(chunks);
    // SAFETY: operands checked above; `m` is exclusively borrowed and holds the span.
    unsafe { gemm_into(isa, u, v, m.as_mut_ptr(), m_stride, size, epilogue, chunks) }
}

/// Panics unless `chunks` (if any) has a depth and whole panels of rows.
fn check_chunks(chunks: Option<DepthChunks>) {
    assert!(
        chunks.is_none_or(|c| c.depth > 0 && c.rows > 0 && c.rows.is_multiple_of(PANEL_ROWS)),
        "depth chunks of no depth or of partial panels: {chunks:?}"
    );
}

/// The epilogue a product gets as it is stored (in registers on the SIMD
/// paths): `m[r][c] = act(m[r][c] + bias[r] (+ residual[r][c]))`, the
/// order of [`crate::cpu::epilogue::value`].
#[derive(Clone, Copy)]
pub(crate) struct StoreEpilogue<'a> {
    /// One value per row of `m`.
    pub(crate) bias: &'a [f32],
    /// `[rows, cols]` like `m`, rows `stride` apart.
    pub(crate) residual: Option<Strided<'a>>,
    pub(crate) activation: Option<Activation>,
    /// Store with non-temporal hints (past the caches, no read for
    /// ownership) where a vector's address is aligned to the vector: for
    /// an output too large to stay in cache until its reader comes, where
    /// that read would double a store's memory traffic. The scalar path
    /// ignores it.
    pub(crate) stream: bool,
}

/// A row-major matrix operand whose rows are `stride` values apart.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    /// The values, from the first row's first column.
    pub(crate) data: &'a [f32],
    /// Distance between row starts, in values.
    pub(crate) stride: usize,
}

/// [`panel_gemm`] on operands inside larger matrices: `v` is `[depth,
/// cols]` with rows `v.stride` apart (or packed in tiles: [`Right`]), `m`
/// `[rows, cols]` with rows `m_stride` apart (a block of an NCHW plane: a
/// 1×1 conv reads its input and writes its output in place), with
/// `epilogue` applied as `m` is stored, if given. `[rows, depth, cols]` as
/// for [`panel_gemm`]; the strides are at least `cols`.
pub(crate) fn panel_gemm_strided<'v>(
    isa: Isa,
    u: &[f32],
    v: impl Into<Right<'v>>,
    m: &mut [f32],
    m_stride: usize,
    size: [usize; 3],
    epilogue: Option<StoreEpilogue>,
) {
    gemm_checked(isa, u, v.into(), m, m_stride, size, epilogue, None);
}

/// Rows `stride` apart from element `start` of a buffer several tasks
/// write at once: a block of columns of NCHW planes whose other columns
/// other tasks write.
#[derive(Clone, Copy)]
pub(crate) struct SharedRows {
    pub(crate) out: SharedOut,
    pub(crate) start: usize,
    pub(crate) stride: usize,
}

/// [`panel_gemm_strided`] into elements `m.start + r·m.stride + c` (`r <
/// rows`, `c < cols`) of a shared buffer.
///
/// # Safety
/// No other task reads or writes those elements while this runs, and the
/// buffer outlives the call (the span is checked against it here).
/// `chunks` as [`panel_gemm_chunked`] takes them.
pub(crate) unsafe fn panel_gemm_shared<'v>(
    isa: Isa,
    u: &[f32],
    v: impl Into<Right<'v>>,
    m: SharedRows,
    size: [usize; 3],
    epilogue: Option<StoreEpilogue>,
    chunks: Option<DepthChunks>,
) {
    let v = v.into();
    check_shared(isa, u, v, m, size, epilogue);
    check_chunks(chunks);
    // SAFETY: in bounds (checked above); exclusive by the caller's contract.
    unsafe { gemm_into(isa, u, v, m.out.ptr_at(m.start), m.stride, size, epilogue, chunks) }
}

/// [`panel_gemm_shared`] on a row-major `v` (rows a plane apart: a 1×1
/// conv's input read in place) that the product copies into micro-tile
/// slices in `tiles` as it goes, so that every tile reads a contiguous
/// slice ([`super::right`]'s reason to pack). On AVX-512, and on AVX2
/// where the product is not cut in depth chunks ([`chunks_depth`]), the
/// first micro-tile of each column slice copies the values it loads
/// anyway into `tiles` (one slice, reused: `depth·48` values at most,
/// `depth·16` on AVX2), overlapped with its FMAs, and the slice's other
/// tiles read the copy; elsewhere the operand is packed first
/// ([`pack_tiles`]: `depth·cols` values of `tiles`). AVX2 (forced on the
/// Intel Xeon VM, 2 threads) against packing first: ResNet50 at batch 1
/// 0.976× the time (7 alternating runs; its 1×1 convs that pack, on
/// 28×28 to 7×7 planes, 0.88-0.95× in profiles), MobileNetV2 and
/// EfficientNet-B0 at batch 1 level, ResNet50 at batch 10 0.996×. The
/// copy first was a pass of its own whose strided reads waited on memory:
/// 11% of ResNet50's 512 -> 128 conv on 28×28 alone in `perf` (one
/// thread). Against it (both with the 32-column tiles of the time,
/// before [`WIDE_TILE`]), on the Intel Xeon VM
/// (AVX-512, 2 threads), `cargo xtask bench` medians of 5 alternating
/// runs: ResNet50 0.98× the time at batch 10 and at batch 1, MobileNetV2
/// 0.985× at batch 10 and 0.97× at batch 1, MobileNetV3-Large at batch
/// 10 level (its scaled inputs are still packed first, the scale going
/// into the copy); per node, MobileNetV2's projections on 14×14 at batch
/// 10 0.90-0.94×, those on 7×7 (then one and a half slices) 0.97-1.03×.
///
/// # Safety
/// As [`panel_gemm_shared`]; `tiles` holds `depth·cols` values.
pub(crate) unsafe fn panel_gemm_shared_packing(
    isa: Isa,
    u: &[f32],
    v: Strided,
    tiles: &mut [f32],
    m: SharedRows,
    size: [usize; 3],
    epilogue: Option<StoreEpilogue>,
) {
    let [_, depth, cols] = size;
    assert!(depth.checked_mul(cols).is_some_and(|n| tiles.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 || (isa == Isa::Avx2Fma && !chunks_depth(isa, depth, true)) {
        check_shared(isa, u, v.into(), m, size, epilogue);
        let (v, layout) = Right::from(v).parts(depth, cols);
        let layout = layout.packing_into(tiles.as_mut_ptr());
        let (at, ms) = (m.out.ptr_at(m.start), m.stride);
        // SAFETY: in bounds (checked above); `m` exclusive by the caller's
        // contract; `tiles`, borrowed mutably, holds `depth·cols` values,
        // at least one slice (`depth` rows of 48 columns, or of 32 or 16
        // where the columns are fewer; 16 on AVX2).
        unsafe {
            match isa {
                Isa::Avx512 => x86::gemm_avx512(u, v, layout, at, size, ms, epilogue, None),
                _ => x86::gemm_avx2(u, v, layout, at, size, ms, epilogue),
            }
        }
        return;
    }
    let v = pack_tiles(isa, v, [depth, cols], tiles, None);
    // SAFETY: the caller's contract.
    unsafe { panel_gemm_shared(isa, u, v, m, size, epilogue, None) }
}

/// [`check_operands`] for a product into rows of a shared buffer, and
/// the span it writes checked against that buffer: panics where either
/// fails.
fn check_shared(isa: Isa, u: &[f32], v: Right, m: SharedRows, size: [usize; 3], epilogue: Option<StoreEpilogue>) {
    let Some(span) = check_operands(isa, u, v, m.stride, size, epilogue) else {
        panic!("panel product of {size:?} with stride {} overflows", m.stride)
    };
    m.out.check(m.start, m.start.saturating_add(span));
}

/// Panics unless the operands of a `[rows, depth, cols]` product on `isa`
/// fit (whole panels and tiles, strides at least `cols`, packed slices of
/// `isa`'s width, `u`, `v` and the epilogue's
/// operands long enough); returns the span of `m` (`(rows - 1)·m_stride +
/// cols`, 0 without rows), `None` when it overflows.
fn check_operands(
    isa: Isa,
    u: &[f32],
    v: Right,
    m_stride: usize,
    [rows, depth, cols]: [usize; 3],
    epilogue: Option<StoreEpilogue>,
) -> Option<usize> {
    assert!(rows.is_multiple_of(PANEL_ROWS) && cols.is_multiple_of(PANEL_GRANULE));
    assert!(m_stride >= cols);
    // Checked sizes: a wrapped length must not let a short buffer through.
    // A `[n, cols]` matrix with rows `stride` apart spans (n - 1)·stride + cols.
    let spans = |n: usize, stride: usize| match n {
        0 => Some(0),
        n => (n - 1).checked_mul(stride)?.checked_add(cols),
    };
    let holds = |buffer: usize, n: Option<usize>| n.is_some_and(|n| buffer >= n);
    assert!(holds(u.len(), rows.checked_mul(depth)) && v.holds(isa, depth, cols));
    if let Some(e) = epilogue {
        assert!(e.bias.len() >= rows);
        if let Some(r) = e.residual {
            assert!(r.stride >= cols && holds(r.data.len(), spans(rows, r.stride)));
        }
    }
    spans(rows, m_stride)
}

/// The product on `isa` into `m`.
///
/// # Safety
/// [`check_operands`] accepted the operands, `m` is valid for writes of
/// its span, and nothing else accesses the elements the product writes
/// (`r·m_stride + c`, `r < rows`, `c < cols`) meanwhile. `chunks` as
/// [`panel_gemm_chunked`] takes them.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    isa: Isa,
    u: &[f32],
    v: Right,
    m: *mut f32,
    m_stride: usize,
    size: [usize; 3],
    epilogue: Option<StoreEpilogue>,
    chunks: Option<DepthChunks>,
) {
    let [rows, depth, cols] = size;
    let (v, layout) = v.parts(depth, cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the spans were checked by the caller (the kernels index
        // within them only), and `Isa::Avx512` is only handed out when the
        // CPU has AVX-512F.
        Isa::Avx512 => unsafe { x86::gemm_avx512(u, v, layout, m, size, m_stride, epilogue, chunks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA.
        Isa::Avx2Fma => unsafe { x86::gemm_avx2(u, v, layout, m, size, m_stride, epilogue) },
        _ => {
            // SAFETY: as above; the scalar product writes the same elements.
            unsafe { gemm_scalar(u, v, layout, m, size, m_stride) };
            if let Some(e) = epilogue {
                for (r, &bias) in e.bias[..rows].iter().enumerate() {
                    let residual = e.residual.map(|res| &res.data[r * res.stride..][..cols]);
                    // SAFETY: row r's `cols` values, written by this product only.
                    let row = unsafe { std::slice::from_raw_parts_mut(m.add(r * m_stride), cols) };
                    in_place(row, bias, residual, e.activation);
                }
            }
        }
    }
}

/// # Safety
/// As [`gemm_into`], for `m`'s rows `ms` apart and `v` laid out as `layout` says.
unsafe fn gemm_scalar(
    u: &[f32],
    v: &[f32],
    layout: RightLayout,
    m: *mut f32,
    [rows, depth, cols]: [usize; 3],
    ms: usize,
) {
    for panel in 0..rows / PANEL_ROWS {
        let u = &u[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
        for t0 in (0..cols).step_by(PANEL_GRANULE) {
            let mut acc = [[0f32; PANEL_GRANULE]; PANEL_ROWS];
            let (at, vs) = layout.at(t0);
            for d in 0..depth {
                let vv = &v[at + d * vs..][..PANEL_GRANULE];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = u[d * PANEL_ROWS + r];
                    for (acc, &b) in acc.iter_mut().zip(vv) {
                        *acc += a * b;
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: a tile of row `panel·8 + r` inside the product's
                // span, written by this product only (the caller's contract).
                let tile =
                    unsafe { std::slice::from_raw_parts_mut(m.add((panel * PANEL_ROWS + r) * ms + t0), PANEL_GRANULE) };
                tile.copy_from_slice(acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{
        chunks_depth, DepthChunks, Isa, RightLayout, StoreEpilogue, PANEL_GRANULE, PANEL_ROWS, PANEL_TILES, WIDE_TILE,
    };
    use crate::cpu::activation::{sigmoid_avx2, sigmoid_avx512};
    use crate::cpu::epilogue::vector_activation;
    use std::arch::x86_64::*;
    use wick_ir::Activation;

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
    pub(super) unsafe fn gemm_avx512(
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
            // are cut the same way ([`super::right`]). A shallow product's
            // whole slices in row sweeps instead ([`super::super::row_sweep`]).
            let size = [rows, depth, cols];
            let mut t0 = match super::super::row_sweep::applies(size) {
                true => super::super::row_sweep::avx512(u, v, layout, m, size, ms, epi),
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
                            WIDE_TILE => {
                                avx512_part_tiles::<{ WIDE_TILE / 16 }>(u, columns, m, at, ms, epi, next, part)
                            }
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
                            true => micro_avx512_tall::<V, $stream, $acc, false, false, true>(
                                w, columns, mp, len, ms, e, next,
                            ),
                            false => {
                                micro_avx512::<V, $stream, $acc, false, false, true>(w, columns, mp, len, ms, e, next)
                            }
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
                            (true, true) => micro_avx512_tall::<V, true, false, TABLE, $pack, true>(
                                w, $columns, mp, depth, ms, e, next,
                            ),
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
                                v = vector_activation!(
                                    e.activation,
                                    v,
                                    $splat,
                                    $zero,
                                    $add,
                                    $mul,
                                    $max,
                                    $min,
                                    $sigmoid
                                );
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
    /// `packed` `v` runs whole to [`super::AVX2_MAX_PACKED_DEPTH`]
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
    /// As [`gemm_avx512`], with AVX2 and FMA instead of AVX-512F (and
    /// packed slices 16 columns wide; `layout.pack()`, valid for writes of
    /// `depth·cols` values as there, is only written by a row sweep and by
    /// a product in one depth chunk and one block of rows, [`avx2_blocks`],
    /// and ignored otherwise). A shallow product runs in row sweeps
    /// ([`super::super::row_sweep`]). AVX2 has 16
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
    pub(super) unsafe fn gemm_avx2(
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
            // ([`super::super::row_sweep`]).
            if super::super::row_sweep::applies([rows, depth, cols]) {
                super::super::row_sweep::avx2(u, v, layout, m, [rows, depth, cols], ms, epi);
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
                        let next = (row_major && t0 + PANEL_GRANULE < cols)
                            .then(|| vp.wrapping_add(AVX2_AHEAD * PANEL_GRANULE));
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
                                        _mm_prefetch::<_MM_HINT_T0>(
                                            e.residual.wrapping_add(r * e.stride + along).cast(),
                                        );
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
                                        (true, false) => $tile::<W, true, true, false, $pack, $lead>(
                                            up, columns, mp, chunk, ms, e, next,
                                        ),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every available path equals a plain triple loop (f64 accumulation)
        /// within an f32 rounding bound, with `v` and `m` inside wider
        /// matrices (strides past `cols`; the gaps of `m` stay untouched),
        /// from an empty product (zeros) to deep ones.
        #[test]
        fn paths_match_plain_product(
            // Up to 5 panels: AVX-512's 12-row tiles from a panel's start
            // and from its middle, and the 8-row ones after them; up to 7
            // granules: one or two 48-column slices and the 16 or 32
            // columns after them.
            panels in 1usize..6,
            depth in 0usize..300,
            granules in 1usize..8,
            [v_pad, m_pad] in [0usize..20, 0usize..20],
            seed in any::<u64>(),
        ) {
            let (rows, cols) = (panels * PANEL_ROWS, granules * PANEL_GRANULE);
            let (vs, ms) = (cols + v_pad, cols + m_pad);
            let mut next = crate::test_util::uniform(seed);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            // The last row is `cols` long: the span a strided operand needs.
            let v: Vec<f32> = (0..depth.saturating_sub(1) * vs + cols).map(|_| next()).collect();
            let mut packed = vec![0f32; rows * depth];
            pack_panels(&plain, rows, depth, &mut packed);
            for isa in Isa::available() {
                let mut m = vec![f32::NAN; (rows - 1) * ms + cols];
                panel_gemm_strided(isa, &packed, Strided { data: &v, stride: vs }, &mut m, ms, [rows, depth, cols], None);
                for r in 0..rows {
                    for c in 0..cols {
                        let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v[d * vs + c]));
                        let want: f64 = terms.clone().sum();
                        // Any f32 summation order: |error| <= n·ε·Σ|aᵢbᵢ| (to first order).
                        let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                        let got = f64::from(m[r * ms + c]);
                        prop_assert!((got - want).abs() <= bound, "{isa:?} r={r} c={c}: {got} vs {want}");
                    }
                    if r + 1 < rows {
                        prop_assert!(m[r * ms + cols..(r + 1) * ms].iter().all(|x| x.is_nan()), "{isa:?} wrote a gap");
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// A product in depth chunks ([`DepthChunks`]: any chunk depth,
        /// blocks of 1-4 panels) equals the f64 product on every path, into
        /// an exclusive output or into shared rows with the epilogue (bias,
        /// residual, ReLU: applied once, after the last chunk), the gaps
        /// between `m`'s rows untouched.
        #[test]
        fn chunked_products_match_plain_product(
            panels in 1usize..6,
            depth in 1usize..300,
            granules in 1usize..8,
            chunk in 1usize..80,
            block_panels in 1usize..5,
            shared in any::<bool>(),
        ) {
            let case = super::super::test_case::Case::new(panels, depth, granules * PANEL_GRANULE);
            let (rows, cols, ms) = (case.rows, case.cols, case.ms);
            let chunks = Some(DepthChunks { depth: chunk, rows: block_panels * PANEL_ROWS });
            for isa in Isa::available() {
                let mut m = vec![f32::NAN; case.len()];
                let epilogue = shared.then(|| case.epilogue());
                match shared {
                    true => {
                        let rows_of = SharedRows { out: SharedOut::over(&mut m), start: 0, stride: ms };
                        // SAFETY: `m` outlives the call, which alone accesses it.
                        unsafe { panel_gemm_shared(isa, &case.packed, case.v(), rows_of, case.size(), epilogue, chunks) };
                    }
                    false => {
                        // The exclusive form takes `v` and `m` `cols` wide.
                        let v: Vec<f32> = (0..depth).flat_map(|d| case.v[d * case.stride..][..cols].to_vec()).collect();
                        let mut dense = vec![f32::NAN; rows * cols];
                        panel_gemm_chunked(isa, &case.packed, &v, &mut dense, case.size(), chunks);
                        for r in 0..rows {
                            m[r * ms..][..cols].copy_from_slice(&dense[r * cols..][..cols]);
                        }
                    }
                }
                for r in 0..rows {
                    for c in 0..cols {
                        let terms = (0..depth)
                            .map(|d| f64::from(case.plain[r * depth + d]) * f64::from(case.v[d * case.stride + c]));
                        let sum: f64 = terms.clone().sum();
                        let want = match shared {
                            true => (sum + f64::from(case.bias[r]) + f64::from(case.residual[r * ms + c])).max(0.0),
                            false => sum,
                        };
                        let bound = 1.01 * (depth + 2) as f64 * f64::from(f32::EPSILON)
                            * (terms.map(f64::abs).sum::<f64>() + 2.0);
                        let got = f64::from(m[r * ms + c]);
                        prop_assert!((got - want).abs() <= bound, "{isa:?} r={r} c={c}: {got} vs {want}");
                    }
                    if r + 1 < rows {
                        prop_assert!(m[r * ms + cols..(r + 1) * ms].iter().all(|x| x.is_nan()), "{isa:?} wrote a gap");
                    }
                }
            }
        }
    }

    /// Packing the operand as the product goes gives the product of the
    /// operand packed first, bit for bit (the same sums in the same
    /// order), with the epilogue (bias, residual, ReLU), on every path:
    /// one and two 8 × 48 slices, the 12- and 8-row tiles of a 32- or
    /// 16-column rest, `m` and the residual inside wider rows (the gaps
    /// untouched), shallow and deep operands.
    #[test]
    fn packing_as_it_goes_equals_packing_first() {
        for (panels, depth, cols) in [
            (1, 3, 16),
            (3, 64, 48),
            (5, 300, 96),
            (4, 700, 80),
            (2, 1100, 32),
            (2, 1, 32),
        ] {
            let case = super::super::test_case::Case::new(panels, depth, cols);
            let (size, v) = (case.size(), case.v());
            for isa in Isa::available() {
                let mut tiles = vec![f32::NAN; depth * cols];
                let first = pack_tiles(isa, v, [depth, cols], &mut tiles, None);
                let mut want = vec![f32::NAN; case.len()];
                panel_gemm_strided(
                    isa,
                    &case.packed,
                    first,
                    &mut want,
                    case.ms,
                    size,
                    Some(case.epilogue()),
                );
                let got = case.packing_as_it_goes(isa);
                assert!(
                    want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {size:?}"
                );
            }
        }
    }

    /// Products deeper than the AVX2 path's chunk (several depth chunks and
    /// row blocks) equal the f64 product, with the epilogue (bias,
    /// residual, ReLU) applied once, after the last chunk, on every path.
    #[test]
    fn deep_products_with_epilogue() {
        let (rows, cols) = (17 * PANEL_ROWS, 3 * PANEL_GRANULE);
        for depth in [513, 700, 1100, 2304] {
            let mut next = crate::test_util::uniform(depth as u64);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let v: Vec<f32> = (0..depth * cols).map(|_| next()).collect();
            let bias: Vec<f32> = (0..rows).map(|_| next()).collect();
            let residual: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let mut packed = vec![0f32; rows * depth];
            pack_panels(&plain, rows, depth, &mut packed);
            // Row-major (chunked past 512 on AVX2) and packed in tiles
            // (chunked past 1024).
            let layouts = Isa::available().into_iter().flat_map(|isa| [(isa, false), (isa, true)]);
            for (isa, tiled) in layouts {
                let mut m = vec![f32::NAN; rows * cols];
                let epilogue = StoreEpilogue {
                    bias: &bias,
                    residual: Some(Strided {
                        data: &residual,
                        stride: cols,
                    }),
                    activation: Some(Activation::Relu),
                    stream: false,
                };
                let v = Strided { data: &v, stride: cols };
                let mut tiles = vec![f32::NAN; depth * cols];
                let right = match tiled {
                    true => pack_tiles(isa, v, [depth, cols], &mut tiles, None),
                    false => Right::Rows(v),
                };
                panel_gemm_strided(isa, &packed, right, &mut m, cols, [rows, depth, cols], Some(epilogue));
                for r in 0..rows {
                    for c in 0..cols {
                        let terms =
                            (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v.data[d * cols + c]));
                        let sum: f64 = terms.clone().sum();
                        let want = (sum + f64::from(bias[r]) + f64::from(residual[r * cols + c])).max(0.0);
                        let bound = 1.01
                            * (depth + 2) as f64
                            * f64::from(f32::EPSILON)
                            * (terms.map(f64::abs).sum::<f64>() + 2.0);
                        let got = f64::from(m[r * cols + c]);
                        assert!(
                            (got - want).abs() <= bound,
                            "{isa:?} tiled {tiled} depth {depth} r={r} c={c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// AVX-512's and AVX2's tile heights cover every whole number of
    /// panels exactly, each tile within its rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_heights_cover_whole_panels() {
        for panels in 1..=64 {
            for height in [x86::avx512_tile_rows, x86::avx2_tile_rows] {
                let (mut row, rows) = (0, panels * PANEL_ROWS);
                while row < rows {
                    let h = height(rows - row);
                    assert!(h > 0 && row + h <= rows, "{panels} panels: a tile of {h} at row {row}");
                    row += h;
                }
            }
        }
    }
}
