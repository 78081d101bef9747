//! The Winograd F(4×4, 3×3) transforms: `Bᵀ d B` of the input patches
//! (gathered from NCHW with AVX-512 masked gathers or scalar loads), `Aᵀ m
//! A` of the products with the fused epilogue, and `G g Gᵀ` of the weights.
//! The two data transforms run per range of channels as [`IsaBody`]s,
//! compiled for the path the conv was packed for.

use super::f4::{Block, Run, TilePos, ALPHA, LANES, M, XI};
use crate::cpu::data::SharedOut;
use crate::cpu::epilogue;
use crate::cpu::gemm::{Isa, IsaBody};
use std::ops::Range;
use wick_ir::Activation;

/// How many channels ahead the input transform prefetches its patches
/// (where it does: [`super::f4::WinogradF4::prefetches`]).
pub(super) const PREFETCH_CHANNELS: usize = 2;

/// A chunk's 6×6 patches, `[row][col][lane]`: one tile per lane.
type Patches = [[[f32; LANES]; ALPHA]; ALPHA];

/// `Bᵀ d` for one column of 6 lane vectors.
#[inline(always)]
fn input_transform(d: &[[f32; LANES]; ALPHA]) -> [[f32; LANES]; ALPHA] {
    let mut r = [[0f32; LANES]; ALPHA];
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        r[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        r[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        r[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `Aᵀ m` for one column of 6 lane vectors.
#[inline(always)]
fn output_transform(m: &[[f32; LANES]; ALPHA]) -> [[f32; LANES]; M] {
    let mut o = [[0f32; LANES]; M];
    for l in 0..LANES {
        let [m0, m1, m2, m3, m4, m5] = [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]];
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o[0][l] = m0 + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m5;
    }
    o
}

/// `G g Gᵀ` of one 3×3 kernel, in f64.
pub(super) fn weight_transform(g: &[f32]) -> [f64; XI] {
    const G: [[f64; 3]; ALPHA] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut gg = [[0f64; 3]; ALPHA];
    for (a, row) in gg.iter_mut().enumerate() {
        for (j, value) in row.iter_mut().enumerate() {
            *value = (0..3).map(|i| G[a][i] * f64::from(g[i * 3 + j])).sum();
        }
    }
    let mut u = [0f64; XI];
    for a in 0..ALPHA {
        for b in 0..ALPHA {
            u[a * ALPHA + b] = (0..3).map(|j| gg[a][j] * G[b][j]).sum();
        }
    }
    u
}

/// The input transform of channels `channels` of a block: writes
/// `V[ξ][c][0..cols]` for each through `v`, which points at the block's
/// `[ξ][C][cols]` scratch (ξ matrices `v_stride` apart); columns past the
/// tiles get zeros.
pub(super) struct InputChannels<'a> {
    pub(super) run: &'a Run<'a>,
    pub(super) block: &'a Block,
    pub(super) channels: Range<usize>,
    pub(super) v: SharedOut,
}

impl IsaBody for InputChannels<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let InputChannels {
            run,
            block,
            channels,
            v,
        } = self;
        // The chunk's patches (`load_patches`) and `Bᵀ d` on the way
        // (`finish_input_chunk`), every value written for each chunk: zeroed
        // once for the channels, not once per chunk (a `memset` each, ~2% of
        // ResNet18's forward at batch 1 on either path).
        let (mut d, mut cols_t): (Patches, Patches) = ([[[0.0; LANES]; ALPHA]; ALPHA], [[[0.0; LANES]; ALPHA]; ALPHA]);
        for c in channels {
            // `cols` is a multiple of LANES (PANEL_GRANULE), so every chunk is full.
            for start in (0..block.cols).step_by(LANES) {
                load_patches(run, block, c, start, &mut d);
                finish_input_chunk(run, block, (&d, &mut cols_t), c, start, v);
            }
        }
    }
}

