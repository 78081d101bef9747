//! Winograd F(2×2, 3×3) for convolutions with few tiles (batch 1 at 7×7:
//! ResNet18's layer4), where [`WinogradF4`](super::WinogradF4) has too few
//! tiles to fill its products and 4× the weights.
//!
//! At batch 1 such a layer is a product of big weights with a handful of
//! pixels: F(2×2) keeps the transformed weights at 16/9 of the original
//! (F(4×4): 36/9) while cutting the multiplies by 2.25×. The 16 products run
//! on [`lane_gemm`] (output channels on the vector lanes, each weight
//! streamed once), and the transforms, tiny at this size, are plain loops.
//! Error: the points 0, ±1, ∞ only (coefficients ±1 and ½), well inside the
//! F(4×4) bound that `winograd/tests.rs` checks both against.

use super::{tiles_per_block, Packed, Tiles, SKEW};
use crate::cpu::conv::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::{self, Epilogue};
use crate::cpu::gemm::{lane_gemm, LaneProduct, Layout, LANES};
use crate::cpu::output::Output;
use crate::cpu::parallel::{for_each, for_ranges};
use crate::machine::Machine;
use candle_core::{Result, Tensor};
use std::ops::Range;

/// Input tile side (`2 + 3 - 1`).
const ALPHA: usize = 4;
/// Output tile side.
const M: usize = 2;
/// Transformed components per tile.
const XI: usize = ALPHA * ALPHA;
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
    w: Packed,
}

/// One forward's context, shared by its blocks.
struct Run<'a> {
    conv: &'a WinogradF2,
    /// The zero-padded input: every tile's 4×4 patch lies inside it.
    padded: &'a [f32],
    padded_height: usize,
    padded_width: usize,
    residual: Option<&'a [f32]>,
    dst: SharedOut,
    tiles: Tiles,
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
        // V[ξ][c][t]: channel c writes rows (ξ, c) only.
        let vptr = SharedOut::over(v);
        for_ranges(c_in, true, |channels| {
            for c in channels {
                self.transform_input(c, tiles.clone(), vptr);
            }
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
        let m = &*m;
        let out_channels = conv.w.spec.out_channels;
        for_ranges(out_channels, true, |channels| {
            for o in channels {
                self.transform_output(m, o, tiles.clone());
            }
        });
    }

    /// Writes `V[ξ][c][t]` for channel `c` and each tile `t` of `tiles`,
    /// [`TILE_LANES`] tiles at a time (`v` is `[XI][C][tiles.len()]`, ξ
    /// matrices [`SKEW`] apart; no other task writes channel `c`).
    fn transform_input(&self, c: usize, tiles: Range<usize>, v: SharedOut) {
        let count = tiles.len();
        let c_in = self.conv.w.spec.in_channels;
        let plane = self.padded_height * self.padded_width;
        for t0 in (0..count).step_by(TILE_LANES) {
            let n = TILE_LANES.min(count - t0);
            let mut d = [[0f32; TILE_LANES]; XI];
            for lane in 0..n {
                let (image, ty, tx) = self.tiles.tile(tiles.start + t0 + lane);
                // The patch's top-left in the padded plane is (M·ty, M·tx).
                let p = &self.padded[(image * c_in + c) * plane + M * ty * self.padded_width + M * tx..];
                for (i, d) in d.iter_mut().enumerate() {
                    d[lane] = p[i / ALPHA * self.padded_width + i % ALPHA];
                }
            }
            for (xi, row) in input_transform(&d).iter().enumerate() {
                // SAFETY: row (ξ, c) of V is written by this task only.
                unsafe { v.slice(xi * (c_in * count + SKEW) + c * count + t0, n) }.copy_from_slice(&row[..n]);
            }
        }
    }

    /// Output channel `o` of the tiles `tiles` from `m` (the block's
    /// products), with the epilogue, [`TILE_LANES`] tiles at a time.
    fn transform_output(&self, m: &[f32], o: usize, tiles: Range<usize>) {
        let count = tiles.len();
        let s = &self.tiles.shape;
        let per_xi = self.conv.w.padded_out * count + SKEW;
        let (bias, activation) = (self.conv.w.epilogue.bias(o), self.conv.w.epilogue.activation());
        for t0 in (0..count).step_by(TILE_LANES) {
            let n = TILE_LANES.min(count - t0);
            let mut products = [[0f32; TILE_LANES]; XI];
            for (xi, row) in products.iter_mut().enumerate() {
                let group = &m[xi * per_xi + (o / LANES) * count * LANES + o % LANES..];
                for (lane, value) in row[..n].iter_mut().enumerate() {
                    *value = group[(t0 + lane) * LANES];
                }
            }
            let y = output_transform(&products);
            for (lane, tile) in (tiles.start + t0..tiles.start + t0 + n).enumerate() {
                let (image, ty, tx) = self.tiles.tile(tile);
                let (h, w) = ((s.out_height - ty * M).min(M), (s.out_width - tx * M).min(M));
                // The tile's rows in channel o, checked at once.
                let first = (image * s.out_channels + o) * s.out_plane() + ty * M * s.out_width + tx * M;
                self.dst.check(first, first + (h - 1) * s.out_width + w);
                for i in 0..h {
                    let base = first + i * s.out_width;
                    // SAFETY: within the range checked above; (o, tile) is
                    // written by this task only.
                    let out = unsafe { self.dst.slice_within(base, w) };
                    for (j, out) in out.iter_mut().enumerate() {
                        let residual = self.residual.map(|r| r[base + j]);
                        *out = epilogue::value(y[i * M + j][lane], bias, residual, activation);
                    }
                }
            }
        }
    }
}

