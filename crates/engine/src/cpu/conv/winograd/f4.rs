//! Winograd F(4×4, 3×3): each 6×6 input tile becomes 36 components, the
//! conv 36 products on the panel micro-kernel, each 4×4 output tile is
//! recovered with the epilogue applied. 36 multiplies per 16 outputs
//! instead of 144: a 4× cut in arithmetic for the convs that carry most of
//! ResNet's FLOPs.
//!
//! Work is split into blocks of tiles (over the whole batch,
//! [`WinogradF4::schedule`]): blocks run in parallel when there are enough
//! of them or one a thread fits, otherwise each phase of a block is split
//! across threads. Scratch buffers live per thread
//! and are reused across calls, so a steady-state forward allocates nothing
//! but its output. The transforms are in `f4_transform.rs`.
//!
//! Error: the transforms use the points 0, ±1, ±2, ∞; the fp32 error grows
//! with the tile size (bounded and measured in `tests.rs` and in
//! `tests/tests/devices/pytorch.rs` on a whole ResNet18).

use super::f4_transform::{weight_transform, InputChannels, OutputChannels};
use super::{tiles_per_block, Packed, Tiles, SKEW};
use crate::cpu::conv::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{panel_gemm, Isa, Layout, PANEL_GRANULE, PANEL_TILES, WIDE_TILE};
use crate::cpu::output::Output;
use crate::cpu::parallel::{for_each, for_ranges, try_for_each};
use crate::machine::Machine;
use candle_core::{Result, Tensor};

/// Input tile side (`4 + 3 - 1`).
pub(super) const ALPHA: usize = 6;
/// Output tile side.
pub(super) const M: usize = 4;
/// Number of transformed components per tile.
pub(super) const XI: usize = ALPHA * ALPHA;
/// Fewest tiles a block run whole on one thread takes (one GEMM granule)
/// where the blocks are one a thread ([`WinogradF4::schedule`]).
const PER_THREAD_MIN_TILES: usize = PANEL_GRANULE;
/// Tiles transformed together (one SIMD-friendly vector of lanes).
pub(super) const LANES: usize = 16;
const _: () = assert!(
    PANEL_GRANULE.is_multiple_of(LANES),
    "GEMM columns come in whole lane chunks"
);

/// A 3×3 stride-1 convolution with its weights in the F(4×4) domain.
#[derive(Debug)]
pub(crate) struct WinogradF4 {
    /// The conv, its `U[ξ]` packed in panels for [`panel_gemm`], the epilogue, the path.
    pub(super) w: Packed,
    /// Scratch (`V` and `M`) one block aims to fit in: the L2.
    block_bytes: usize,
    /// Input bytes past which the AVX-512 input transform hints the
    /// patches it reads [`super::f4_transform::PREFETCH_CHANNELS`] channels ahead: the L2
    /// ([`WinogradF4::prefetches`]).
    prefetch_above: usize,
}

/// One forward's context, shared by its blocks.
pub(super) struct Run<'a> {
    pub(super) conv: &'a WinogradF4,
    pub(super) input: &'a [f32],
    pub(super) residual: Option<&'a [f32]>,
    pub(super) dst: SharedOut,
    pub(super) tiles: Tiles,
    /// Whether the input transform prefetches ([`WinogradF4::prefetches`]).
    pub(super) prefetch: bool,
}

/// One block of tiles.
pub(super) struct Block {
    /// Where each tile reads and writes.
    pub(super) positions: Vec<TilePos>,
    /// The AVX-512 gathers' offsets and masks (empty on other paths).
    pub(super) gathers: Vec<GatherChunk>,
    /// GEMM columns: the tiles rounded up to the panel granule.
    pub(super) cols: usize,
}

impl WinogradF4 {
    /// Transforms and packs `weight` (`[O, C, 3, 3]`, f32) for `spec`.
    pub(crate) fn new(spec: ConvSpec, weight: &Tensor, epilogue: Epilogue, machine: Machine) -> Result<Self> {
        Ok(Self {
            w: Packed::new(spec, weight, weight_transform, Layout::Panels, epilogue, machine)?,
            block_bytes: machine.block_bytes(),
            prefetch_above: machine.caches.l2,
        })
    }

    /// Tiles per block of `total`: `V` and `M` of a block together stay
    /// within the L2, and a block is a whole number of slices of the
    /// GEMM's columns, at most 256 tiles: 48 on AVX-512 ([`WIDE_TILE`]),
    /// 32 elsewhere; or one block where the weights outweigh them
    /// ([`tiles_per_block`]). In slices of 48 rather than 32 on AVX-512,
    /// once its product's tiles were 48 wide (a block of 64 left a
    /// 16-column rest): ResNet18 0.97× the time at batch 10, ResNet34
    /// 0.98×, ResNet50 0.99×, batch 1 within the noise (0.98-1.02×),
    /// `cargo xtask bench` medians of alternating runs on the Intel Xeon VM
    /// (2 threads); AVX2 forced there, 1.01× (so not on AVX2).
    fn tile_block(&self, total: usize) -> usize {
        let per_tile = self.tile_bytes();
        let slice = match self.w.isa {
            Isa::Avx512 => WIDE_TILE,
            _ => PANEL_TILES,
        };
        let cache_block = ((self.block_bytes / per_tile) / slice).clamp(1, 256 / slice) * slice;
        tiles_per_block(cache_block, total, per_tile, std::mem::size_of_val(&*self.w.u))
    }

