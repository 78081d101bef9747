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
pub(super) mod x86;

#[cfg(test)]
mod tests;
