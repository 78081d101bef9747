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
//! in registers ([`plain_window_max`]), without the column maxima's
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
use crate::cpu::pool::nan_max;
use crate::cpu::prefetch;
use crate::cpu::transpose::columns_to_rows8;
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use rayon::prelude::*;
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
            (0..shape.batch * chunks).into_par_iter().try_for_each(|t| {
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

    /// [`PoolRow`]'s body.
    #[inline(always)]
    fn pool_row(&self, p: PoolRow<'_, '_>) {
        let PoolRow {
            image,
            r,
            ring_rows,
            scratch: [column_max, pooled_row],
            late,
            plain,
            ..
        } = p;
        let (conv, s) = (self.conv, &self.shape);
        let (pool, po, ow) = (&conv.pool, conv.padded_out(), s.out_width);
        let row_len = ow * po;
        let ring = pool.kernel[0];
        let ys = window(pool, 0, s.out_height, r);
        // Non-empty windows: padding <= half the window (`check_fused_pool`).
        let ring_row = |y: usize| &ring_rows[y % ring * row_len..][..row_len];
        let pw = self.pooled[1];
        let (biases, activation) = (conv.epilogue.biases(0..s.out_channels), conv.epilogue.activation());
        if plain {
            let mut rows = [&ring_rows[..0]; PLAIN_MAX];
            for (row, y) in rows.iter_mut().zip(ys.clone()) {
                *row = ring_row(y);
            }
            let rows = &rows[..ys.len()];
            for px in 0..pw {
                let xs = window(pool, 1, ow, px);
                let out = &mut pooled_row[px * po..][..po];
                match po / MAX_LANES {
                    1 => plain_window_max::<1>(rows, xs, out),
                    2 => plain_window_max::<2>(rows, xs, out),
                    3 => plain_window_max::<3>(rows, xs, out),
                    _ => plain_window_max::<4>(rows, xs, out),
                }
                // `plain` implies the epilogue comes after the max.
                epilogue::in_place_channels(out, biases, activation);
            }
            return self.store_pooled_row(image, r, pooled_row);
        }
        match ys.len() {
            1 => column_max.copy_from_slice(ring_row(ys.start)),
            _ => {
                for ((m, &a), &b) in column_max
                    .iter_mut()
                    .zip(ring_row(ys.start))
                    .zip(ring_row(ys.start + 1))
                {
                    *m = nan_max(a, b);
                }
            }
        }
        for y in ys.start + 2..ys.end {
            for (m, &v) in column_max.iter_mut().zip(ring_row(y)) {
                *m = nan_max(*m, v);
            }
        }
        for px in 0..pw {
            let xs = window(pool, 1, ow, px);
            let out = &mut pooled_row[px * po..][..po];
            out.copy_from_slice(&column_max[xs.start * po..][..po]);
            for x in xs.start + 1..xs.end {
                for (m, &v) in out.iter_mut().zip(&column_max[x * po..][..po]) {
                    *m = nan_max(*m, v);
                }
            }
            if late {
                epilogue::in_place_channels(out, biases, activation);
            }
        }
        self.store_pooled_row(image, r, pooled_row);
    }

    /// Pooled row `r` of image `image` (`pooled_row`, `[PW][O_pad]`) into
    /// the output's NCHW planes.
    #[inline(always)]
    fn store_pooled_row(&self, image: usize, r: usize, pooled_row: &[f32]) {
        let (conv, s) = (self.conv, &self.shape);
        let (po, pw) = (conv.padded_out(), self.pooled[1]);
        // SAFETY: pooled row r of image `image` belongs to this task only
        // (tasks split images' rows); each channel's row is taken once.
        let out_row = |o: usize| unsafe {
            self.dst
                .slice(((image * s.out_channels + o) * self.pooled[0] + r) * pw, pw)
        };
        let mut o = 0;
        while o + 8 <= s.out_channels {
            columns_to_rows8(conv.isa, pooled_row, po, o, std::array::from_fn(|k| out_row(o + k)));
            o += 8;
        }
        for o in o..s.out_channels {
            for (px, out) in out_row(o).iter_mut().enumerate() {
                *out = pooled_row[px * po + o];
            }
        }
    }
}

/// Channels in one vector of the plain max: a multiple of every path's
/// vector, and a divisor of every block ([`block`]).
const MAX_LANES: usize = 16;

/// Most rows and most vectors of [`MAX_LANES`] channels (the padded
/// channels over [`MAX_LANES`]) the plain max takes: ResNet's 3-row pool
/// on 64 channels, on every path.
const PLAIN_MAX: usize = 4;

/// `out[c] = max(row[x·C + c])` over `rows` and the columns `xs` (`C` =
/// `N·`[`MAX_LANES`] = `out.len()` channels), with `a > b ? a : b` (one
/// `maxps`), which equals [`nan_max`] where no operand is NaN: for
/// finite rows ([`plain_bound`]). The window's `N` vectors stay in registers
/// across its values, each read once in order (the columns of a window
/// are contiguous).
#[inline(always)]
fn plain_window_max<const N: usize>(rows: &[&[f32]], xs: Range<usize>, out: &mut [f32]) {
    let width = N * MAX_LANES;
    let mut m = [[f32::NEG_INFINITY; MAX_LANES]; N];
    for row in rows {
        for column in row[xs.start * width..xs.end * width].chunks_exact(width) {
            for (m, v) in m.iter_mut().zip(column.chunks_exact(MAX_LANES)) {
                for (m, &v) in m.iter_mut().zip(v) {
                    *m = if *m > v { *m } else { v };
                }
            }
        }
    }
    for (out, m) in out.chunks_exact_mut(MAX_LANES).zip(&m) {
        out.copy_from_slice(m);
    }
}

/// Whether every value's magnitude is at most `bound` (false for a NaN);
/// compiled for the conv's path by [`Isa::run`].
struct Bounded<'a> {
    values: &'a [f32],
    bound: f32,
}

