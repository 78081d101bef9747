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

use crate::cpu_shared::{with_cpu_f32, with_scratch, SharedOut};
use crate::gemm_kernel::Isa;
use crate::lane_gemm::{lane_gemm, pack_lanes, LANES};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;

/// Input tile side (`2 + 3 - 1`).
const ALPHA: usize = 4;
/// Output tile side.
const M: usize = 2;
/// Transformed components per tile.
const XI: usize = ALPHA * ALPHA;
/// Most tiles per block (scratch `V` and `M` stay small).
const BLOCK_TILES: usize = 64;
/// Output pixels per forward up to which F(2×2) beats the direct conv
/// (measured on ResNet18 at batch 1: 49 pixels, 1.6 → see README).
const MAX_PIXELS: usize = 256;
/// Fewer channels than this gain too little from the cut in multiplies.
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
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    tiles_x: usize,
    tiles_per_image: usize,
    total_tiles: usize,
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
        // Transformed weights, [ξ][O][C], before packing.
        let per_plain = out_channels * in_channels;
        let mut plain = vec![0f32; XI * per_plain];
        for o in 0..out_channels {
            for c in 0..in_channels {
                let u = weight_transform(&w[(o * in_channels + c) * 9..][..9]);
                for (xi, value) in u.iter().enumerate() {
                    plain[xi * per_plain + o * in_channels + c] = *value as f32;
                }
            }
        }
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
        let s = Shape {
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
        // Disjoint writes: each output element belongs to one (tile,
        // channel) pair, written by one task of one block.
        let dst = SharedOut(out.as_mut_ptr());
        with_cpu_f32("winograd conv", &x, residual.as_ref(), |input, residual| {
            for first in (0..s.total_tiles).step_by(BLOCK_TILES) {
                self.block(input, residual, dst, &s, first..s.total_tiles.min(first + BLOCK_TILES));
            }
            Ok(())
        })?;
        // SAFETY: the blocks cover every tile of every image, and each tile
        // writes all its in-bounds output pixels for every channel.
        unsafe { out.set_len(out_len) };
        Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)
    }

    /// Transforms, multiplies and writes back the tiles `tiles` (numbered
    /// over the batch), each phase split across threads.
    fn block(&self, input: &[f32], residual: Option<&[f32]>, dst: SharedOut, s: &Shape, tiles: std::ops::Range<usize>) {
        let count = tiles.len();
        let (c_in, c_out) = (self.in_channels, self.padded_out);
        let (v_len, m_len) = (XI * c_in * count, XI * c_out * count);
        let threads = rayon::current_num_threads();
        with_scratch(v_len + m_len, |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            // V[ξ][c][t]: channel c writes rows (ξ, c) only.
            let vptr = SharedOut(v.as_mut_ptr());
            let per = c_in.div_ceil(4 * threads).max(1);
            (0..c_in.div_ceil(per)).into_par_iter().for_each(|chunk| {
                for c in chunk * per..c_in.min((chunk + 1) * per) {
                    self.transform_input(input, s, c, tiles.clone(), vptr);
                }
            });
            let v = &*v;
            // M[ξ] = U[ξ] · V[ξ], `[O_pad / LANES][count][LANES]` per ξ.
            m.par_chunks_mut(c_out * count).enumerate().for_each(|(xi, m)| {
                let u = &self.u[xi * c_out * c_in..][..c_out * c_in];
                let v = &v[xi * c_in * count..][..c_in * count];
                lane_gemm(self.isa, u, v, m, 0..c_out / LANES, c_out, c_in, count, count);
            });
            let m = &*m;
            let per = self.out_channels.div_ceil(4 * threads).max(1);
            (0..self.out_channels.div_ceil(per)).into_par_iter().for_each(|chunk| {
                for o in chunk * per..self.out_channels.min((chunk + 1) * per) {
                    for (t, tile) in tiles.clone().enumerate() {
                        let at = |xi: usize| m[xi * c_out * count + ((o / LANES) * count + t) * LANES + o % LANES];
                        let y = output_transform(&std::array::from_fn(at));
                        self.write_tile(residual, dst, s, o, tile, &y);
                    }
                }
            });
        });
    }

    /// Writes `V[ξ][c][t]` for channel `c` and each tile `t` of `tiles`
    /// (`v` is `[XI][C][tiles.len()]`; no other task writes channel `c`).
    fn transform_input(&self, input: &[f32], s: &Shape, c: usize, tiles: std::ops::Range<usize>, v: SharedOut) {
        let count = tiles.len();
        for (t, tile) in tiles.enumerate() {
            let d = self.patch(input, s, c, tile);
            for (xi, value) in input_transform(&d).into_iter().enumerate() {
                // SAFETY: (ξ·C + c)·count + t < XI·C·count, the length of `v`,
                // and this task is the only one writing channel c.
                unsafe { *v.0.add((xi * self.in_channels + c) * count + t) = value };
            }
        }
    }

    /// The 4×4 input patch of `tile` in channel `c`, zeros outside the image.
    fn patch(&self, input: &[f32], s: &Shape, c: usize, tile: usize) -> [f32; XI] {
        let (image, within) = (tile / s.tiles_per_image, tile % s.tiles_per_image);
        let (ty, tx) = (within / s.tiles_x, within % s.tiles_x);
        let plane = &input[(image * self.in_channels + c) * s.height * s.width..][..s.height * s.width];
        std::array::from_fn(|i| {
            let y = (ty * M + i / ALPHA) as isize - self.padding[0] as isize;
            let x = (tx * M + i % ALPHA) as isize - self.padding[1] as isize;
            if (0..s.height as isize).contains(&y) && (0..s.width as isize).contains(&x) {
                plane[y as usize * s.width + x as usize]
            } else {
                0.0
            }
        })
    }

    /// Adds bias and residual, applies the ReLU, and writes the in-bounds
    /// part of output tile `tile` of channel `o`.
    fn write_tile(&self, residual: Option<&[f32]>, dst: SharedOut, s: &Shape, o: usize, tile: usize, y: &[f32; 4]) {
        let (image, within) = (tile / s.tiles_per_image, tile % s.tiles_per_image);
        let (ty, tx) = (within / s.tiles_x, within % s.tiles_x);
        let plane = s.out_height * s.out_width;
        for (i, &value) in y.iter().enumerate() {
            let (oy, ox) = (ty * M + i / M, tx * M + i % M);
            if oy >= s.out_height || ox >= s.out_width {
                continue;
            }
            let at = (image * self.out_channels + o) * plane + oy * s.out_width + ox;
            let mut value = value + self.bias[o] + residual.map_or(0.0, |r| r[at]);
            if self.relu {
                value = value.max(0.0);
            }
            // SAFETY: at < N·O·OH·OW (image < N, o < O, oy < OH, ox < OW), and
            // (o, tile) is written by this task only.
            unsafe { *dst.0.add(at) = value };
        }
    }
}

