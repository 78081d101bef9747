//! A conv of few input channels with a fused max pool (ResNet's stem: 3 →
//! 64 channels, 7×7 stride 2, then a 3×3 stride-2 pool), output channels
//! on the vector lanes: each task zero-pads the input rows its convolution
//! rows read, computes those rows one at a time as `[pixels][channels]`
//! ([`stem_tile`](super::stem_tile): each input value broadcast against a block of weight
//! vectors, read in place at the conv's column stride), and pools each
//! pooled row across whole channel vectors as soon as its window's rows
//! are there; only the pooled row is turned back into the output's NCHW
//! planes, with the epilogue.
//!
//! The panel layout's stem (`direct/pooled.rs`) puts pixels on the lanes
//! and broadcasts weights: with three input channels its depth is 147, its
//! pixels come from the input's column phases, and its gathered 8 × 48
//! tile ran at ~60% of the FMA peak. Here the tile broadcasts the input
//! and loads aligned weight vectors, 10 loads for 24 FMAs on AVX-512 (78%
//! of the stem's samples in `perf`, the pooling 11%, the padded copy and
//! the transposes ~5%). ResNet's stem + pool alone, 2 threads, ABBA, on
//! the Intel Xeon VM: batch 1 0.94× the panel layout's time on AVX-512
//! (0.825 against 0.875 ms) and 0.91× on AVX2 (1.215 against 1.335);
//! batch 10 0.97× (8.8 against 9.1 ms); in ResNet18 per node, batch 1
//! 0.96× and 0.95×, batch 10 1.01× and 0.92×. Tasks share the
//! convolution row between their pooled rows, so each computes it (at
//! batch 1, 7 of 119 rows); fewer, larger tasks ran slower (two a thread:
//! 1.1×).
//!
//! The pool's maxima propagate NaN as PyTorch's do ([`nan_max`]: two
//! compares and a blend a vector, both compares on one port on Intel),
//! but a task whose input and weights are bounded so that no partial sum
//! can overflow ([`plain_bound`], checked on its zero-padded input rows)
//! has only finite convolution values, where one `maxps` gives
//! the same max: it pools each window straight from the convolution rows
//! in registers ([`plain_window_max`](pool::plain_window_max)), without the column maxima's
//! stores. ResNet's stem + pool in ResNet18 per node, alternating
//! profiles on the Intel Xeon VM (Emerald Rapids, 2 threads): batch 1
//! 0.913-0.975 against 0.967-1.000 ms (AVX2 forced 1.70-1.76 against
//! 1.76-1.88), batch 10 8.93-8.97 against 9.45-9.67 ms; a build that
//! skipped the maxima altogether (wrong values) took 0.90-0.93 ms.
//!
//! Each pooled row's output lines are asked for ahead of their stores
//! (`prefetchw`, [`prefetch::write_line`]: 64 channels' runs of 56 values,
//! short streams the hardware prefetchers do not follow): the stem in
//! ResNet18 per node 0.955× the time at batch 1 (AVX2 0.98×) and 0.91× at
//! batch 10. Prefetching the task's input rows before the padded copy
//! was level (1.01×).

