//! Direct CPU f32 convolution for one group (any kernel, stride, padding,
//! dilation), as an implicit GEMM in cache-sized blocks: the output pixels
//! of the whole batch are cut into blocks of a few hundred; each block's
//! im2col columns (`[C·kh·kw, block]`, fits L2) are multiplied by the
//! weights packed once at compile time ([`panel_gemm`], AVX-512 / AVX2), and
//! the bias, residual and ReLU are applied while the block is still in cache.
//! No whole-image im2col buffer, no per-call packing. With a fused max pool
//! (`pooled.rs`) the convolution's rows stay in scratch and only the pooled
//! output is written.

mod pooled;

use crate::cpu_shared::{bias_values, conv_out_size, windowed_len, with_cpu_f32, with_scratch, SharedOut};
use crate::gemm_kernel::{pack_panels, panel_gemm, Isa, PANEL_GRANULE, PANEL_ROWS};
use crate::lane_gemm::{lane_gemm, pack_lanes, LANES};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

/// Scratch (im2col columns and products) one block aims to fit in.
const BLOCK_BYTES: usize = 1 << 20;

/// Smallest block worth running on its own thread rather than splitting
/// one block's phases across threads.
const MIN_BLOCK_COLS: usize = 128;

/// Convolutions expected to produce at most this many output pixels per
/// forward (batch 1 at 14×14 and below) use [`lane_gemm`]: channels on the
/// vector lanes, weights streamed once.
pub(crate) const LANE_MAX_PIXELS: usize = 256;

/// The packed weights, in the layout of the product that uses them.
#[derive(Debug, Clone)]
enum Packed {
    /// [`pack_panels`] `[O_pad, C·kh·kw]`, for [`panel_gemm`] (pixels on lanes).
    Panels(Vec<f32>),
    /// [`pack_lanes`], for [`lane_gemm`] (output channels on lanes).
    Lanes(Vec<f32>),
}

/// A one-group convolution with its weights packed for one of the two GEMM
/// micro-kernels (panels: pixels on the lanes; lanes: output channels on them).
#[derive(Debug, Clone)]
pub(crate) struct DirectConv {
    attrs: Conv2dAttrs,
    in_channels: usize,
    out_channels: usize,
    /// Output channels rounded up to a whole panel (or lane group).
    padded_out: usize,
    kernel: [usize; 2],
    packed: Packed,
    bias: Vec<f32>,
    relu: bool,
    /// A max pool applied to the convolution's output, if fused.
    pool: Option<MaxPool2dAttrs>,
    isa: Isa,
}

/// A run of output pixels in one output row: image, row, columns
/// `x0..x1`, stored from column `col` of the block.
#[derive(Clone, Copy)]
struct Segment {
    image: usize,
    y: usize,
    x0: usize,
    x1: usize,
    col: usize,
}

#[derive(Clone, Copy)]
struct Shape {
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    total: usize,
}