impl IsaBody for Bounded<'_> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        let bound = self.bound;
        // No early exit, so the comparisons vectorise.
        self.values.iter().fold(true, |ok, v| ok & (v.abs() <= bound))
    }
}

/// The largest input magnitude for which a conv of `depth` with these
/// weights cannot overflow: `f32::MAX / (2 · depth · max |w|)`, at most
/// `f32::MAX` (so an infinite input is not bounded); `None` where a
/// weight is not finite. Every partial sum is then at most half
/// `f32::MAX` in magnitude, so the convolution's values (before the bias,
/// which a max-commuting epilogue adds after the pool) are finite: never
/// NaN, where the plain max equals [`nan_max`].
fn plain_bound(weights: &[f32], depth: usize) -> Option<f32> {
    let mut largest = 0f64;
    for &w in weights {
        if !w.is_finite() {
            return None;
        }
        largest = largest.max(f64::from(w.abs()));
    }
    // All weights zero: an infinite quotient, capped at f32::MAX.
    let bound = f64::from(f32::MAX) / (2.0 * depth.max(1) as f64 * largest);
    Some(bound.min(f64::from(f32::MAX)) as f32)
}

/// Pooled row `r` of image `image` from the convolution rows in
/// `ring_rows` (row `y` in slot `y % pool height`), through `scratch`
/// (the column maxima, `[OW][O_pad]`, and the pooled row, `[PW][O_pad]`),
/// into the output, with the epilogue when `late`; compiled for the
/// conv's path by [`Isa::run`] (the maxima vectorise across the channels).
struct PoolRow<'a, 'r> {
    run: &'a Run<'r>,
    image: usize,
    r: usize,
    ring_rows: &'a [f32],
    scratch: [&'a mut [f32]; 2],
    late: bool,
    /// The task's convolution rows are finite ([`plain_bound`]) and the
    /// conv's shape fits ([`StemConv::plain_shape`]): the maxima take
    /// [`plain_window_max`].
    plain: bool,
}

impl IsaBody for PoolRow<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.pool_row(self)
    }
}

#[cfg(test)]
mod tests;
