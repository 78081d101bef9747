//! Winograd F(2×2, 3×3) for convolutions with few tiles (batch 1 at 7×7:
//! ResNet18's layer4), where [`WinogradConv`](super::WinogradConv)'s
//! F(4×4, 3×3) has too few tiles to fill its products and 4× the weights.
//!
//! At batch 1 such a layer is a product of big weights with a handful of
//! pixels: F(2×2) keeps the transformed weights at 16/9 of the original
//! (F(4×4): 36/9) while cutting the multiplies by 2.25×. The 16 products run
//! on [`lane_gemm`] (output channels on the vector lanes, each weight
//! streamed once), and the transforms, tiny at this size, are plain loops.
//! Error: the points 0, ±1, ∞ only (coefficients ±1 and ½), well inside the
//! F(4×4) bound that `winograd/tests.rs` checks both against.

use crate::cpu_shared::{bias_values, with_cpu_f32, with_scratch, SharedOut};
use crate::gemm_kernel::Isa;
use crate::lane_gemm::{lane_gemm, pack_lanes, LANES};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Input tile side (`2 + 3 - 1`).
const ALPHA: usize = 4;
/// Output tile side.
const M: usize = 2;
/// Transformed components per tile.
const XI: usize = ALPHA * ALPHA;
/// Most tiles per block (scratch `V` and `M` stay small).
const BLOCK_TILES: usize = 64;
/// Output pixels per forward up to which F(2×2) is chosen over the direct
/// conv. Measured on ResNet18's layer4 at batch 1 (49 pixels): 1.58 ms
/// direct (lane GEMM) against 1.17–1.27 ms F(2×2) when it landed. Bigger
/// maps with too few tiles for F(4×4) (batch 2–3 at 7×7) were not timed.
const MAX_PIXELS: usize = 256;
/// Floats (a cache line) added between consecutive ξ matrices of `V` and
/// `M`: their sizes are multiples of 4 KiB for ResNet's layers, which would
/// put the 16 accesses a transform makes per tile chunk in one L1 set.
const SKEW: usize = 16;
/// Fewer channels than this gain too little from the cut in multiplies
/// (a judgement, not a measurement: ResNet18's few-pixel 3×3 convs all
/// have 512).
const MIN_CHANNELS: usize = 64;

/// A 3×3 stride-1 convolution with its weights in the F(2×2, 3×3) domain.
#[derive(Debug, Clone)]
pub(crate) struct WinogradF2Conv {
    in_channels: usize,
    out_channels: usize,
    /// Output channels rounded up to whole lane groups.
    padded_out: usize,
    padding: [usize; 2],
    /// `U[ξ]` (`[O, C]`) for each ξ, packed by [`pack_lanes`].
    u: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
    isa: Isa,
}

#[derive(Clone, Copy)]
struct Shape {
    out_height: usize,
    out_width: usize,
    tiles_x: usize,
    tiles_per_image: usize,
    total_tiles: usize,
    padded_height: usize,
    padded_width: usize,
}