    /// Bytes of `V` and `M` one tile takes in a block.
    fn tile_bytes(&self) -> usize {
        XI * (self.w.spec.in_channels + self.w.padded_out) * std::mem::size_of::<f32>()
    }

    /// Tiles per block of `total` on `threads` threads, and whether the
    /// blocks run whole on their threads (else one after the other, each
    /// phase split across the threads): [`Self::tile_block`]'s blocks
    /// where there are two a thread or more; one block a thread where
    /// that block's `V` and `M` fit the block budget (the L2), each holds
    /// at least [`PER_THREAD_MIN_TILES`] and the threads' L2s hold `U`
    /// (each block streams all of it). The split phases hand `V` and `M`
    /// from one core to the other between phases and wait at each:
    /// ResNet18's layer2.0.conv2 at batch 1 (49 tiles, `U` 2.36 MB, the
    /// reader of a stride-2 conv's output) 0.79-0.87× the time in blocks of
    /// 25 and 24 tiles, its layer1.0.conv1 (the pooled stem's reader, 196
    /// tiles: three blocks of up to 96 before, 98 + 98 now) 0.88×, AVX2
    /// forced 0.85× and 0.83×, the other layer1/2 convs level; where `U`
    /// comes from memory once per thread it loses (ResNet18's layer4 at
    /// batch 10, 40 tiles, `U` 37.7 MB: 1.16-1.21×). Intel Xeon VM, 2
    /// threads, ABBA profiles.
    pub(super) fn schedule(&self, total: usize, threads: usize) -> (usize, bool) {
        let block = self.tile_block(total);
        if threads <= 1 || total.div_ceil(block) >= 2 * threads {
            return (block, true);
        }
        let per_thread = total.div_ceil(threads);
        let u_bytes = std::mem::size_of_val(&*self.w.u);
        let fits = per_thread.saturating_mul(self.tile_bytes()) <= self.block_bytes
            && u_bytes <= self.block_bytes.saturating_mul(threads);
        match per_thread >= PER_THREAD_MIN_TILES && fits {
            true => (per_thread, true),
            false => (block, false),
        }
    }

    /// Whether a forward over `input_bytes` of input prefetches its
    /// patches in the input transform: where the input outgrows the L2.
    /// Each channel's patches lie a whole plane past the last channel's,
    /// a jump no hardware prefetcher follows; where the input stays in the
    /// L2 from the conv before, the hints (up to 96 per 16 tiles and
    /// channel) only cost issue slots. On the Zen 4 VM (1 MiB L2, AVX-512,
    /// 2 threads, alternating forwards against no hints): ResNet18 at
    /// batch 10 0.924× the time, ResNet50 at batch 10 0.948×; at batch 1,
    /// where no 3×3 conv's input outgrows that L2, hints everywhere read
    /// 1.008-1.010× (ResNet18, 34, 50). On the Intel Xeon VM (2 MiB L2)
    /// hints everywhere cost ResNet18 at batch 1 1.5-2% and left batch 10
    /// level.
    pub(super) fn prefetches(&self, input_bytes: usize) -> bool {
        self.w.isa == Isa::Avx512 && input_bytes > self.prefetch_above
    }

    /// Distance between `V[ξ]` and `V[ξ + 1]` in a block of `cols` columns:
    /// the `[C, cols]` matrix plus [`SKEW`].
    pub(super) fn v_stride(&self, cols: usize) -> usize {
        self.w.spec.in_channels * cols + SKEW
    }

    /// Distance between `M[ξ]` and `M[ξ + 1]`: `[O_pad, cols]` plus [`SKEW`].
    pub(super) fn m_stride(&self, cols: usize) -> usize {
        self.w.padded_out * cols + SKEW
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the output's
    /// shape) is added before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let call = self.w.spec.check(x, residual)?;
        let tiles = Tiles::new(call.shape, M);
        let out_len = call.shape.out_len();
        if out_len == 0 {
            return output(Vec::new(), call.shape.out_dims());
        }
        let mut out = Output::new(out_len, "conv output")?;
        // Disjoint writes: each output element belongs to exactly one
        // (tile, channel) pair, and each pair is written by one task.
        let dst = out.shared(out_len);
        with_cpu_f32("winograd conv", &call.x, call.residual.as_ref(), |input, residual| {
            let run = Run {
                conv: self,
                input,
                residual,
                dst,
                tiles,
                prefetch: self.prefetches(std::mem::size_of_val(input)),
            };
            let (block, whole) = self.schedule(tiles.total, rayon::current_num_threads());
            let blocks = tiles.total.div_ceil(block);
            match whole {
                true => try_for_each(0..blocks, |b| run.block(b * block, block, false)),
                false => (0..blocks).try_for_each(|b| run.block(b * block, block, true)),
            }
        })?;
        // SAFETY: the blocks cover every tile of every image, and each tile
        // writes all its in-bounds output pixels for every channel, so all
        // `out_len` elements are initialised.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&call.shape.out_dims())
    }
}