impl DirectConv {
    /// Packs `weight` (`[O, C, kh, kw]`, f32) and `bias` (`[O]`);
    /// `attrs.groups` must be 1. `pool`, if given, is applied last.
    /// `pixels` is the number of output pixels (`N·OH·OW`) a forward is
    /// expected to compute; it picks the weights' layout, and any input
    /// shape still gives the same results.
    pub(crate) fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        attrs: Conv2dAttrs,
        relu: bool,
        pool: Option<MaxPool2dAttrs>,
        isa: Isa,
        pixels: usize,
    ) -> candle_core::Result<Self> {
        if let Some(p) = pool {
            if (0..2).any(|i| p.kernel[i] == 0 || p.stride[i] == 0 || 2 * p.padding[i] > p.kernel[i]) {
                bail!("fused max pool needs non-zero kernel and stride and padding <= half the window, got {p:?}")
            }
        }
        if attrs.groups != 1 {
            bail!("the direct conv takes one group, got {}", attrs.groups)
        }
        let (out_channels, in_channels, kh, kw) = weight.dims4()?;
        let depth = in_channels * kh * kw;
        let mut plain = weight.flatten_all()?.to_vec1::<f32>()?;
        let (padded_out, packed) = if pool.is_none() && pixels <= LANE_MAX_PIXELS {
            let padded_out = out_channels.div_ceil(LANES) * LANES;
            let mut lanes = crate::cpu_shared::weight_buffer(padded_out * depth);
            pack_lanes(&plain, out_channels, depth, &mut lanes);
            (padded_out, Packed::Lanes(lanes))
        } else {
            let padded_out = out_channels.div_ceil(PANEL_ROWS) * PANEL_ROWS;
            plain.resize(padded_out * depth, 0.0);
            let mut panels = crate::cpu_shared::weight_buffer(padded_out * depth);
            pack_panels(&plain, padded_out, depth, &mut panels);
            (padded_out, Packed::Panels(panels))
        };
        let bias = bias_values(bias, out_channels, "conv")?;
        Ok(Self {
            attrs,
            in_channels,
            out_channels,
            padded_out,
            kernel: [kh, kw],
            packed,
            bias,
            relu,
            pool,
            isa,
        })
    }

    /// Whether the weights are packed for [`lane_gemm`] (few pixels).
    pub(crate) fn lanes(&self) -> bool {
        matches!(self.packed, Packed::Lanes(_))
    }

    fn depth(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels per block: a multiple of the GEMM granule, columns and
    /// products together within [`BLOCK_BYTES`], blocks of even size.
    fn block_cols(&self, total: usize) -> usize {
        if let Packed::Lanes(_) = self.packed {
            return total.min(LANE_MAX_PIXELS).div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        }
        let per_col = (self.depth() + self.padded_out) * 4;
        let target = (BLOCK_BYTES / per_col).max(PANEL_GRANULE);
        // At least two blocks per thread where each keeps MIN_BLOCK_COLS
        // columns: whole blocks in parallel keep each block's columns in one
        // core's cache, where splitting one block across threads makes every
        // thread stream all of its columns.
        let threads = rayon::current_num_threads();
        let target = target.min(total.div_ceil(2 * threads).max(MIN_BLOCK_COLS));
        let blocks = total.div_ceil(target).max(1);
        total.div_ceil(blocks).div_ceil(PANEL_GRANULE) * PANEL_GRANULE
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the
    /// convolution's output shape) is added before the optional ReLU, and
    /// the fused pool, if any, comes last.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let &[batch, channels, height, width] = x.dims() else {
            bail!("conv input must be NCHW, got {:?}", x.dims())
        };
        if channels != self.in_channels {
            bail!("conv expects {} input channels, got {channels}", self.in_channels)
        }
        let Some([out_height, out_width]) = conv_out_size(&self.attrs, self.kernel, [height, width]) else {
            bail!("kernel {:?} does not fit input {:?}", self.kernel, x.dims())
        };
        let out_dims = [batch, self.out_channels, out_height, out_width];
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        if residual.as_ref().is_some_and(|r| r.dims() != out_dims) {
            bail!("the residual of a conv must have the output's shape {out_dims:?}")
        }
        let shape = Shape {
            height,
            width,
            out_height,
            out_width,
            total: batch * out_height * out_width,
        };
        let final_dims = match &self.pool {
            None => out_dims,
            Some(p) => {
                let pooled = |len: usize, i: usize| windowed_len(len, p.kernel[i], p.stride[i], p.padding[i], 1);
                let (Some(ph), Some(pw)) = (pooled(out_height, 0), pooled(out_width, 1)) else {
                    bail!("pool window {:?} does not fit the conv output {out_dims:?}", p.kernel)
                };
                [batch, self.out_channels, ph, pw]
            }
        };
        let out_len: usize = final_dims.iter().product();
        if out_len == 0 {
            // An empty batch: nothing to compute (and no block size to pick).
            return Tensor::from_vec(Vec::<f32>::new(), final_dims.to_vec(), &Device::Cpu);
        }
        let mut out = Vec::<f32>::with_capacity(out_len);
        // Disjoint writes: blocks (row chunks when pooled) cover disjoint
        // output pixels, and one task writes every channel of its pixels once.
        let dst = SharedOut(out.as_mut_ptr());
        with_cpu_f32("direct conv", &x, residual.as_ref(), |input, residual| {
            if let Some(pool) = &self.pool {
                self.pooled(
                    input,
                    residual,
                    dst,
                    &shape,
                    batch,
                    pool,
                    [final_dims[2], final_dims[3]],
                );
                return Ok(());
            }
            let cols = self.block_cols(shape.total);
            let blocks = shape.total.div_ceil(cols);
            let threads = rayon::current_num_threads();
            let split = blocks < 2 * threads && threads > 1;
            let run_block = |b: usize| self.block(input, residual, dst, &shape, b * cols, cols, split);
            if split {
                (0..blocks).for_each(run_block);
            } else {
                (0..blocks).into_par_iter().for_each(run_block);
            }
            Ok(())
        })?;
        // SAFETY: the blocks cover all N·OH·OW output pixels (`pooled`: all
        // pooled pixels) and each writes every channel of its pixels, so all
        // `out_len` values are set.
        unsafe { out.set_len(out_len) };
        Tensor::from_vec(out, final_dims.to_vec(), &Device::Cpu)
    }

    /// im2col, product and epilogue for pixels `first..first + cols` (clipped).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        first: usize,
        cols: usize,
        split: bool,
    ) {
        let pixels = cols.min(s.total - first);
        let cols = pixels.div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        let segments = segments(s, first, pixels);
        let depth = self.depth();
        let (v_len, m_len) = (depth * cols, self.products_len(cols));
        with_scratch(v_len + m_len, |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            self.products(input, s, &segments, pixels, cols, split, v, m);
            let m = &*m;
            let epilogue = |channels: Range<usize>| self.epilogue(m, residual, dst, s, &segments, cols, channels);
            if split {
                // Channels in parallel: each writes its own output rows.
                let per = self.out_channels.div_ceil(4 * rayon::current_num_threads()).max(1);
                (0..self.out_channels.div_ceil(per))
                    .into_par_iter()
                    .for_each(|i| epilogue(i * per..self.out_channels.min((i + 1) * per)));
            } else {
                epilogue(0..self.out_channels);
            }
        });
    }

    /// Bias, residual and ReLU for output channels `channels` of a block
    /// (products `m`, `[O_pad, cols]`), written to the output pixels of
    /// `segments`.
    #[allow(clippy::too_many_arguments)]
    fn epilogue(
        &self,
        m: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        segments: &[Segment],
        cols: usize,
        channels: Range<usize>,
    ) {
        let out_plane = s.out_height * s.out_width;
        for o in channels {
            let bias = self.bias[o];
            let products = &m[o * cols..][..cols];
            for seg in segments {
                let base = (seg.image * self.out_channels + o) * out_plane + seg.y * s.out_width;
                let n = seg.x1 - seg.x0;
                let src = &products[seg.col..seg.col + n];
                // SAFETY: base + x1 <= N·O·OH·OW (image < N, o < O, y < OH,
                // x1 <= OW); these pixels belong to this block only, and
                // channel o to one epilogue call.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.0.add(base + seg.x0), n) };
                match residual {
                    Some(r) => {
                        for ((out, &p), &r) in out.iter_mut().zip(src).zip(&r[base + seg.x0..base + seg.x1]) {
                            let v = p + bias + r;
                            *out = if self.relu { v.max(0.0) } else { v };
                        }
                    }
                    None => {
                        for (out, &p) in out.iter_mut().zip(src) {
                            let v = p + bias;
                            *out = if self.relu { v.max(0.0) } else { v };
                        }
                    }
                }
            }
        }
    }

    /// Scratch [`Self::products`] needs for its `m`: `[O_pad, cols]`, and as
    /// much again for the lane layout's transposition.
    fn products_len(&self, cols: usize) -> usize {
        match self.packed {
            Packed::Panels(_) => self.padded_out * cols,
            Packed::Lanes(_) => 2 * self.padded_out * cols,
        }
    }

    /// `m[..O_pad · cols]` (`[O_pad, cols]`) = weights · im2col of the
    /// block's pixels (`segments`, `pixels` of them); `v` (`[C·kh·kw,
    /// cols]`) and the rest of `m` ([`Self::products_len`] in all) are scratch.
    /// `split` shares the product's output-channel panels across threads.
    #[allow(clippy::too_many_arguments)]
    fn products(
        &self,
        input: &[f32],
        s: &Shape,
        segments: &[Segment],
        pixels: usize,
        cols: usize,
        split: bool,
        v: &mut [f32],
        m: &mut [f32],
    ) {
        let depth = self.depth();
        if split {
            // im2col rows are independent: share them too.
            let per_task = depth.div_ceil(4 * rayon::current_num_threads());
            v.par_chunks_mut(per_task * cols)
                .enumerate()
                .for_each(|(i, v)| self.im2col(input, s, segments, pixels, cols, i * per_task, v));
        } else {
            self.im2col(input, s, segments, pixels, cols, 0, v);
        }
        let v = &*v;
        match &self.packed {
            Packed::Panels(panels) if split => {
                let per_task = (self.padded_out / PANEL_ROWS).div_ceil(4 * rayon::current_num_threads()) * PANEL_ROWS;
                m.par_chunks_mut(per_task * cols).enumerate().for_each(|(i, m)| {
                    let rows = m.len() / cols;
                    let u = &panels[i * per_task * depth..][..rows * depth];
                    panel_gemm(self.isa, u, v, m, rows, depth, cols);
                });
            }
            Packed::Panels(panels) => panel_gemm(self.isa, panels, v, m, self.padded_out, depth, cols),
            Packed::Lanes(lanes) => {
                let (m, t) = m.split_at_mut(self.padded_out * cols);
                let t = &mut t[..self.padded_out * pixels];
                // `t` is `[O_pad / LANES][pixels][LANES]`; tasks own whole lane groups.
                let per_group = pixels * LANES;
                let groups = self.padded_out / LANES;
                let per_task = if split {
                    groups.div_ceil(2 * rayon::current_num_threads())
                } else {
                    groups
                };
                t.par_chunks_mut(per_task * per_group).enumerate().for_each(|(i, t)| {
                    let first = i * per_task;
                    let groups = first..first + t.len() / per_group;
                    lane_gemm(self.isa, lanes, v, t, groups, self.padded_out, depth, cols, pixels);
                });
                // Back to `[O_pad, cols]` for the epilogue (columns past
                // `pixels` are never read), a lane group per task.
                let t = &*t;
                m.par_chunks_mut(LANES * cols).enumerate().for_each(|(group, m)| {
                    for (p, t) in t[group * per_group..][..per_group].chunks_exact(LANES).enumerate() {
                        for (l, &value) in t.iter().enumerate() {
                            m[l * cols + p] = value;
                        }
                    }
                });
            }
        }
    }

    /// Fills rows of `v` (`[C·kh·kw, cols]`) with the block's columns;
    /// zeros for padding and for the columns past `pixels`.
    /// `v` holds rows `first_row..` (a whole number of `cols`-long rows).
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        input: &[f32],
        s: &Shape,
        segments: &[Segment],
        pixels: usize,
        cols: usize,
        first_row: usize,
        v: &mut [f32],
    ) {
        let a = &self.attrs;
        let [kh, kw] = self.kernel;
        let plane = s.height * s.width;
        for (row, v) in (first_row..).zip(v.chunks_exact_mut(cols)) {
            let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let dx = (kx * a.dilation[1]) as isize - a.padding[1] as isize;
            for seg in segments {
                let out = &mut v[seg.col..seg.col + seg.x1 - seg.x0];
                let iy = (seg.y * a.stride[0] + ky * a.dilation[0]) as isize - a.padding[0] as isize;
                if iy < 0 || iy >= s.height as isize {
                    out.fill(0.0);
                    continue;
                }
                let line = &input[(seg.image * self.in_channels + c) * plane + iy as usize * s.width..][..s.width];
                // Output columns whose input column ox·sw + dx lies in 0..W.
                let sw = a.stride[1] as isize;
                let lo = ((-dx).max(0) + sw - 1) / sw;
                let hi = ((s.width as isize - dx).max(0) + sw - 1) / sw;
                let (lo, hi) = ((lo as usize).clamp(seg.x0, seg.x1), (hi as usize).clamp(seg.x0, seg.x1));
                let hi = hi.max(lo);
                out[..lo - seg.x0].fill(0.0);
                out[hi - seg.x0..].fill(0.0);
                let inside = &mut out[lo - seg.x0..hi - seg.x0];
                if inside.is_empty() {
                    continue;
                }
                // lo..hi keeps ix = ox·sw + dx within 0..W.
                let start = (lo as isize * sw + dx) as usize;
                let n = inside.len();
                if sw == 1 {
                    inside.copy_from_slice(&line[start..start + n]);
                } else if sw == 2 {
                    // Even elements of line[start..start + 2n - 1], as pairs (vectorises).
                    let (last, head) = inside.split_last_mut().expect("n >= 1");
                    for (value, pair) in head.iter_mut().zip(line[start..start + 2 * (n - 1)].chunks_exact(2)) {
                        *value = pair[0];
                    }
                    *last = line[start + 2 * (n - 1)];
                } else {
                    for (value, &x) in inside.iter_mut().zip(line[start..].iter().step_by(sw as usize)) {
                        *value = x;
                    }
                }
            }
            v[pixels..].fill(0.0);
        }
    }
}

/// Splits pixels `first..first + pixels` (numbered over the batch, row-major)
/// into runs within one output row.
fn segments(s: &Shape, first: usize, pixels: usize) -> Vec<Segment> {
    let mut segments = Vec::new();
    let (mut p, end) = (first, first + pixels);
    while p < end {
        let (image, within) = (p / (s.out_height * s.out_width), p % (s.out_height * s.out_width));
        let (y, x0) = (within / s.out_width, within % s.out_width);
        let x1 = s.out_width.min(x0 + (end - p));
        segments.push(Segment {
            image,
            y,
            x0,
            x1,
            col: p - first,
        });
        p += x1 - x0;
    }
    segments
}