use super::direct::{check_fused_pool, pool_window as window, pooled_dims, task_rows};
use super::stem_tile::{block, stem_row, Window};
use super::{output, ConvShape, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::{self, Epilogue};
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::output::Output;
use crate::cpu::parallel::try_for_each;
use crate::cpu::pool::nan_max;
use crate::cpu::prefetch;
use crate::cpu::transpose::columns_to_rows8;
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use pool::{plain_bound, Bounded, PoolRow, MAX_LANES, PLAIN_MAX};
use std::ops::Range;
use wick_ir::MaxPool2dAttrs;

/// Most input channels the stem conv takes: any count computes, but
/// only 3 (RGB) were measured; deeper pooled convs stay on the direct
/// conv.
pub(crate) const MAX_CHANNELS: usize = 4;

/// A conv with few input channels and a fused max pool, its weights packed
/// in blocks of output channels for the path's tile.
#[derive(Debug)]
pub(crate) struct StemConv {
    spec: ConvSpec,
    /// `[block][C·kh·kw][block]` (blocks of [`block`] output channels for
    /// the path), zeros past the output channels.
    packed: WeightBuffer,
    epilogue: Epilogue,
    pool: MaxPool2dAttrs,
    isa: Isa,
    /// Inputs of at most this magnitude give finite convolution rows
    /// ([`plain_bound`]); `None` where a weight is not finite.
    plain_bound: Option<f32>,
}

impl StemConv {
    /// Whether `spec` with a fused pool runs here: one group, at most
    /// [`MAX_CHANNELS`] input channels, no dilation, a column stride of 1
    /// or 2.
    pub(crate) fn applies(spec: &ConvSpec) -> bool {
        let a = &spec.attrs;
        a.groups == 1
            && (1..=MAX_CHANNELS).contains(&spec.in_channels)
            && a.dilation == [1, 1]
            && (1..=2).contains(&a.stride[1])
            && spec.kernel[0] > 0
            && spec.kernel[1] > 0
    }

    /// Packs `weight` (`[O, C, kh, kw]`, f32) for `machine`'s path; an
    /// error unless [`Self::applies`] and `pool` is a valid fused pool.
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        pool: MaxPool2dAttrs,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        check_fused_pool(&pool)?;
        if !Self::applies(&spec) {
            bail!("the stem conv takes one group of 1 to {MAX_CHANNELS} input channels, no dilation and a column stride of 1 or 2, got {spec:?}")
        }
        let depth = spec.in_channels * spec.kernel[0] * spec.kernel[1];
        let plain = weight.flatten_all()?.to_vec1::<f32>()?;
        if plain.len() != spec.out_channels * depth {
            bail!(
                "stem conv weight {:?} does not match {} x {depth}",
                weight.dims(),
                spec.out_channels
            )
        }
        let block = block(machine.isa);
        let padded = spec.out_channels.div_ceil(block) * block;
        let mut packed = WeightBuffer::zeroed(padded * depth, "packed weights")?;
        for (o, row) in plain.chunks_exact(depth).enumerate() {
            for (d, &value) in row.iter().enumerate() {
                packed[(o / block * depth + d) * block + o % block] = value;
            }
        }
        Ok(Self {
            spec,
            plain_bound: plain_bound(&plain, depth),
            packed,
            epilogue,
            pool,
            isa: machine.isa,
        })
    }

    /// Output channels rounded up to whole blocks.
    fn padded_out(&self) -> usize {
        self.spec.out_channels.div_ceil(block(self.isa)) * block(self.isa)
    }

    /// Whether the plain max fits the conv's shape: padded channels in 1
    /// to [`PLAIN_MAX`] whole vectors of [`MAX_LANES`], pool windows at
    /// most [`PLAIN_MAX`] rows.
    fn plain_shape(&self) -> bool {
        let po = self.padded_out();
        po.is_multiple_of(MAX_LANES) && (1..=PLAIN_MAX).contains(&(po / MAX_LANES)) && self.pool.kernel[0] <= PLAIN_MAX
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`: the conv, `residual` (the
    /// conv's output shape) added before the activation, then the pool.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let dims = pooled_dims(&self.pool, &shape)?;
        let pooled = [dims[2], dims[3]];
        let out_len: usize = dims.iter().product();
        if out_len == 0 {
            return output(Vec::new(), dims);
        }
        let mut out = Output::new(out_len, "conv output")?;
        let dst = out.shared(out_len);
        with_cpu_f32("stem conv", &call.x, call.residual.as_ref(), |input, residual| {
            let run = Run {
                conv: self,
                input,
                residual,
                dst,
                shape,
                pooled,
            };
            // Pooled rows per task as the direct conv's pooled tasks take them.
            let rows = task_rows(shape.batch, pooled[0], rayon::current_num_threads());
            let chunks = pooled[0].div_ceil(rows);
            try_for_each(0..shape.batch * chunks, |t| {
                let (image, first) = (t / chunks, t % chunks * rows);
                run.task(image, first..(first + rows).min(pooled[0]))
            })
        })?;
        // SAFETY: the tasks cover every image's pooled rows, and each writes
        // every channel of its rows.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&dims)
    }
}

/// One forward's context.
struct Run<'a> {
    conv: &'a StemConv,
    input: &'a [f32],
    residual: Option<&'a [f32]>,
    dst: SharedOut,
    shape: ConvShape,
    pooled: [usize; 2],
}

impl Run<'_> {
    /// Pooled rows `rows` of image `image`, every channel.
    fn task(&self, image: usize, rows: Range<usize>) -> candle_core::Result<()> {
        let (conv, s) = (self.conv, &self.shape);
        let (a, [kh, kw]) = (&conv.spec.attrs, conv.spec.kernel);
        let (oh, ow) = (s.out_height, s.out_width);
        let pool = &conv.pool;
        let (y_lo, y_hi) = (
            window(pool, 0, oh, rows.start).start,
            window(pool, 0, oh, rows.end - 1).end,
        );
        // The zero-padded input rows and columns the task's conv rows read.
        // Saturated: past the scratch cap, `with_scratch` refuses them.
        let in_rows = (y_hi - y_lo - 1).saturating_mul(a.stride[0]).saturating_add(kh);
        let in_cols = (ow - 1).saturating_mul(a.stride[1]).saturating_add(kw);
        let padded_out = conv.padded_out();
        let ring = pool.kernel[0];
        let padded_len = s.channels.saturating_mul(in_rows).saturating_mul(in_cols);
        let row_len = ow.saturating_mul(padded_out);
        let len = padded_len
            .saturating_add(ring.saturating_mul(row_len))
            .saturating_add(row_len)
            .saturating_add(self.pooled[1].saturating_mul(padded_out));
        with_scratch(len, |scratch| {
            let (padded, rest) = scratch.split_at_mut(padded_len);
            let (ring_rows, rest) = rest.split_at_mut(ring * row_len);
            let (column_max, pooled_row) = rest.split_at_mut(row_len);
            self.pad_rows(image, y_lo, [in_rows, in_cols], padded);
            let taps = Window {
                channels: s.channels,
                plane: in_rows * in_cols,
                cols: in_cols,
                kernel: [kh, kw],
                step: a.stride[1],
            };
            // The bias and activation on the pooled values where they
            // commute with the max, else on each convolution row before it.
            let late = conv.epilogue.commutes_with_max(self.residual.is_some());
            // The plain max where the convolution rows are all finite:
            // bounded input and weights, no epilogue before the max.
            let plain = late
                && conv.plain_shape()
                && conv.plain_bound.is_some_and(|bound| {
                    conv.isa.run(Bounded {
                        values: &padded[..],
                        bound,
                    })
                });
            let mut next = rows.start;
            let mut claimed = rows.start;
            for y in y_lo..y_hi {
                // The next pooled row's output lines asked for ahead of its
                // stores (each channel's run is its own short stream).
                if claimed == next && claimed < rows.end {
                    self.claim_output(image, claimed);
                    claimed += 1;
                }
                let row = &mut ring_rows[y % ring * row_len..][..row_len];
                self.conv_row(&padded[(y - y_lo) * a.stride[0] * in_cols..], taps, row);
                if !late {
                    self.row_epilogue(image, y, row);
                }
                while next < rows.end && window(pool, 0, oh, next).end <= y + 1 {
                    conv.isa.run(PoolRow {
                        run: self,
                        image,
                        r: next,
                        ring_rows: &*ring_rows,
                        scratch: [&mut *column_max, &mut *pooled_row],
                        late,
                        plain,
                    });
                    next += 1;
                }
            }
        })
    }

    /// Asks for the cache lines of pooled row `r` of image `image`, every
    /// channel, ahead of its stores ([`prefetch::write_line`]).
    fn claim_output(&self, image: usize, r: usize) {
        let on = prefetch::available();
        if !on {
            return;
        }
        let (s, pw) = (&self.shape, self.pooled[1]);
        for o in 0..s.out_channels {
            let base = ((image * s.out_channels + o) * self.pooled[0] + r) * pw;
            for x in (0..pw).step_by(16).chain([pw - 1]) {
                prefetch::write_line(on, self.dst.ptr_at(base + x));
            }
        }
    }

    /// The zero-padded input of image `image` (`[C][rows][cols]`, `size`)
    /// that convolution rows from `y_lo` read: input row `y_lo·sh − ph + i`,
    /// column `j − pw`.
    fn pad_rows(&self, image: usize, y_lo: usize, [rows, cols]: [usize; 2], padded: &mut [f32]) {
        let (s, a) = (&self.shape, &self.conv.spec.attrs);
        let (lo, hi) = (a.padding[1].min(cols), a.padding[1].saturating_add(s.width).min(cols));
        for c in 0..s.channels {
            for i in 0..rows {
                let dst = &mut padded[(c * rows + i) * cols..][..cols];
                let iy = (y_lo * a.stride[0] + i)
                    .checked_sub(a.padding[0])
                    .filter(|&iy| iy < s.height);
                let Some(iy) = iy else {
                    dst.fill(0.0);
                    continue;
                };
                let line = &self.input[((image * s.channels + c) * s.height + iy) * s.width..][..s.width];
                dst[..lo].fill(0.0);
                dst[lo..hi.max(lo)].copy_from_slice(&line[..hi.saturating_sub(lo)]);
                dst[hi.max(lo)..].fill(0.0);
            }
        }
    }

    /// One convolution row into `row` (`[OW][O_pad]`) from its padded
    /// input rows `data`, a block of channels at a time.
    fn conv_row(&self, data: &[f32], window: Window, row: &mut [f32]) {
        let conv = self.conv;
        let (ow, padded_out, block) = (self.shape.out_width, conv.padded_out(), block(conv.isa));
        let depth = window.depth();
        for b in 0..padded_out / block {
            let w = &conv.packed[b * depth * block..][..depth * block];
            stem_row(conv.isa, w, data, window, ow, &mut row[b * block..], padded_out);
        }
    }

    /// The epilogue on convolution row `y` of image `image` (`[OW][O_pad]`)
    /// before the max: with a residual, or an activation that does not
    /// commute with it.
    fn row_epilogue(&self, image: usize, y: usize, row: &mut [f32]) {
        let (conv, s) = (self.conv, &self.shape);
        let padded_out = conv.padded_out();
        for o in 0..s.out_channels {
            let plane = ((image * s.out_channels + o) * s.out_height + y) * s.out_width;
            let (bias, activation) = (conv.epilogue.bias(o), conv.epilogue.activation());
            for x in 0..s.out_width {
                let v = &mut row[x * padded_out + o];
                *v = epilogue::value(*v, bias, self.residual.map(|r| r[plane + x]), activation);
            }
        }
    }
}

mod pool;

#[cfg(test)]
mod tests;