#[cfg(test)]
impl WinogradF4 {
    /// For tests: blocks sized for a budget of `bytes`.
    pub(super) fn with_block_bytes(mut self, bytes: usize) -> Self {
        self.block_bytes = bytes;
        self
    }

    /// For tests: prefetches past `bytes` of input.
    pub(super) fn with_prefetch_above(mut self, bytes: usize) -> Self {
        self.prefetch_above = bytes;
        self
    }
}

impl Run<'_> {
    /// Transforms, multiplies and writes back tiles `first..first + block`
    /// (clipped to the batch); `split` divides each phase across threads.
    fn block(&self, first: usize, block: usize, split: bool) -> Result<()> {
        let conv = self.conv;
        let s = &self.tiles.shape;
        let tiles = block.min(self.tiles.total - first);
        // GEMM columns: the block's tiles rounded up to the kernel's granule.
        let cols = tiles.div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        let positions: Vec<TilePos> = (first..first + tiles).map(|t| self.tile_pos(t)).collect();
        let gathers = match conv.w.isa {
            Isa::Avx512 => GatherChunk::for_block(&positions, self, cols),
            _ => Vec::new(),
        };
        let block = Block {
            positions,
            gathers,
            cols,
        };
        let (v_stride, m_stride) = (conv.v_stride(cols), conv.m_stride(cols));
        let (v_len, m_len) = (XI * v_stride, XI * m_stride);
        with_scratch(v_len + m_len, |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            // V[ξ][c][t]. Channel `c` writes only rows (ξ, c): disjoint across channels.
            let vptr = SharedOut::over(v);
            let transform_channels = |channels: std::ops::Range<usize>| {
                conv.w.isa.run(InputChannels {
                    run: self,
                    block: &block,
                    channels,
                    v: vptr,
                })
            };
            for_ranges(s.channels, split, transform_channels);
            let per_u = conv.w.padded_out * s.channels;
            let gemm = |xi: usize, m: &mut [f32]| {
                panel_gemm(
                    conv.w.isa,
                    &conv.w.u[xi * per_u..][..per_u],
                    &v[xi * v_stride..][..s.channels * cols],
                    &mut m[..conv.w.padded_out * cols],
                    conv.w.padded_out,
                    s.channels,
                    cols,
                )
            };
            if split {
                for_each(m.chunks_mut(m_stride).enumerate(), |(xi, m)| gemm(xi, m));
            } else {
                for (xi, m) in m.chunks_mut(m_stride).enumerate() {
                    gemm(xi, m);
                }
            }
            let m = &*m;
            let transform_outputs = |channels: std::ops::Range<usize>| {
                conv.w.isa.run(OutputChannels {
                    run: self,
                    block: &block,
                    m,
                    channels,
                })
            };
            for_ranges(s.out_channels, split, transform_outputs);
        })
    }

    /// Where tile `t` (numbered over the batch) reads and writes.
    fn tile_pos(&self, t: usize) -> TilePos {
        let (s, padding) = (&self.tiles.shape, self.conv.w.spec.attrs.padding);
        let (image, ty, tx) = self.tiles.tile(t);
        let y0 = (ty * M) as isize - padding[0] as isize;
        let x0 = (tx * M) as isize - padding[1] as isize;
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
    pub(super) offsets: [i32; LANES],
    /// Bit `l` of `row_mask[r]`: row `r` of lane `l`'s patch is in the image.
    pub(super) row_mask: [u16; ALPHA],
    /// Likewise for the patch's columns.
    pub(super) col_mask: [u16; ALPHA],
}

impl GatherChunk {
    /// One per `LANES` columns of a block; empty when the input is too long
    /// for i32 offsets (the transform then falls back to plain loads).
    fn for_block(positions: &[TilePos], run: &Run<'_>, cols: usize) -> Vec<GatherChunk> {
        if run.input.len() > i32::MAX as usize {
            return Vec::new();
        }
        let s = &run.tiles.shape;
        let plane_len = s.in_plane();
        (0..cols / LANES)
            .map(|i| {
                let chunk = &positions[(i * LANES).min(positions.len())..((i + 1) * LANES).min(positions.len())];
                let mut g = GatherChunk {
                    offsets: [0; LANES],
                    row_mask: [0; ALPHA],
                    col_mask: [0; ALPHA],
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

/// Where one tile reads its 6×6 input patch and writes its 4×4 output.
#[derive(Clone, Copy)]
pub(super) struct TilePos {
    pub(super) image: usize,
    /// Top-left of the input patch (may be negative: padding).
    pub(super) y0: isize,
    pub(super) x0: isize,
    /// The whole patch lies inside the image (no padding to synthesise).
    pub(super) interior: bool,
    pub(super) out_y: usize,
    pub(super) out_x: usize,
    /// The whole 4×4 output lies inside the image.
    pub(super) out_full: bool,
}
