//! Winograd F(2×2, 3×3) for convolutions with few tiles (batch 1 at 7×7:
//! ResNet18's layer4), where [`WinogradF4`](super::WinogradF4) has too few
//! tiles to fill its products and 4× the weights.
//!
//! At batch 1 such a layer is a product of big weights with a handful of
//! pixels: F(2×2) keeps the transformed weights at 16/9 of the original
//! (F(4×4): 36/9) while cutting the multiplies by 2.25×. The 16 products run
//! on [`lane_gemm`] (output channels on the vector lanes, each weight
//! streamed once); the transforms (`f2_transform.rs`) run on the conv's path,
//! the input's with the tiles on the lanes, the output's with the output
//! channels on them, as the products leave them.
//! Error: the points 0, ±1, ∞ only (coefficients ±1 and ½), well inside the
//! F(4×4) bound that `winograd/tests.rs` checks both against.

use super::f2_transform::{weight_transform, InputChannels, OutputGroup, Place};
use super::{tiles_per_block, Packed, Tiles, SKEW};
use crate::cpu::conv::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{lane_gemm, LaneProduct, Layout, LANES};
use crate::cpu::output::Output;
use crate::cpu::parallel::{for_each, for_ranges};
use crate::machine::Machine;
use candle_core::{Result, Tensor};
use std::ops::Range;

/// Input tile side (`2 + 3 - 1`).
pub(super) const ALPHA: usize = 4;
/// Output tile side.
pub(super) const M: usize = 2;
/// Transformed components per tile.
pub(super) const XI: usize = ALPHA * ALPHA;
/// Tiles per task of the output transform.
const OUTPUT_TILES: usize = 16;
/// Most tiles per block (scratch `V` and `M` stay small), unless the
/// weights outweigh all the tiles' `V` and `M` ([`tiles_per_block`]:
/// ResNet34's layer4 at batch 10, 160 tiles, F(2×2) once its weight
/// budget steps it down, took 0.97-0.98× the forward's time in one block
/// as in blocks of 64, alternating forwards on the Intel Xeon VM).
const BLOCK_TILES: usize = 64;

/// A 3×3 stride-1 convolution with its weights in the F(2×2, 3×3) domain.
#[derive(Debug)]
pub(crate) struct WinogradF2 {
    /// The conv, its `U[ξ]` (`[O, C]`) packed for the lane micro-kernel, the epilogue, the path.
    pub(super) w: Packed,
}

/// One forward's context, shared by its blocks.
pub(super) struct Run<'a> {
    pub(super) conv: &'a WinogradF2,
    /// The zero-padded input: every tile's 4×4 patch lies inside it.
    pub(super) padded: &'a [f32],
    pub(super) padded_height: usize,
    pub(super) padded_width: usize,
    pub(super) residual: Option<&'a [f32]>,
    pub(super) dst: SharedOut,
    pub(super) tiles: Tiles,
}