impl WinogradF2Conv {
    /// Whether this is the better algorithm for the node (output
    /// `out_shape`): a 3×3 stride-1 conv [`WinogradConv::applies`](super::WinogradConv::applies)
    /// to, with many channels and few output pixels, where F(4×4) does not
    /// pay off.
    pub(crate) fn pays_off(
        kernel: [usize; 2],
        attrs: &wick_ir::Conv2dAttrs,
        in_channels: usize,
        out_shape: &[usize],
    ) -> bool {
        let &[batch, out_channels, out_height, out_width] = out_shape else {
            return false;
        };
        super::WinogradConv::applies(kernel, attrs)
            && !super::WinogradConv::pays_off(kernel, attrs, in_channels, out_shape)
            && in_channels >= MIN_CHANNELS
            && out_channels >= MIN_CHANNELS
            && batch * out_height * out_width <= MAX_PIXELS
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
        let padded_out = out_channels.div_ceil(LANES) * LANES;
        let per_plain = out_channels * in_channels;
        let plain = super::transformed_weights(&w, out_channels, out_channels, in_channels, weight_transform);
        let per_xi = padded_out * in_channels;
        let mut u = crate::cpu_shared::weight_buffer(XI * per_xi);
        for xi in 0..XI {
            pack_lanes(
                &plain[xi * per_plain..][..per_plain],
                out_channels,
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

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the output's
    /// shape) is added before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (x, residual, out_dims) =
            super::checked_input(x, residual, self.in_channels, self.out_channels, self.padding)?;
        let [batch, channels, height, width] = x.dims4()?.into();
        let [ph, pw] = self.padding;
        let [out_height, out_width] = [out_dims[2], out_dims[3]];
        let tiles_x = out_width.div_ceil(M);
        let tiles_y = out_height.div_ceil(M);
        let s = Shape {
            out_height,
            out_width,
            tiles_x,
            tiles_per_image: tiles_y * tiles_x,
            total_tiles: batch * tiles_y * tiles_x,
            // Every tile's 4×4 patch, padding included, lies in here.
            padded_height: M * tiles_y + 2,
            padded_width: M * tiles_x + 2,
        };
        let out_len = out_dims.iter().product();
        if out_len == 0 {
            return Tensor::from_vec(Vec::<f32>::new(), out_dims.to_vec(), &Device::Cpu);
        }
        let mut out = Vec::<f32>::with_capacity(out_len);
        // Disjoint writes: each output element belongs to one (tile,
        // channel) pair, written by one task of one block.
        let dst = SharedOut(out.as_mut_ptr());
        with_cpu_f32("winograd conv", &x, residual.as_ref(), |input, residual| {
            let padded_plane = s.padded_height * s.padded_width;
            let padded_len = batch * channels * padded_plane;
            let block = BLOCK_TILES.min(s.total_tiles);
            let (v_len, m_len) = (XI * (channels * block + SKEW), XI * (self.padded_out * block + SKEW));
            // One scratch for all three: a nested `with_scratch` would
            // allocate afresh on every call.
            with_scratch(padded_len + v_len + m_len, |scratch| {
                let (padded, rest) = scratch.split_at_mut(padded_len);
                let (v, m) = rest.split_at_mut(v_len);
                // A zero-padded copy of the (small) input: patches need no
                // bounds checks. H + ph <= padded height (and so for W), as
                // 2·tiles_y >= out_height = H + 2·ph − 2.
                padded
                    .par_chunks_mut(padded_plane)
                    .zip(input.par_chunks(height * width))
                    .for_each(|(p, x)| {
                        p.fill(0.0);
                        for (y, row) in x.chunks_exact(width).enumerate() {
                            p[(y + ph) * s.padded_width + pw..][..width].copy_from_slice(row);
                        }
                    });
                for first in (0..s.total_tiles).step_by(block) {
                    let tiles = first..s.total_tiles.min(first + block);
                    self.block(padded, residual, dst, &s, tiles, v, m);
                }
            });
            Ok(())
        })?;
        // SAFETY: the blocks cover every tile of every image, and each tile
        // writes all its in-bounds output pixels for every channel.
        unsafe { out.set_len(out_len) };
        Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)
    }

    /// Transforms, multiplies and writes back the tiles `tiles` (numbered
    /// over the batch), each phase split across threads; `padded` is the
    /// zero-padded input, `v` and `m` scratch of at least the block's size.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        padded: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        tiles: Range<usize>,
        v: &mut [f32],
        m: &mut [f32],
    ) {
        let count = tiles.len();
        let (c_in, c_out) = (self.in_channels, self.padded_out);
        // ξ matrices one cache line further apart than their size (see SKEW).
        let (v_stride, m_stride) = (c_in * count + SKEW, c_out * count + SKEW);
        let (v, m) = (&mut v[..XI * v_stride], &mut m[..XI * m_stride]);
        let threads = rayon::current_num_threads();
        // V[ξ][c][t]: channel c writes rows (ξ, c) only.
        let vptr = SharedOut(v.as_mut_ptr());
        let per = c_in.div_ceil(4 * threads).max(1);
        (0..c_in.div_ceil(per)).into_par_iter().for_each(|chunk| {
            for c in chunk * per..c_in.min((chunk + 1) * per) {
                self.transform_input(padded, s, c, tiles.clone(), vptr);
            }
        });
        let v = &*v;
        // M[ξ] = U[ξ] · V[ξ], `[O_pad / LANES][count][LANES]` per ξ.
        m.par_chunks_mut(m_stride).enumerate().for_each(|(xi, m)| {
            let u = &self.u[xi * c_out * c_in..][..c_out * c_in];
            let v = &v[xi * v_stride..][..c_in * count];
            lane_gemm(
                self.isa,
                u,
                v,
                &mut m[..c_out * count],
                0..c_out / LANES,
                c_out,
                c_in,
                count,
                count,
            );
        });
        let m = &*m;
        let per = self.out_channels.div_ceil(4 * threads).max(1);
        (0..self.out_channels.div_ceil(per)).into_par_iter().for_each(|chunk| {
            for o in chunk * per..self.out_channels.min((chunk + 1) * per) {
                self.transform_output(m, residual, dst, s, o, tiles.clone());
            }
        });
    }

