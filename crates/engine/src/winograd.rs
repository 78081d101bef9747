//! Winograd F(4×4, 3×3) convolution for CPU f32 NCHW: 3×3, stride 1,
//! dilation 1, one group. Each 6×6 input tile becomes 36 "frequency"
//! components; the convolution becomes 36 independent matrix products
//! `M[ξ] = U[ξ] · V[ξ]` (`U` = transformed weights, packed once at compile
//! time), and each 4×4 output tile is recovered from its 36 products with the
//! bias, residual and ReLU applied on the way out. That is 36 multiplies per
//! 16 outputs instead of 144: a 4× cut in arithmetic for the convolutions
//! that carry most of ResNet's FLOPs.
//!
//! Work is split into blocks of `tile_block` tiles (over the whole batch);
//! blocks run in parallel when there are enough of them, otherwise each
//! phase of a block is split across threads. Scratch buffers live per thread
//! and are reused across calls, so a steady-state forward allocates nothing
//! but its output.
//!
//! Error: the transforms use the points 0, ±1, ±2, ∞; the fp32 error grows
//! with the tile size (bounded and measured in the tests below and in
//! `tests/tests/devices/pytorch.rs` on a whole ResNet18).

use crate::gemm_kernel::{pack_panels, panel_gemm, Isa, PANEL_GRANULE, PANEL_ROWS, PANEL_TILES};
use candle_core::{bail, CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Input tile side (`4 + 3 - 1`).
const ALPHA: usize = 6;
/// Output tile side.
const M: usize = 4;
/// Number of transformed components per tile.
const XI: usize = ALPHA * ALPHA;
/// How many channels ahead the input transform prefetches its patches.
const PREFETCH_CHANNELS: usize = 2;
/// Fewer tiles than this (over the batch) run faster as a direct convolution.
const MIN_TILES: usize = 16;
/// Scratch (`V` and `M`) one block aims to fit in.
const BLOCK_BYTES: usize = 1 << 20;
/// Tiles transformed together (one SIMD-friendly vector of lanes).
const LANES: usize = 16;
const _: () = assert!(
    PANEL_GRANULE.is_multiple_of(LANES),
    "GEMM columns come in whole lane chunks"
);

/// A 3×3 stride-1 convolution with its weights in the Winograd domain.
#[derive(Debug, Clone)]
pub(crate) struct WinogradConv {
    in_channels: usize,
    out_channels: usize,
    /// Output channels rounded up to a whole panel.
    padded_out: usize,
    padding: [usize; 2],
    /// `U[ξ]` for each ξ, packed in panels for [`panel_gemm`].
    u: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
    isa: Isa,
}

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
fn weight_transform(g: &[f32]) -> [f64; XI] {
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

/// Where a block's tiles are: tile `t` (over the batch) is image
/// `t / tiles_per_image`, tile row `(t % tiles_per_image) / tiles_x`.
#[derive(Clone, Copy)]
struct Shape {
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    tiles_x: usize,
    tiles_per_image: usize,
    total_tiles: usize,
}

/// The destination of a forward, written from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each output element belongs to exactly one (tile, channel) pair and
// every pair is written by exactly one task, so concurrent writes never overlap.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    /// Per-thread transform scratch, reused across calls (no allocation or
    /// page fault in steady state).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl WinogradConv {
    /// Whether the convolution can run here: 3×3 kernel, stride 1,
    /// dilation 1, one group, padding at most 2 on each axis.
    pub(crate) fn applies(kernel: [usize; 2], attrs: &wick_ir::Conv2dAttrs) -> bool {
        kernel == [3, 3]
            && attrs.stride == [1, 1]
            && attrs.dilation == [1, 1]
            && attrs.groups == 1
            && attrs.padding.iter().all(|&p| p <= 2)
    }

    /// Whether Winograd is the better algorithm for this node (output
    /// `out_shape`): it applies, and there are enough channels and tiles
    /// for the transforms and the 4×-larger transformed weights to pay off
    /// (measured on ResNet18: at batch 1 its 7×7 layers, 4 tiles per image,
    /// run faster direct).
    pub(crate) fn pays_off(
        kernel: [usize; 2],
        attrs: &wick_ir::Conv2dAttrs,
        in_channels: usize,
        out_shape: &[usize],
    ) -> bool {
        let &[batch, out_channels, out_height, out_width] = out_shape else {
            return false;
        };
        let tiles = batch * out_height.div_ceil(M) * out_width.div_ceil(M);
        Self::applies(kernel, attrs) && in_channels >= 8 && out_channels >= 8 && tiles >= MIN_TILES
    }

    /// Transforms and packs `weight` (`[O, C, 3, 3]`, f32) and `bias` (`[O]`).
    pub(crate) fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        padding: [usize; 2],
        relu: bool,
        isa: Isa,
    ) -> candle_core::Result<Self> {
        let (out_channels, in_channels, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) || padding.iter().any(|&p| p > 2) {
            bail!("winograd conv takes 3x3 kernels and padding <= 2, got {kh}x{kw}, padding {padding:?}")
        }
        let w = weight.flatten_all()?.to_vec1::<f32>()?;
        let padded_out = out_channels.div_ceil(PANEL_ROWS) * PANEL_ROWS;
        // Transformed weights, [ξ][O][C], before packing.
        let mut plain = vec![0f32; XI * padded_out * in_channels];
        for o in 0..out_channels {
            for c in 0..in_channels {
                let u = weight_transform(&w[(o * in_channels + c) * 9..][..9]);
                for (xi, value) in u.iter().enumerate() {
                    plain[(xi * padded_out + o) * in_channels + c] = *value as f32;
                }
            }
        }
        let per_xi = padded_out * in_channels;
        let mut u = vec![0f32; XI * per_xi];
        for xi in 0..XI {
            pack_panels(
                &plain[xi * per_xi..][..per_xi],
                padded_out,
                in_channels,
                &mut u[xi * per_xi..][..per_xi],
            );
        }
        let bias = match bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; out_channels],
        };
        if bias.len() != out_channels {
            bail!(
                "winograd conv bias has {} values for {out_channels} channels",
                bias.len()
            )
        }
        Ok(Self {
            in_channels,
            out_channels,
            padded_out,
            padding,
            u,
            bias,
            relu,
            isa,
        })
    }

    /// Tiles per block: `V` and `M` of a block together stay within about
    /// 1 MiB (a Zen 4 L2), and a block is a whole number of GEMM column panels.
    fn tile_block(&self) -> usize {
        let per_tile = XI * (self.in_channels + self.padded_out) * 4;
        ((BLOCK_BYTES / per_tile) / PANEL_TILES).clamp(1, 8) * PANEL_TILES
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the output's
    /// shape) is added before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let &[batch, channels, height, width] = x.dims() else {
            bail!("conv input must be NCHW, got {:?}", x.dims())
        };
        if channels != self.in_channels {
            bail!(
                "winograd conv expects {} input channels, got {channels}",
                self.in_channels
            )
        }
        let [ph, pw] = self.padding;
        let (Some(out_height), Some(out_width)) = ((height + 2 * ph).checked_sub(2), (width + 2 * pw).checked_sub(2))
        else {
            bail!("kernel 3x3 does not fit input {:?}", x.dims())
        };
        let out_dims = [batch, self.out_channels, out_height, out_width];
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        if residual.as_ref().is_some_and(|r| r.dims() != out_dims) {
            bail!("the residual of a winograd conv must have the output's shape {out_dims:?}")
        }
        let tiles_x = out_width.div_ceil(M);
        let tiles_per_image = out_height.div_ceil(M) * tiles_x;
        let shape = Shape {
            channels,
            height,
            width,
            out_height,
            out_width,
            tiles_x,
            tiles_per_image,
            total_tiles: batch * tiles_per_image,
        };
        let out_len = out_dims.iter().product();
        let mut out = Vec::<f32>::with_capacity(out_len);
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                bail!("the winograd conv takes f32 tensors on the CPU")
            };
            let input = &data[layout.start_offset()..][..batch * channels * height * width];
            let residual_guard = residual.as_ref().map(|r| r.storage_and_layout());
            let residual: Option<&[f32]> = match &residual_guard {
                None => None,
                Some((storage, layout)) => match &**storage {
                    Storage::Cpu(CpuStorage::F32(r)) => Some(&r[layout.start_offset()..][..out_len]),
                    _ => bail!("the residual of a winograd conv must be f32 on the CPU"),
                },
            };
            let dst = OutPtr(out.as_mut_ptr());
            let block = self.tile_block();
            let blocks = shape.total_tiles.div_ceil(block);
            let threads = rayon::current_num_threads();
            if blocks >= 2 * threads {
                (0..blocks).into_par_iter().for_each(|b| {
                    self.block(input, residual, dst, &shape, b * block, block, false);
                });
            } else {
                for b in 0..blocks {
                    self.block(input, residual, dst, &shape, b * block, block, threads > 1);
                }
            }
            // SAFETY: the blocks cover every tile of every image, and each tile
            // writes all its in-bounds output pixels for every channel, so all
            // `out_len` elements are initialised.
            unsafe { out.set_len(out_len) };
        }
        Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)
    }

    /// Transforms, multiplies and writes back tiles `first..first + block`
    /// (clipped to the batch); `split` divides each phase across threads.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        dst: OutPtr,
        s: &Shape,
        first: usize,
        block: usize,
        split: bool,
    ) {
        let tiles = block.min(s.total_tiles - first);
        // GEMM columns: the block's tiles rounded up to the kernel's granule.
        let cols = tiles.div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        let positions: Vec<TilePos> = (first..first + tiles).map(|t| self.tile_pos(s, t)).collect();
        let v_len = XI * s.channels * cols;
        let m_len = XI * self.padded_out * cols;
        let mut scratch = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        if scratch.len() < v_len + m_len {
            scratch = vec![0f32; v_len + m_len];
        }
        let (v, m) = scratch[..v_len + m_len].split_at_mut(v_len);
        // V[ξ][c][t]. Channel `c` writes only rows (ξ, c): disjoint across channels.
        let vptr = OutPtr(v.as_mut_ptr());
        let transform_channels = |range: std::ops::Range<usize>| {
            for c in range {
                self.transform_input(input, s, c, &positions, cols, vptr);
            }
        };
        let threads = rayon::current_num_threads();
        let chunks = |n: usize| {
            let per = n.div_ceil(4 * threads).max(1);
            (0..n.div_ceil(per)).map(move |i| i * per..((i + 1) * per).min(n))
        };
        if split {
            chunks(s.channels)
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(transform_channels);
        } else {
            transform_channels(0..s.channels);
        }
        let per_u = self.padded_out * s.channels;
        let gemm = |xi: usize, m: &mut [f32]| {
            panel_gemm(
                self.isa,
                &self.u[xi * per_u..][..per_u],
                &v[xi * s.channels * cols..][..s.channels * cols],
                m,
                self.padded_out,
                s.channels,
                cols,
            )
        };
        if split {
            m.par_chunks_mut(self.padded_out * cols)
                .enumerate()
                .for_each(|(xi, m)| gemm(xi, m));
        } else {
            for (xi, m) in m.chunks_mut(self.padded_out * cols).enumerate() {
                gemm(xi, m);
            }
        }
        let m = &*m;
        let transform_outputs = |range: std::ops::Range<usize>| {
            for k in range {
                self.transform_output(m, residual, dst, s, k, &positions, cols);
            }
        };
        if split {
            chunks(self.out_channels)
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(transform_outputs);
        } else {
            transform_outputs(0..self.out_channels);
        }
        SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
    }

    /// Where tile `t` (numbered over the batch) reads and writes.
    fn tile_pos(&self, s: &Shape, t: usize) -> TilePos {
        let (image, within) = (t / s.tiles_per_image, t % s.tiles_per_image);
        let (ty, tx) = (within / s.tiles_x, within % s.tiles_x);
        let y0 = (ty * M) as isize - self.padding[0] as isize;
        let x0 = (tx * M) as isize - self.padding[1] as isize;
        TilePos {
            image,
            y0,
            x0,
            interior: y0 >= 0 && x0 >= 0 && y0 as usize + ALPHA <= s.height && x0 as usize + ALPHA <= s.width,
            out_y: ty * M,
            out_x: tx * M,
            out_full: ty * M + M <= s.out_height && tx * M + M <= s.out_width,
        }
    }

    /// Writes `V[ξ][c][0..cols]` for channel `c` of the block's tiles through
    /// `v`, which points at a `[ξ][C][cols]` buffer; columns past the tiles
    /// get zeros. Compiled for the widest SIMD the CPU has.
    fn transform_input(&self, input: &[f32], s: &Shape, c: usize, positions: &[TilePos], cols: usize, v: OutPtr) {
        match self.isa {
            // SAFETY: `Isa::Avx512` / `Isa::Avx2Fma` come from `Isa::available`,
            // so the CPU has the features the wrappers enable.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.transform_input_avx512(input, s, c, positions, cols, v) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { self.transform_input_avx2(input, s, c, positions, cols, v) },
            _ => self.transform_input_body(input, s, c, positions, cols, v),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn transform_input_avx512(
        &self,
        input: &[f32],
        s: &Shape,
        c: usize,
        positions: &[TilePos],
        cols: usize,
        v: OutPtr,
    ) {
        self.transform_input_body(input, s, c, positions, cols, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transform_input_avx2(
        &self,
        input: &[f32],
        s: &Shape,
        c: usize,
        positions: &[TilePos],
        cols: usize,
        v: OutPtr,
    ) {
        self.transform_input_body(input, s, c, positions, cols, v)
    }

    #[inline(always)]
    fn transform_input_body(&self, input: &[f32], s: &Shape, c: usize, positions: &[TilePos], cols: usize, v: OutPtr) {
        let plane_len = s.height * s.width;
        // `cols` is a multiple of LANES (PANEL_GRANULE), so every chunk is full.
        for start in (0..cols).step_by(LANES) {
            // d[row][col][lane]: the 6×6 input patch of each lane's tile.
            let mut d = [[[0f32; LANES]; ALPHA]; ALPHA];
            #[cfg(target_arch = "x86_64")]
            if self.isa == Isa::Avx512 && input.len() <= i32::MAX as usize {
                let chunk = &positions[start.min(positions.len())..(start + LANES).min(positions.len())];
                let mut offsets = [0i32; LANES];
                let mut row_mask = [0u16; ALPHA];
                let mut col_mask = [0u16; ALPHA];
                for (lane, p) in chunk.iter().enumerate() {
                    // May be negative for border tiles: those lanes are masked off.
                    offsets[lane] =
                        (((p.image * s.channels + c) * plane_len) as isize + p.y0 * s.width as isize + p.x0) as i32;
                    for i in 0..ALPHA {
                        let (y, x) = (p.y0 + i as isize, p.x0 + i as isize);
                        row_mask[i] |= u16::from(y >= 0 && y < s.height as isize) << lane;
                        col_mask[i] |= u16::from(x >= 0 && x < s.width as isize) << lane;
                    }
                }
                // SAFETY: the CPU has AVX-512F (Isa::Avx512); a lane reads
                // offsets[lane] + r·W + col only where row r and column col of
                // its patch lie inside its image's plane, which is inside `input`
                // (and input.len() fits i32, so no offset wraps).
                unsafe { gather_patch_avx512(input, &offsets, &row_mask, &col_mask, s.width, &mut d) };
                if c + PREFETCH_CHANNELS < s.channels {
                    for (lane, &o) in offsets.iter().enumerate().take(chunk.len()) {
                        for (r, mask) in row_mask.iter().enumerate() {
                            if mask >> lane & 1 == 1 {
                                let at = (o as isize + (PREFETCH_CHANNELS * plane_len + r * s.width) as isize).max(0)
                                    as usize;
                                prefetch(input.as_ptr().wrapping_add(at));
                            }
                        }
                    }
                }
                self.finish_input_chunk(&d, s, c, start, cols, v);
                continue;
            }
            for (lane, p) in positions.iter().skip(start).take(LANES).enumerate() {
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
                // The part of the patch inside the image; the rest stays zero.
                let clip = |origin: isize, len: usize| {
                    let lo = (-origin).clamp(0, ALPHA as isize) as usize;
                    let hi = (len as isize - origin).clamp(lo as isize, ALPHA as isize) as usize;
                    (lo, hi)
                };
                let ((r0, r1), (c0, c1)) = (clip(p.y0, s.height), clip(p.x0, s.width));
                for (r, row) in d.iter_mut().enumerate().take(r1).skip(r0) {
                    // r0 <= r < r1 keeps y0 + r inside the image; likewise the columns.
                    let line = &plane[(p.y0 + r as isize) as usize * s.width..][..s.width];
                    for (col, cell) in row.iter_mut().enumerate().take(c1).skip(c0) {
                        cell[lane] = line[(p.x0 + col as isize) as usize];
                    }
                }
            }
            self.finish_input_chunk(&d, s, c, start, cols, v);
        }
    }

    /// `V = Bᵀ d B` for one chunk of lanes, stored at columns `start..start + LANES` of rows (ξ, c).
    #[inline(always)]
    fn finish_input_chunk(
        &self,
        d: &[[[f32; LANES]; ALPHA]; ALPHA],
        s: &Shape,
        c: usize,
        start: usize,
        cols: usize,
        v: OutPtr,
    ) {
        // Columns: Bᵀ over rows of d; then rows: Bᵀ over columns.
        let mut cols_t = [[[0f32; LANES]; ALPHA]; ALPHA];
        for col in 0..ALPHA {
            let column: [[f32; LANES]; ALPHA] = std::array::from_fn(|r| d[r][col]);
            let t = input_transform(&column);
            for a in 0..ALPHA {
                cols_t[a][col] = t[a];
            }
        }
        for (a, row) in cols_t.iter().enumerate() {
            let t = input_transform(row);
            for (b, lanes_v) in t.iter().enumerate() {
                let xi = a * ALPHA + b;
                debug_assert!(start + LANES <= cols);
                // SAFETY: (ξ·C + c)·cols + start + LANES <= 36·C·cols,
                // the buffer's length; row (ξ, c) belongs to this channel only.
                unsafe {
                    (v.0.add((xi * s.channels + c) * cols + start) as *mut [f32; LANES]).write_unaligned(*lanes_v)
                };
            }
        }
    }

    /// Recovers output channel `k` of the block's tiles from `M[ξ][k][t]`,
    /// adds bias and residual, applies ReLU, writes the output. Compiled for
    /// the widest SIMD the CPU has.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: OutPtr,
        s: &Shape,
        k: usize,
        positions: &[TilePos],
        cols: usize,
    ) {
        match self.isa {
            // SAFETY: as in `transform_input`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.transform_output_avx512(m, residual, dst, s, k, positions, cols) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { self.transform_output_avx2(m, residual, dst, s, k, positions, cols) },
            _ => self.transform_output_body(m, residual, dst, s, k, positions, cols),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn transform_output_avx512(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: OutPtr,
        s: &Shape,
        k: usize,
        positions: &[TilePos],
        cols: usize,
    ) {
        self.transform_output_body(m, residual, dst, s, k, positions, cols)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn transform_output_avx2(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: OutPtr,
        s: &Shape,
        k: usize,
        positions: &[TilePos],
        cols: usize,
    ) {
        self.transform_output_body(m, residual, dst, s, k, positions, cols)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn transform_output_body(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: OutPtr,
        s: &Shape,
        k: usize,
        positions: &[TilePos],
        cols: usize,
    ) {
        let out_plane = s.out_height * s.out_width;
        let bias = self.bias[k];
        let relu = self.relu;
        for (chunk, positions) in positions.chunks(LANES).enumerate() {
            // M has `cols` (a multiple of LANES) columns: a full chunk is always readable.
            let start = chunk * LANES;
            let mut rows = [[[0f32; LANES]; ALPHA]; M];
            for b in 0..ALPHA {
                let column: [[f32; LANES]; ALPHA] = std::array::from_fn(|a| {
                    m[((a * ALPHA + b) * self.padded_out + k) * cols + start..][..LANES]
                        .try_into()
                        .expect("LANES values")
                });
                let t = output_transform(&column);
                for (i, row) in rows.iter_mut().enumerate() {
                    row[b] = t[i];
                }
            }
            let o: [[[f32; LANES]; M]; M] = std::array::from_fn(|i| output_transform(&rows[i]));
            for (lane, p) in positions.iter().enumerate() {
                let plane = (p.image * self.out_channels + k) * out_plane;
                let (h, w) = if p.out_full {
                    (M, M)
                } else {
                    ((s.out_height - p.out_y).min(M), (s.out_width - p.out_x).min(M))
                };
                for (i, o) in o.iter().enumerate().take(h) {
                    let base = plane + (p.out_y + i) * s.out_width + p.out_x;
                    if w == M {
                        // Whole row: fixed-size arrays keep it in one vector register.
                        let mut row: [f32; M] = std::array::from_fn(|j| o[j][lane] + bias);
                        if let Some(r) = residual {
                            let r: &[f32; M] = r[base..base + M].try_into().expect("M values");
                            for (v, r) in row.iter_mut().zip(r) {
                                *v += r;
                            }
                        }
                        if relu {
                            row = row.map(|v| v.max(0.0));
                        }
                        // SAFETY: base + M <= N·O·OH·OW (image < N, k < O,
                        // out_y + i < OH, out_x + M <= OW) and these pixels
                        // belong to this tile and channel only (see OutPtr).
                        unsafe { (dst.0.add(base) as *mut [f32; M]).write_unaligned(row) };
                    } else {
                        for (j, o) in o.iter().enumerate().take(w) {
                            let mut v = o[lane] + bias + residual.map_or(0.0, |r| r[base + j]);
                            if relu {
                                v = v.max(0.0);
                            }
                            // SAFETY: as above, with out_x + j < OW.
                            unsafe { dst.0.add(base + j).write(v) };
                        }
                    }
                }
            }
        }
    }
}

/// Hints the CPU to bring `at`'s cache line into L1 (no-op off x86-64).
#[inline(always)]
fn prefetch(at: *const f32) {
    // SAFETY: a prefetch never faults and reads nothing observable; any
    // address (even out of bounds) is only a hint.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
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
    d: &mut [[[f32; LANES]; ALPHA]; ALPHA],
) {
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

/// Where one tile reads its 6×6 input patch and writes its 4×4 output.
#[derive(Clone, Copy)]
struct TilePos {
    image: usize,
    /// Top-left of the input patch (may be negative: padding).
    y0: isize,
    x0: isize,
    /// The whole patch lies inside the image (no padding to synthesise).
    interior: bool,
    out_y: usize,
    out_x: usize,
    /// The whole 4×4 output lies inside the image.
    out_full: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use wick_ir::Conv2dAttrs;

    /// Allowed `|got − want| / (ε · (Σ|w||x| + |b| + |r|))`, f32 ε = 2⁻²³.
    /// F(4×4, 3×3)'s transforms amplify rounding (coefficients up to 8 and
    /// 1/24); the worst ratio seen over 128-case runs was 68, a direct
    /// convolution's is below 10.
    const ERROR_FACTOR: f64 = 200.0;

    #[derive(Debug, Clone)]
    struct Case {
        batch: usize,
        channels: usize,
        outputs: usize,
        size: [usize; 2],
        padding: [usize; 2],
        bias: bool,
        relu: bool,
        residual: bool,
        seed: u64,
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        (
            1usize..4,
            1usize..20,
            1usize..20,
            [1usize..14, 1usize..14],
            [0usize..3, 0usize..3],
            any::<(bool, bool, bool, bool)>(),
            any::<u64>(),
        )
            .prop_filter("the 3x3 window must fit", |(_, _, _, size, padding, _, _)| {
                size[0] + 2 * padding[0] >= 3 && size[1] + 2 * padding[1] >= 3
            })
            .prop_map(
                |(batch, channels, outputs, size, padding, (bias, relu, residual, square), seed)| {
                    // Every other case with C == H == W (the layout-ambiguity shape)
                    // where the window fits.
                    let size = if square && channels >= 3 { [channels; 2] } else { size };
                    Case {
                        batch,
                        channels,
                        outputs,
                        size,
                        padding,
                        bias,
                        relu,
                        residual,
                        seed,
                    }
                },
            )
    }

    fn conv(x: &Tensor, w: &Tensor, padding: [usize; 2]) -> Tensor {
        x.pad_with_zeros(2, padding[0], padding[0])
            .unwrap()
            .pad_with_zeros(3, padding[1], padding[1])
            .unwrap()
            .conv2d(w, 0, 1, 1, 1)
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Runs `case` on every available path and returns the worst error ratio
    /// against candle's direct convolution.
    fn worst_ratio(case: &Case) -> f64 {
        let d = Device::Cpu;
        let mut state = case.seed;
        let mut tensor = |dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect();
            Tensor::from_vec(v, dims, &d).unwrap()
        };
        let [h, w] = case.size;
        let x = tensor(&[case.batch, case.channels, h, w]);
        let weight = tensor(&[case.outputs, case.channels, 3, 3]);
        let bias = case.bias.then(|| tensor(&[case.outputs]));
        let direct = conv(&x, &weight, case.padding);
        let residual = case.residual.then(|| tensor(direct.dims()));
        let mut want = direct.clone();
        // Σ|w||x| + |b| + |r|: what the rounding error of any summation order scales with.
        let mut magnitude = conv(&x.abs().unwrap(), &weight.abs().unwrap(), case.padding);
        if let Some(b) = &bias {
            let b = b.reshape((1, case.outputs, 1, 1)).unwrap();
            want = want.broadcast_add(&b).unwrap();
            magnitude = magnitude.broadcast_add(&b.abs().unwrap()).unwrap();
        }
        if let Some(r) = &residual {
            want = (want + r).unwrap();
            magnitude = (magnitude + r.abs().unwrap()).unwrap();
        }
        if case.relu {
            want = want.relu().unwrap();
        }
        let (want, magnitude) = (values(&want), values(&magnitude));
        let mut worst = 0f64;
        for isa in Isa::available() {
            let conv = WinogradConv::new(&weight, bias.as_ref(), case.padding, case.relu, isa).unwrap();
            let got = conv.run(&x, residual.as_ref()).unwrap();
            assert_eq!(got.dims(), direct.dims(), "{isa:?}");
            for ((g, w), m) in values(&got).iter().zip(&want).zip(&magnitude) {
                let ratio = f64::from((g - w).abs()) / (f64::from(f32::EPSILON) * f64::from(*m) + 1e-30);
                assert!(ratio.is_finite(), "{isa:?}: got {g}, want {w}");
                worst = worst.max(ratio);
            }
        }
        worst
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        /// Equals candle's direct convolution (+ bias, + residual, + ReLU) on
        /// every SIMD path within `ERROR_FACTOR · ε · Σ|w||x|`, across batch,
        /// channel counts that are not whole GEMM panels, sizes smaller than
        /// a tile, odd sizes, C == H == W, and padding 0..=2 per axis.
        #[test]
        fn matches_candle(case in arb_case()) {
            let worst = worst_ratio(&case);
            if std::env::var_os("WICK_PRINT_ERROR").is_some() {
                println!("winograd error ratio {worst:.2}");
            }
            prop_assert!(worst <= ERROR_FACTOR, "error ratio {worst}");
        }
    }

    /// Several blocks over the batch (blocks run in parallel) and a
    /// ResNet-sized layer (blocks split across threads) give the same answer.
    #[test]
    fn multi_block_and_split_paths() {
        for (batch, channels, size) in [(6, 16, 23), (1, 64, 9)] {
            let case = Case {
                batch,
                channels,
                outputs: channels + 3,
                size: [size, size],
                padding: [1, 1],
                bias: true,
                relu: true,
                residual: true,
                seed: 7,
            };
            let worst = worst_ratio(&case);
            assert!(worst <= ERROR_FACTOR, "{case:?}: {worst}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        let d = Device::Cpu;
        let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &d).unwrap();
        let conv = WinogradConv::new(&w, None, [1, 1], false, Isa::Scalar).unwrap();
        let wrong_channels = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&wrong_channels, None).is_err());
        let x = Tensor::zeros((1, 3, 5, 5), candle_core::DType::F32, &d).unwrap();
        let wrong_residual = Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, Some(&wrong_residual)).is_err());
        let five = Tensor::zeros((4, 3, 5, 5), candle_core::DType::F32, &d).unwrap();
        assert!(WinogradConv::new(&five, None, [1, 1], false, Isa::Scalar).is_err());
        let empty = conv.run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
        assert_eq!(empty.dims(), [0, 4, 5, 5]);
        assert!(WinogradConv::applies([3, 3], &Conv2dAttrs::default()));
    }
}