/// `Bᵀ d B` for a 4×4 patch `d` (row-major), with
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
fn input_transform(d: &[f32; XI]) -> [f32; XI] {
    let bt = |a: [f32; 4]| [a[0] - a[2], a[1] + a[2], a[2] - a[1], a[1] - a[3]];
    let mut rows = [[0f32; 4]; 4];
    for j in 0..4 {
        let col = bt([d[j], d[4 + j], d[8 + j], d[12 + j]]);
        for i in 0..4 {
            rows[i][j] = col[i];
        }
    }
    let mut v = [0f32; XI];
    for i in 0..4 {
        v[i * 4..][..4].copy_from_slice(&bt(rows[i]));
    }
    v
}

/// `Aᵀ m A` for a 4×4 product tile `m`, with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`.
fn output_transform(m: &[f32; XI]) -> [f32; 4] {
    let at = |a: [f32; 4]| [a[0] + a[1] + a[2], a[1] - a[2] - a[3]];
    let mut cols = [[0f32; 4]; 2];
    for j in 0..4 {
        let c = at([m[j], m[4 + j], m[8 + j], m[12 + j]]);
        cols[0][j] = c[0];
        cols[1][j] = c[1];
    }
    let (r0, r1) = (at(cols[0]), at(cols[1]));
    [r0[0], r0[1], r1[0], r1[1]]
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