    /// Writes `V[ξ][c][t]` for channel `c` and each tile `t` of `tiles`,
    /// [`TILE_LANES`] tiles at a time (`v` is `[XI][C][tiles.len()]`, ξ
    /// matrices [`SKEW`] apart; no other task writes channel `c`).
    fn transform_input(&self, padded: &[f32], s: &Shape, c: usize, tiles: Range<usize>, v: SharedOut) {
        let count = tiles.len();
        let plane = s.padded_height * s.padded_width;
        for t0 in (0..count).step_by(TILE_LANES) {
            let n = TILE_LANES.min(count - t0);
            let mut d = [[0f32; TILE_LANES]; XI];
            for lane in 0..n {
                let (image, ty, tx) = s.tile(tiles.start + t0 + lane);
                // The patch's top-left in the padded plane is (M·ty, M·tx).
                let p = &padded[(image * self.in_channels + c) * plane + M * ty * s.padded_width + M * tx..];
                for (i, d) in d.iter_mut().enumerate() {
                    d[lane] = p[i / ALPHA * s.padded_width + i % ALPHA];
                }
            }
            for (xi, row) in input_transform(&d).iter().enumerate() {
                // SAFETY: ξ·(C·count + SKEW) + c·count + t0 + n <= XI·(C·count
                // + SKEW), the length of `v`, and this task is the only one
                // writing channel c.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(v.0.add(xi * (self.in_channels * count + SKEW) + c * count + t0), n)
                };
                out.copy_from_slice(&row[..n]);
            }
        }
    }

    /// Output channel `o` of the tiles `tiles` from `m` (the block's
    /// products), with bias, residual and ReLU, [`TILE_LANES`] tiles at a time.
    fn transform_output(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        o: usize,
        tiles: Range<usize>,
    ) {
        let count = tiles.len();
        let per_xi = self.padded_out * count + SKEW;
        let plane = s.out_height * s.out_width;
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
            for lane in 0..n {
                let (image, ty, tx) = s.tile(tiles.start + t0 + lane);
                for (i, y) in y.iter().enumerate() {
                    let (oy, ox) = (ty * M + i / M, tx * M + i % M);
                    if oy >= s.out_height || ox >= s.out_width {
                        continue;
                    }
                    let at = (image * self.out_channels + o) * plane + oy * s.out_width + ox;
                    let mut value = y[lane] + self.bias[o] + residual.map_or(0.0, |r| r[at]);
                    if self.relu {
                        value = value.max(0.0);
                    }
                    // SAFETY: at < N·O·OH·OW (image < N, o < O, oy < OH, ox <
                    // OW), and (o, tile) is written by this task only.
                    unsafe { *dst.0.add(at) = value };
                }
            }
        }
    }
}

impl Shape {
    /// Image, tile row and tile column of tile `t` (numbered over the batch).
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let (image, within) = (t / self.tiles_per_image, t % self.tiles_per_image);
        (image, within / self.tiles_x, within % self.tiles_x)
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
