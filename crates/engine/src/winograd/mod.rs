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
//! with the tile size (bounded and measured in `winograd/tests.rs` and in
//! `tests/tests/devices/pytorch.rs` on a whole ResNet18).

pub(crate) mod f2;
mod transform;

use transform::weight_transform;

use crate::cpu_shared::{bias_values, with_cpu_f32, with_scratch, SharedOut};
use crate::gemm_kernel::{pack_panels, panel_gemm, Isa, PANEL_GRANULE, PANEL_ROWS, PANEL_TILES};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;

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
/// Floats (one cache line) between consecutive ξ matrices of a block.
const SKEW: usize = 16;
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
        let plain = transformed_weights(&w, out_channels, padded_out, in_channels, weight_transform);
        let per_xi = padded_out * in_channels;
        let mut u = crate::cpu_shared::weight_buffer(XI * per_xi);
        for xi in 0..XI {
            pack_panels(
                &plain[xi * per_xi..][..per_xi],
                padded_out,
                in_channels,
                &mut u[xi * per_xi..][..per_xi],
            );
        }
        let bias = bias_values(bias, out_channels, "winograd conv")?;
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
        let (x, residual, out_dims) = checked_input(x, residual, self.in_channels, self.out_channels, self.padding)?;
        let [batch, channels, height, width] = x.dims4()?.into();
        let [out_height, out_width] = [out_dims[2], out_dims[3]];
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
        // Disjoint writes: each output element belongs to exactly one
        // (tile, channel) pair, and each pair is written by one task.
        let dst = SharedOut(out.as_mut_ptr());
        with_cpu_f32("winograd conv", &x, residual.as_ref(), |input, residual| {
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
            Ok(())
        })?;
        // SAFETY: the blocks cover every tile of every image, and each tile
        // writes all its in-bounds output pixels for every channel, so all
        // `out_len` elements are initialised.
        unsafe { out.set_len(out_len) };
        Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)
    }

    /// Transforms, multiplies and writes back tiles `first..first + block`
    /// (clipped to the batch); `split` divides each phase across threads.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        first: usize,
        block: usize,
        split: bool,
    ) {
        let tiles = block.min(s.total_tiles - first);
        // GEMM columns: the block's tiles rounded up to the kernel's granule.
        let cols = tiles.div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        let positions: Vec<TilePos> = (first..first + tiles).map(|t| self.tile_pos(s, t)).collect();
        let gathers = match self.isa {
            Isa::Avx512 => GatherChunk::for_block(&positions, s, cols, input.len()),
            _ => Vec::new(),
        };
        let (v_stride, m_stride) = (self.v_stride(s.channels, cols), self.m_stride(cols));
        let (v_len, m_len) = (XI * v_stride, XI * m_stride);
        with_scratch(v_len + m_len, |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            // V[ξ][c][t]. Channel `c` writes only rows (ξ, c): disjoint across channels.
            let vptr = SharedOut(v.as_mut_ptr());
            let transform_channels = |range: std::ops::Range<usize>| {
                for c in range {
                    self.transform_input(input, s, c, &positions, &gathers, cols, vptr);
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
                    &v[xi * v_stride..][..s.channels * cols],
                    &mut m[..self.padded_out * cols],
                    self.padded_out,
                    s.channels,
                    cols,
                )
            };
            if split {
                m.par_chunks_mut(m_stride).enumerate().for_each(|(xi, m)| gemm(xi, m));
            } else {
                for (xi, m) in m.chunks_mut(m_stride).enumerate() {
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
        });
    }

    /// Distance between `V[ξ]` and `V[ξ + 1]` in a block of `cols` columns:
    /// the `[C, cols]` matrix plus [`SKEW`]. Without it, ResNet's blocks put
    /// the 36 matrices exactly 64 KiB apart, so the transforms' 36 accesses
    /// per tile chunk all fall in one L1 set (8 ways) and evict each other.
    fn v_stride(&self, channels: usize, cols: usize) -> usize {
        channels * cols + SKEW
    }

    /// Distance between `M[ξ]` and `M[ξ + 1]`: `[O_pad, cols]` plus [`SKEW`].
    fn m_stride(&self, cols: usize) -> usize {
        self.padded_out * cols + SKEW
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
}

/// Where the AVX-512 input transform gathers one chunk of [`LANES`] tiles'
/// patches in channel 0 (channel `c` adds `c·H·W`): the same for every
/// channel, so computed once per block, not once per channel.
#[derive(Clone, Copy)]
pub(super) struct GatherChunk {
    /// Element offset of each lane's patch origin; may be negative for
    /// border tiles (those rows and columns are masked off).
    offsets: [i32; LANES],
    /// Bit `l` of `row_mask[r]`: row `r` of lane `l`'s patch is in the image.
    row_mask: [u16; ALPHA],
    /// Likewise for the patch's columns.
    col_mask: [u16; ALPHA],
    /// Lanes holding a tile (the last chunk may be partial or empty).
    lanes: usize,
}

impl GatherChunk {
    /// One per `LANES` columns of a block; empty when the input is too long
    /// for i32 offsets (the transform then falls back to plain loads).
    fn for_block(positions: &[TilePos], s: &Shape, cols: usize, input_len: usize) -> Vec<GatherChunk> {
        if input_len > i32::MAX as usize {
            return Vec::new();
        }
        let plane_len = s.height * s.width;
        (0..cols / LANES)
            .map(|i| {
                let chunk = &positions[(i * LANES).min(positions.len())..((i + 1) * LANES).min(positions.len())];
                let mut g = GatherChunk {
                    offsets: [0; LANES],
                    row_mask: [0; ALPHA],
                    col_mask: [0; ALPHA],
                    lanes: chunk.len(),
                };
                for (lane, p) in chunk.iter().enumerate() {
                    g.offsets[lane] =
                        ((p.image * s.channels * plane_len) as isize + p.y0 * s.width as isize + p.x0) as i32;
                    for i in 0..ALPHA {
                        let (y, x) = (p.y0 + i as isize, p.x0 + i as isize);
                        g.row_mask[i] |= u16::from(y >= 0 && y < s.height as isize) << lane;
                        g.col_mask[i] |= u16::from(x >= 0 && x < s.width as isize) << lane;
                    }
                }
                g
            })
            .collect()
    }
}

/// `w` (`[O, C, 3, 3]` flattened) with each 3×3 kernel through `transform`
/// (computed in f64), as `[ξ][rows][C]` f32 matrices before packing; rows
/// past `out_channels` (up to `rows`) are zero.
fn transformed_weights<const N: usize>(
    w: &[f32],
    out_channels: usize,
    rows: usize,
    in_channels: usize,
    transform: fn(&[f32]) -> [f64; N],
) -> Vec<f32> {
    let mut plain = vec![0f32; N * rows * in_channels];
    for o in 0..out_channels {
        for c in 0..in_channels {
            let u = transform(&w[(o * in_channels + c) * 9..][..9]);
            for (xi, value) in u.iter().enumerate() {
                plain[(xi * rows + o) * in_channels + c] = *value as f32;
            }
        }
    }
    plain
}

/// The checks both Winograd convs make on their input `x` (`[N, C, H, W]`,
/// `C == in_channels`) and `residual` (the output's shape); returns both
/// contiguous and the output's dims for a 3×3 stride-1 conv with `padding`.
fn checked_input(
    x: &Tensor,
    residual: Option<&Tensor>,
    in_channels: usize,
    out_channels: usize,
    padding: [usize; 2],
) -> candle_core::Result<(Tensor, Option<Tensor>, [usize; 4])> {
    let x = x.contiguous()?;
    let &[batch, channels, height, width] = x.dims() else {
        bail!("conv input must be NCHW, got {:?}", x.dims())
    };
    if channels != in_channels {
        bail!("winograd conv expects {in_channels} input channels, got {channels}")
    }
    let [ph, pw] = padding;
    let (Some(out_height), Some(out_width)) = ((height + 2 * ph).checked_sub(2), (width + 2 * pw).checked_sub(2))
    else {
        bail!("kernel 3x3 does not fit input {:?}", x.dims())
    };
    let out_dims = [batch, out_channels, out_height, out_width];
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    if residual.as_ref().is_some_and(|r| r.dims() != out_dims) {
        bail!("the residual of a winograd conv must have the output's shape {out_dims:?}")
    }
    Ok((x, residual, out_dims))
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
mod tests;