impl WinogradF2 {
    /// Transforms and packs `weight` (`[O, C, 3, 3]`, f32) for `spec`.
    pub(crate) fn new(spec: ConvSpec, weight: &Tensor, epilogue: Epilogue, machine: Machine) -> Result<Self> {
        let w = Packed::new(spec, weight, weight_transform, Layout::Lanes, epilogue, machine)?;
        Ok(Self { w })
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the output's
    /// shape) is added before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let call = self.w.spec.check(x, residual)?;
        let shape = call.shape;
        let tiles = Tiles::new(shape, M);
        let [ph, pw] = self.w.spec.attrs.padding;
        let out_len = shape.out_len();
        if out_len == 0 {
            return output(Vec::new(), shape.out_dims());
        }
        // Every tile's 4×4 patch, padding included, lies in here.
        let (padded_height, padded_width) = (M * shape.out_height.div_ceil(M) + 2, M * tiles.across + 2);
        let mut out = Output::new(out_len, "conv output")?;
        // Disjoint writes: each output element belongs to one (tile,
        // channel) pair, written by one task of one block.
        let dst = out.shared(out_len);
        with_cpu_f32("winograd conv", &call.x, call.residual.as_ref(), |input, residual| {
            let (channels, width) = (shape.channels, shape.width);
            let padded_plane = padded_height * padded_width;
            let padded_len = shape.batch * channels * padded_plane;
            let per_tile = XI * (channels + self.w.padded_out) * 4;
            let u_bytes = std::mem::size_of_val(&*self.w.u);
            let block = tiles_per_block(BLOCK_TILES, tiles.total, per_tile, u_bytes).min(tiles.total);
            let (v_len, m_len) = (XI * (channels * block + SKEW), XI * (self.w.padded_out * block + SKEW));
            // One scratch for all three: a nested `with_scratch` would
            // allocate afresh on every call.
            with_scratch(padded_len + v_len + m_len, |scratch| {
                let (padded, rest) = scratch.split_at_mut(padded_len);
                let (v, m) = rest.split_at_mut(v_len);
                // A zero-padded copy of the (small) input: patches need no
                // bounds checks. H + ph <= padded height (and so for W), as
                // 2·tiles_y >= out_height = H + 2·ph − 2.
                let planes = padded.chunks_mut(padded_plane).zip(input.chunks(shape.in_plane()));
                for_each(planes, |(p, x)| {
                    p.fill(0.0);
                    for (y, row) in x.chunks_exact(width).enumerate() {
                        p[(y + ph) * padded_width + pw..][..width].copy_from_slice(row);
                    }
                });
                let run = Run {
                    conv: self,
                    padded,
                    padded_height,
                    padded_width,
                    residual,
                    dst,
                    tiles,
                };
                for first in (0..tiles.total).step_by(block) {
                    run.block(first..tiles.total.min(first + block), v, m);
                }
            })
        })?;
        // SAFETY: the blocks cover every tile of every image, and each tile
        // writes all its in-bounds output pixels for every channel.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }
}

impl Run<'_> {
    /// Transforms, multiplies and writes back the tiles `tiles` (numbered
    /// over the batch), each phase split across threads; `v` and `m` are
    /// scratch of at least the block's size.
    fn block(&self, tiles: Range<usize>, v: &mut [f32], m: &mut [f32]) {
        let conv = self.conv;
        let count = tiles.len();
        let (c_in, c_out) = (conv.w.spec.in_channels, conv.w.padded_out);
        // ξ matrices one cache line further apart than their size (see SKEW).
        let (v_stride, m_stride) = (c_in * count + SKEW, c_out * count + SKEW);
        let (v, m) = (&mut v[..XI * v_stride], &mut m[..XI * m_stride]);
        let places: Vec<Place> = tiles.map(|t| self.place(t)).collect();
        // V[ξ][c][t]: channel c writes rows (ξ, c) only.
        let vptr = SharedOut::over(v);
        for_ranges(c_in, true, |channels| {
            conv.w.isa.run(InputChannels {
                run: self,
                places: &places,
                channels,
                v: vptr,
                v_stride,
            })
        });
        let v = &*v;
        // M[ξ] = U[ξ] · V[ξ], `[O_pad / LANES][count][LANES]` per ξ.
        let size = LaneProduct {
            rows: c_out,
            depth: c_in,
            cols: count,
            pixels: count,
        };
        for_each(m.chunks_mut(m_stride).enumerate(), |(xi, m)| {
            let u = &conv.w.u[xi * c_out * c_in..][..c_out * c_in];
            let v = &v[xi * v_stride..][..c_in * count];
            lane_gemm(conv.w.isa, size, u, v, &mut m[..c_out * count], 0..c_out / LANES);
        });
        // Each task one lane group's channels over a run of tiles.
        let m = &*m;
        let runs = count.div_ceil(OUTPUT_TILES);
        for_each(0..c_out / LANES * runs, |task| {
            let (group, run) = (task / runs, task % runs);
            conv.w.isa.run(OutputGroup {
                run: self,
                places: &places,
                m,
                m_stride,
                group,
                tiles: run * OUTPUT_TILES..count.min((run + 1) * OUTPUT_TILES),
            })
        });
    }

    /// Where tile `t` (numbered over the batch) reads and writes.
    fn place(&self, t: usize) -> Place {
        let s = &self.tiles.shape;
        let (image, ty, tx) = self.tiles.tile(t);
        let plane = self.padded_height * self.padded_width;
        Place {
            // The patch's top-left in the padded plane is (M·ty, M·tx).
            patch: image * s.channels * plane + M * ty * self.padded_width + M * tx,
            out: image * s.out_channels * s.out_plane() + ty * M * s.out_width + tx * M,
            rows: (s.out_height - ty * M).min(M),
            cols: (s.out_width - tx * M).min(M),
        }
    }
}