/// Tiles transformed together, one per vector lane.
const TILE_LANES: usize = 16;
type Lanes = [f32; TILE_LANES];

fn add(a: &Lanes, b: &Lanes) -> Lanes {
    std::array::from_fn(|i| a[i] + b[i])
}

fn sub(a: &Lanes, b: &Lanes) -> Lanes {
    std::array::from_fn(|i| a[i] - b[i])
}

/// `Bᵀ d B` for [`TILE_LANES`] 4×4 patches `d` (row-major, one tile per
/// lane), with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
fn input_transform(d: &[Lanes; XI]) -> [Lanes; XI] {
    let bt = |a: [&Lanes; 4]| [sub(a[0], a[2]), add(a[1], a[2]), sub(a[2], a[1]), sub(a[1], a[3])];
    // Columns first: t = Bᵀ d.
    let mut t = [[0f32; TILE_LANES]; XI];
    for j in 0..ALPHA {
        for (i, value) in bt([&d[j], &d[4 + j], &d[8 + j], &d[12 + j]]).into_iter().enumerate() {
            t[i * ALPHA + j] = value;
        }
    }
    // Then rows: v = t B.
    let mut v = [[0f32; TILE_LANES]; XI];
    for i in 0..ALPHA {
        let row = bt([&t[i * 4], &t[i * 4 + 1], &t[i * 4 + 2], &t[i * 4 + 3]]);
        v[i * ALPHA..][..ALPHA].copy_from_slice(&row);
    }
    v
}

/// `Aᵀ m A` for [`TILE_LANES`] 4×4 product tiles `m` (one per lane), with
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`; the 2×2 outputs row-major.
fn output_transform(m: &[Lanes; XI]) -> [Lanes; M * M] {
    let at = |a: [&Lanes; 4]| [add(&add(a[0], a[1]), a[2]), sub(&sub(a[1], a[2]), a[3])];
    // Columns first: t = Aᵀ m (2×4).
    let mut t = [[0f32; TILE_LANES]; M * ALPHA];
    for j in 0..ALPHA {
        let [top, bottom] = at([&m[j], &m[4 + j], &m[8 + j], &m[12 + j]]);
        t[j] = top;
        t[ALPHA + j] = bottom;
    }
    // Then rows: y = t A.
    let [y00, y01] = at([&t[0], &t[1], &t[2], &t[3]]);
    let [y10, y11] = at([&t[4], &t[5], &t[6], &t[7]]);
    [y00, y01, y10, y11]
}

/// `G g Gᵀ` in f64 for a 3×3 kernel `g` (row-major), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
fn weight_transform(g: &[f32]) -> [f64; XI] {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let mut gg = [[0f64; 3]; 4];
    for (i, row) in G.iter().enumerate() {
        for j in 0..3 {
            gg[i][j] = (0..3).map(|k| row[k] * f64::from(g[k * 3 + j])).sum();
        }
    }
    let mut u = [0f64; XI];
    for i in 0..4 {
        for (j, row) in G.iter().enumerate() {
            u[i * 4 + j] = (0..3).map(|k| gg[i][k] * row[k]).sum();
        }
    }
    u
}