/// `d[row][col][lane]`: the 6×6 input patch in channel `c` of each tile of
/// the chunk at `start`, every value written (zero outside the image, and
/// in lanes past the block's tiles).
#[inline(always)]
fn load_patches(run: &Run<'_>, block: &Block, c: usize, start: usize, d: &mut Patches) {
    let (s, input) = (&run.tiles.shape, run.input);
    let plane_len = s.in_plane();
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Some(g)) = (run.conv.w.isa, block.gathers.get(start / LANES)) {
        // The chunk's channel-0 offsets, moved to channel c (fits i32:
        // `GatherChunk::for_block` checked the input's length).
        let shift = (c * plane_len) as i32;
        let (offsets, row_mask, col_mask) = (g.offsets.map(|o| o + shift), &g.row_mask, &g.col_mask);
        // SAFETY: the CPU has AVX-512F (Isa::Avx512); a lane reads
        // offsets[lane] + r·W + col only where row r and column col of
        // its patch lie inside its image's plane, which is inside `input`
        // (and input.len() fits i32, so no offset wraps).
        unsafe { gather_patch_avx512(input, &offsets, row_mask, col_mask, s.width, d) };
        if run.prefetch && c + PREFETCH_CHANNELS < s.channels {
            let ahead = PREFETCH_CHANNELS * plane_len;
            // A row's mask bit is set only for lanes holding a tile.
            for (lane, &o) in offsets.iter().enumerate() {
                for (r, mask) in row_mask.iter().enumerate() {
                    if mask >> lane & 1 == 1 {
                        // Fits isize: input.len() fits i32 (the gathers'
                        // check); a border tile's origin may lie a column
                        // before its row (hence isize, and the hint only).
                        let at = (o as isize + (ahead + r * s.width) as isize).max(0) as usize;
                        crate::cpu::prefetch::read_line(input.as_ptr().wrapping_add(at));
                    }
                }
            }
        }
        return;
    }
    for lane in 0..LANES {
        let Some(p) = block.positions.get(start + lane) else {
            // Past the tiles: zero columns of V.
            d.iter_mut().flatten().for_each(|cell| cell[lane] = 0.0);
            continue;
        };
        let plane = &input[(p.image * s.channels + c) * plane_len..][..plane_len];
        if p.interior {
            let base = p.y0 as usize * s.width + p.x0 as usize;
            for (r, row) in d.iter_mut().enumerate() {
                let line: &[f32; ALPHA] = plane[base + r * s.width..][..ALPHA].try_into().expect("6 values");
                for (cell, &x) in row.iter_mut().zip(line) {
                    cell[lane] = x;
                }
            }
            continue;
        }
        // The part of the patch inside the image; zeros elsewhere.
        let clip = |origin: isize, len: usize| {
            let lo = (-origin).clamp(0, ALPHA as isize) as usize;
            let hi = (len as isize - origin).clamp(lo as isize, ALPHA as isize) as usize;
            lo..hi
        };
        let (rows, cols) = (clip(p.y0, s.height), clip(p.x0, s.width));
        for (r, row) in d.iter_mut().enumerate() {
            // `rows` keeps y0 + r inside the image; `cols` likewise x0 + col.
            let line = rows
                .contains(&r)
                .then(|| &plane[(p.y0 + r as isize) as usize * s.width..][..s.width]);
            for (col, cell) in row.iter_mut().enumerate() {
                cell[lane] = match line {
                    Some(line) if cols.contains(&col) => line[(p.x0 + col as isize) as usize],
                    _ => 0.0,
                };
            }
        }
    }
}

/// `V = Bᵀ d B` for one chunk of lanes, stored at columns `start..start + LANES` of rows (ξ, c);
/// `cols_t` holds `Bᵀ d` on the way (every value written).
#[inline(always)]
fn finish_input_chunk(
    run: &Run<'_>,
    block: &Block,
    (d, cols_t): (&Patches, &mut Patches),
    c: usize,
    start: usize,
    v: SharedOut,
) {
    let (cols, v_stride) = (block.cols, run.conv.v_stride(block.cols));
    // Columns: Bᵀ over rows of d; then rows: Bᵀ over columns.
    for col in 0..ALPHA {
        let column: [[f32; LANES]; ALPHA] = std::array::from_fn(|r| d[r][col]);
        let t = input_transform(&column);
        for a in 0..ALPHA {
            cols_t[a][col] = t[a];
        }
    }
    // The 36 runs written below, from (ξ = 0) to (ξ = 35), checked at once.
    let first = c * cols + start;
    v.check(first, (XI - 1) * v_stride + first + LANES);
    for (a, row) in cols_t.iter().enumerate() {
        let t = input_transform(row);
        for (b, lanes_v) in t.iter().enumerate() {
            let xi = a * ALPHA + b;
            // SAFETY: within the range checked above; row (ξ, c) of V
            // belongs to this channel only.
            unsafe { v.slice_within(xi * v_stride + first, LANES) }.copy_from_slice(lanes_v);
        }
    }
}

/// The output transform of output channels `channels` of a block:
/// recovers each one's tiles from `M[ξ][k][t]` (`m`, ξ matrices `m_stride`
/// apart), applies the epilogue and writes the output.
pub(super) struct OutputChannels<'a> {
    pub(super) run: &'a Run<'a>,
    pub(super) block: &'a Block,
    pub(super) m: &'a [f32],
    pub(super) channels: Range<usize>,
}

impl IsaBody for OutputChannels<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let OutputChannels {
            run,
            block,
            m,
            channels,
        } = self;
        let cols = block.cols;
        let activation = run.conv.w.epilogue.activation();
        let m_stride = run.conv.m_stride(cols);
        // `Aᵀ m` on the way, every value written for each chunk: zeroed
        // once for the channels, not once per chunk.
        let mut rows = [[[0f32; LANES]; ALPHA]; M];
        for k in channels {
            // Hoisted: the writes below go through a raw pointer, so the
            // compiler cannot tell that they leave the epilogue's bias alone.
            let bias = run.conv.w.epilogue.bias(k);
            for (chunk, positions) in block.positions.chunks(LANES).enumerate() {
                // M has `cols` (a multiple of LANES) columns: a full chunk is always readable.
                let start = chunk * LANES;
                for b in 0..ALPHA {
                    let column: [[f32; LANES]; ALPHA] = std::array::from_fn(|a| {
                        m[(a * ALPHA + b) * m_stride + k * cols + start..][..LANES]
                            .try_into()
                            .expect("LANES values")
                    });
                    let t = output_transform(&column);
                    for (i, row) in rows.iter_mut().enumerate() {
                        row[b] = t[i];
                    }
                }
                let o: [[[f32; LANES]; M]; M] = std::array::from_fn(|i| output_transform(&rows[i]));
                store_tiles(run, k, (bias, activation), positions, &o);
            }
        }
    }
}

/// Writes output channel `k` of the chunk's tiles (`positions`, one a
/// lane of `o`, their 4×4 outputs row by row) with the epilogue: each
/// tile's rows inside the image.
#[inline(always)]
fn store_tiles(
    run: &Run<'_>,
    k: usize,
    (bias, activation): (f32, Option<Activation>),
    positions: &[TilePos],
    o: &[[[f32; LANES]; M]; M],
) {
    let (s, out_plane) = (&run.tiles.shape, run.tiles.shape.out_plane());
    for (lane, p) in positions.iter().enumerate() {
        let plane = (p.image * s.out_channels + k) * out_plane;
        let (h, w) = if p.out_full {
            (M, M)
        } else {
            ((s.out_height - p.out_y).min(M), (s.out_width - p.out_x).min(M))
        };
        // The tile's rows in this channel, checked at once.
        let first = plane + p.out_y * s.out_width + p.out_x;
        run.dst.check(first, first + (h - 1) * s.out_width + w);
        for (i, o) in o.iter().enumerate().take(h) {
            let base = first + i * s.out_width;
            // SAFETY (both writes): within the range checked above;
            // these pixels belong to this tile and channel only (see
            // `WinogradF4::run`).
            if w == M {
                // Whole row: fixed-size arrays keep it in one vector register.
                let residual: Option<&[f32; M]> = run.residual.map(|r| r[base..base + M].try_into().expect("M values"));
                let row: [f32; M] = epilogue::row(std::array::from_fn(|j| o[j][lane]), bias, residual, activation);
                unsafe { run.dst.slice_within(base, M) }.copy_from_slice(&row);
            } else {
                let out = unsafe { run.dst.slice_within(base, w) };
                for (j, (out, o)) in out.iter_mut().zip(o).enumerate() {
                    *out = epilogue::value(o[lane], bias, run.residual.map(|r| r[base + j]), activation);
                }
            }
        }
    }
}

/// Loads the 6×6 patches of 16 tiles with masked gathers: lane `l` of
/// `d[r][col]` is `input[offsets[l] + r·width + col]` where bit `l` of
/// `row_mask[r] & col_mask[col]` is set, zero elsewhere.
///
/// # Safety
/// The CPU has AVX-512F, and every unmasked index is in `0..input.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_patch_avx512(
    input: &[f32],
    offsets: &[i32; LANES],
    row_mask: &[u16; ALPHA],
    col_mask: &[u16; ALPHA],
    width: usize,
    d: &mut Patches,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        use std::arch::x86_64::*;
        let base = _mm512_loadu_si512(offsets.as_ptr().cast());
        for (r, row) in d.iter_mut().enumerate() {
            for (col, cell) in row.iter_mut().enumerate() {
                let mask = row_mask[r] & col_mask[col];
                let idx = _mm512_add_epi32(base, _mm512_set1_epi32((r * width + col) as i32));
                let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, input.as_ptr());
                _mm512_storeu_ps(cell.as_mut_ptr(), v);
            }
        }
    }
}
