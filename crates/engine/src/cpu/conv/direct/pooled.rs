//! The direct conv with a fused max pool (ResNet's stem): each task takes a
//! run of pooled rows of one image, computes the convolution rows their
//! windows need into scratch a few at a time, and pools each pooled row
//! into the output as soon as its window's rows are there. The
//! convolution's output, 4× the pooled one (32 MB for ResNet18 at batch
//! 10), is never written to memory; the price is recomputing the one
//! convolution row that neighbouring tasks share.

use super::blocks::MIN_BLOCK_COLS;
use super::Run;
use crate::cpu::conv::ConvShape;
use crate::cpu::data::with_scratch;
use crate::cpu::epilogue;
use crate::cpu::gemm::{panel_gemm_strided, IsaBody, Strided, PANEL_GRANULE};
use crate::cpu::parallel::try_for_each;
use crate::cpu::pool_window::pool_window_row;
use candle_core::bail;
use std::ops::Range;
use wick_ir::MaxPool2dAttrs;

/// How many im2col sub-blocks' rows a sub-block takes when the conv reads
/// input phases (`phased/`): each sub-block fills its input rows anew,
/// `kh − stride` of them shared with the one before (ResNet's stem: 9 rows
/// for 2 output rows, 21 for 8); the phases are small, so the im2col
/// columns' bound does not apply. Stem + pool alone, alternating runs on
/// the Emerald Rapids Xeon: 0.90-0.95x the time at batch 10, 0.95-0.97x
/// at batch 1 (8 times as many: the same).
const PHASED_SUB_BLOCKS: usize = 4;

/// Most pooled rows per task (ResNet's stem: 33 convolution rows of 112
/// pixels × 64 channels, 0.9 MiB of scratch per thread).
const MAX_TASK_ROWS: usize = 16;

impl Run<'_> {
    /// Writes the pooled output `[N, O, pooled[0], pooled[1]]`.
    pub(super) fn pooled(&mut self, pool: &MaxPool2dAttrs, pooled: [usize; 2]) -> candle_core::Result<()> {
        let pool_rows = pooled[0];
        // Pooled rows per task ([`task_rows`]); a task's convolution rows
        // come in sub-blocks and are pooled as they come (`pooled_task`),
        // so its scratch need not fit a cache. (Sized to the L2 with every
        // row at once, ResNet18's stem on Zen 3 took 2 pooled rows per
        // task, 5 convolution rows for 4, its columns and products filling
        // the 512 KiB L2: alternating forwards, 0.91× that time at batch 1
        // and 0.92× at batch 10 as now.)
        let threads = rayon::current_num_threads();
        let rows = task_rows(self.shape.batch, pool_rows, threads);
        let chunks = pool_rows.div_ceil(rows);
        let tasks = self.shape.batch * chunks;
        self.split = tasks < 2 * threads && threads > 1;
        let this = &*self;
        let task = |t: usize| {
            let (image, first) = (t / chunks, t % chunks * rows);
            this.pooled_task(image, first..(first + rows).min(pool_rows), pool, pooled)
        };
        if self.split {
            (0..tasks).try_for_each(task)
        } else {
            try_for_each(0..tasks, task)
        }
    }

    /// Columns of a sub-block of convolution rows: whole rows, at least
    /// MIN_BLOCK_COLS columns, rounded up to the panel granule.
    fn sub_block_cols(&self) -> usize {
        let ow = self.shape.out_width.max(1);
        (MIN_BLOCK_COLS.div_ceil(ow) * ow).next_multiple_of(PANEL_GRANULE)
    }

    /// [`PoolReady`] (see there), compiled for the conv's path by
    /// [`crate::cpu::gemm::Isa::run`]: the max and the epilogue's loops
    /// vectorise for its registers (as baseline SSE, a fifth of ResNet18's
    /// fused stem in `perf` at batch 1 on Zen 3; on AVX2 with
    /// [`crate::cpu::pool`]'s register blocks, the stem 0.95x the time at
    /// batch 1 and 10, alternating forwards).
    #[inline(always)]
    fn pool_ready(&self, p: PoolReady<'_, '_>) {
        let PoolReady {
            m,
            m_cols,
            pixels,
            image,
            conv_rows: [y_lo, y, n],
            pooled_rows,
            pool,
            pooled,
            late_epilogue,
            rows: [column_max, window_max],
            ..
        } = p;
        let ([_, kw], [_, sw], [_, pw]) = (pool.kernel, pool.stride, pool.padding);
        let (oh, ow, out_channels) = (self.shape.out_height, self.shape.out_width, self.shape.out_channels);
        let (conv_plane, pooled_plane) = (oh * ow, pooled[0] * pooled[1]);
        let (conv, at) = (self.conv, (y - y_lo) * ow);
        for o in 0..out_channels {
            let channel = &mut m[o * m_cols..][..pixels];
            if !late_epilogue {
                let plane = (image * out_channels + o) * conv_plane;
                let r = self.residual.map(|r| &r[plane + y * ow..][..n * ow]);
                epilogue::in_place(
                    &mut channel[at..at + n * ow],
                    conv.epilogue.bias(o),
                    r,
                    conv.epilogue.activation(),
                );
            }
            let channel = &*channel;
            for r in pooled_rows.clone() {
                // The window's rows lie within y_lo..y + n (windows grow
                // with r) and are not empty: padding <= half the window
                // (checked in `DirectConv::new`); likewise its columns.
                let ys = window(pool, 0, oh, r);
                let window_rows = &channel[(ys.start - y_lo) * ow..(ys.end - y_lo) * ow];
                let scratch = [&mut *column_max, &mut *window_max];
                let base = (image * out_channels + o) * pooled_plane + r * pooled[1];
                // SAFETY: pooled pixels (image, o, r, ..) belong to this
                // task only (tasks split images' rows).
                let out = unsafe { self.dst.slice(base, pooled[1]) };
                let late = late_epilogue.then(|| (conv.epilogue.bias(o), conv.epilogue.activation()));
                pool_window_row(conv.isa(), window_rows, ow, [kw, sw, pw], scratch, out, late);
            }
        }
    }

    /// Pooled rows `rows` of image `image`, every channel.
    fn pooled_task(
        &self,
        image: usize,
        rows: Range<usize>,
        pool: &MaxPool2dAttrs,
        pooled: [usize; 2],
    ) -> candle_core::Result<()> {
        let (oh, ow) = (self.shape.out_height, self.shape.out_width);
        let conv = self.conv;
        let window = |r: usize| window(pool, 0, oh, r);
        let (y_lo, y_hi) = (window(rows.start).start, window(rows.end - 1).end);
        let block = self.block_of((image * oh + y_lo) * ow, (y_hi - y_lo) * ow);
        // Split (few tasks): the whole block's rows at once, each phase
        // shared by the threads. Otherwise the convolution rows come in
        // sub-blocks of about MIN_BLOCK_COLS columns, side by side in `m`
        // (its rows with room for the last sub-block's padding), and each
        // pooled row is pooled as soon as its window's rows are there,
        // while they are still in cache.
        let whole = self.split;
        // Phased products write a granule past a row's end (`phased/`).
        let room = if self.phases.is_some() { PANEL_GRANULE } else { 0 };
        let (v_cols, m_cols) = match whole {
            true => (block.cols, block.cols + room),
            false => (
                self.sub_block_cols(),
                block.pixels.next_multiple_of(PANEL_GRANULE) + PANEL_GRANULE,
            ),
        };
        let sub_rows = match whole {
            true => y_hi - y_lo,
            false if self.phases.is_some() => (v_cols / ow * PHASED_SUB_BLOCKS).min(y_hi - y_lo),
            false => v_cols / ow,
        };
        let v_len = match &self.phases {
            Some(phases) => phases.buffer_len(conv, sub_rows)?,
            None => conv.depth() * v_cols,
        };
        let m_len = conv.padded_out * m_cols;
        with_scratch(v_len + m_len + 2 * ow, |scratch| {
            let (v, rest) = scratch.split_at_mut(v_len);
            let (m, rest) = rest.split_at_mut(m_len);
            let (column_max, window_max) = rest.split_at_mut(ow);
            // The bias and activation on the pooled values only (a quarter
            // of the work) where they commute with the max, else on the
            // convolution rows before it.
            let late_epilogue = conv.epilogue.commutes_with_max(self.residual.is_some());
            let mut next_row = rows.start;
            for y in (y_lo..y_hi).step_by(sub_rows) {
                let n = sub_rows.min(y_hi - y);
                let at = (y - y_lo) * ow;
                if let Some(phases) = &self.phases {
                    let sub = self.block_of((image * oh + y) * ow, n * ow);
                    self.phased(phases, &sub, v, &mut m[at..], m_cols)?;
                } else if whole {
                    self.products(&block, v, m);
                } else {
                    let sub = self.block_of((image * oh + y) * ow, n * ow);
                    let v = &mut v[..conv.depth() * sub.cols];
                    self.im2col(&sub, 0, v);
                    let columns = Strided {
                        data: v,
                        stride: sub.cols,
                    };
                    let size = [conv.padded_out, conv.depth(), sub.cols];
                    panel_gemm_strided(conv.isa(), &conv.packed, columns, &mut m[at..], m_cols, size, None);
                }
                // The pooled rows whose windows end within the rows so far.
                let ready = (next_row..rows.end)
                    .find(|&r| window(r).end > y + n)
                    .unwrap_or(rows.end);
                let body = PoolReady {
                    run: self,
                    m: &mut *m,
                    m_cols,
                    pixels: block.pixels,
                    image,
                    conv_rows: [y_lo, y, n],
                    pooled_rows: next_row..ready,
                    pool,
                    pooled,
                    late_epilogue,
                    rows: [&mut *column_max, &mut *window_max],
                };
                conv.isa().run(body);
                next_row = ready;
            }
            Ok(())
        })?
    }
}

/// The convolution outputs (of `len`) in the window of pooled output `r`
/// along dimension `dim` (0 rows, 1 columns) of `pool`: `r·s − p .. r·s −
/// p + k`, clipped to the image.
pub(crate) fn window(pool: &MaxPool2dAttrs, dim: usize, len: usize, r: usize) -> Range<usize> {
    let (k, s, p) = (pool.kernel[dim], pool.stride[dim], pool.padding[dim]);
    (r * s).saturating_sub(p)..(r * s + k).saturating_sub(p).min(len)
}

/// An error unless `p` is a max pool a conv can run fused: non-zero
/// kernel and stride, padding at most half the window (so no window lies
/// wholly in the padding), floor mode.
pub(crate) fn check_fused_pool(p: &MaxPool2dAttrs) -> candle_core::Result<()> {
    if (0..2).any(|i| p.kernel[i] == 0 || p.stride[i] == 0 || p.padding[i] > p.kernel[i] / 2) {
        bail!("fused max pool needs non-zero kernel and stride and padding <= half the window, got {p:?}")
    }
    if p.ceil_mode {
        bail!("the fused max pool runs in floor mode (fuse-conv-max-pool leaves ceil-mode pools unfused)")
    }
    Ok(())
}

/// The output `[N, O, PH, PW]` of a conv on `shape` followed by `pool`; an
/// error when the pool's window does not fit the conv's output.
pub(crate) fn pooled_dims(pool: &MaxPool2dAttrs, shape: &ConvShape) -> candle_core::Result<[usize; 4]> {
    let Some([ph, pw]) = pool.output_size([shape.out_height, shape.out_width]) else {
        bail!(
            "pool window {:?} does not fit the conv output {:?}",
            pool.kernel,
            shape.out_dims()
        )
    };
    Ok([shape.batch, shape.out_channels, ph, pw])
}

/// Pooled rows per task for `batch` images of `pool_rows` pooled rows on
/// `threads`: up to [`MAX_TASK_ROWS`] while there are at least four tasks
/// per thread, and at least two (one per task computes 3 convolution rows
/// per pooled row, 1.5× the 2 it needs: on many threads). A task
/// recomputes the one convolution row it shares with the next.
pub(crate) fn task_rows(batch: usize, pool_rows: usize, threads: usize) -> usize {
    let tasks = |rows: usize| batch * pool_rows.div_ceil(rows);
    let mut rows = pool_rows.min(2);
    while rows < pool_rows.min(MAX_TASK_ROWS) && tasks(rows + 1) >= 4 * threads {
        rows += 1;
    }
    rows
}

/// The pooling of one task's convolution rows so far: the epilogue on the
/// new rows (`conv_rows`: the task's first row, the first new row, how
/// many), unless it comes after the max (`late_epilogue`), then the pooled
/// rows `pooled_rows` of image `image` from `m` (`[O_pad, m_cols]`, the
/// task's `pixels` side by side), through the row scratch `rows` (column
/// max, window max) into the output.
struct PoolReady<'a, 'r> {
    run: &'a Run<'r>,
    m: &'a mut [f32],
    m_cols: usize,
    pixels: usize,
    image: usize,
    conv_rows: [usize; 3],
    pooled_rows: Range<usize>,
    pool: &'a MaxPool2dAttrs,
    pooled: [usize; 2],
    late_epilogue: bool,
    rows: [&'a mut [f32]; 2],
}

impl IsaBody for PoolReady<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.pool_ready(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::conv::direct::DirectConv;
    use crate::cpu::conv::tests::{resnet_pool, resnet_stem_conv};
    use crate::cpu::gemm::Isa;
    use crate::cpu::gemm::Layout::Panels;
    use crate::cpu::pool::max_pool2d;
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

    proptest! {
           #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

           /// The fused conv + max pool equals the conv followed by the engine's
           /// max pool (same products, same maxima; within an ulp or a few of
           /// the activation, whose vector and scalar forms differ by that), on every SIMD
           /// path: kernels 1..=7, stride 1..=2, conv and pool padding, pool
           /// windows 1..=3 with stride 1..=2, residual on or off, no
           /// activation or any (applied after the max only when monotonic),
           /// odd sizes, several images and row chunks.
           #[test]
           fn equals_conv_then_pool(
               batch in 1usize..3, channels in 1usize..5, outputs in 1usize..11, kernel in 1usize..8,
               stride in 1usize..3, conv_pad in 0usize..3, extra in [0usize..12, 0usize..12],
               pool_kernel in 1usize..4, pool_stride in 1usize..3, pool_pad_flag in any::<bool>(),
               activation in proptest::option::of(0usize..6), with_residual in any::<bool>(),
           ) {
               let d = Device::Cpu;
               // Large enough that the conv output holds a pool window even unpadded.
               let size = [kernel + stride * pool_kernel + extra[0], kernel + stride * pool_kernel + extra[1]];
               let attrs = Conv2dAttrs { stride: [stride; 2], padding: [conv_pad; 2], ..Default::default() };
               let pool = MaxPool2dAttrs {
    ceil_mode: false,
                   kernel: [pool_kernel; 2],
                   stride: [pool_stride; 2],
                   padding: [usize::from(pool_pad_flag) * pool_kernel / 2; 2],
               };
               let x = Tensor::randn(0f32, 1.0, (batch, channels, size[0], size[1]), &d).unwrap();
               let w = Tensor::randn(0f32, 1.0, (outputs, channels, kernel, kernel), &d).unwrap();
               let b = Tensor::randn(0f32, 1.0, outputs, &d).unwrap();
               for isa in Isa::available() {
                   let activation = activation.map(|i| wick_ir::Activation::ALL[i]);
                   let plain = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Panels, isa).unwrap();
                   let conv_shape = plain.run(&x, None).unwrap().dims().to_vec();
                   let r = with_residual.then(|| Tensor::randn(0f32, 1.0, conv_shape.as_slice(), &d).unwrap());
                   let want = max_pool2d(Isa::Scalar, &plain.run(&x, r.as_ref()).unwrap(), &pool).unwrap();
                   let fused = DirectConv::for_test(&w, Some(&b), attrs, activation, Some(pool), Panels, isa).unwrap();
                   let got = fused.run(&x, r.as_ref()).unwrap();
                   prop_assert_eq!(got.dims(), want.dims());
                   let diff = crate::test_util::max_abs_diff(&got, &want);
                   prop_assert!(diff <= crate::test_util::ulps_of(&want, 8), "{:?}: {}", isa, diff);
               }
           }
       }

    /// The fused conv + pool's output and the conv's then the engine's
    /// pool; `conv` makes the conv with or without the fused pool.
    fn fused_and_plain(
        conv: impl Fn(Option<MaxPool2dAttrs>) -> DirectConv,
        pool: MaxPool2dAttrs,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let want = max_pool2d(Isa::Scalar, &conv(None).run(x, residual).unwrap(), &pool).unwrap();
        (conv(Some(pool)).run(x, residual).unwrap(), want)
    }

    /// ResNet's stem at 224×224: several row chunks per image (the
    /// recomputed boundary rows included), exactly as conv then pool.
    #[test]
    fn resnet_stem_in_row_chunks() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &d).unwrap();
        let (w, b, attrs) = resnet_stem_conv();
        let pool = resnet_pool();
        let relu = Some(wick_ir::Activation::Relu);
        let conv = |pool| DirectConv::for_test(&w, Some(&b), attrs, relu, pool, Panels, Isa::detect()).unwrap();
        let (got, want) = fused_and_plain(conv, pool, &x, None);
        assert_eq!(got.dims(), [2, 64, 56, 56]);
        assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
    }

    /// Tasks of many convolution rows, computed and pooled a sub-block at a
    /// time, with a residual and an activation that does not commute with
    /// the max (so the epilogue runs on each sub-block's rows, each with
    /// its own rows of the residual): exactly as conv then pool, on every
    /// path. Two threads, as on the machines measured, so the tasks run
    /// unsplit whatever this machine has.
    #[test]
    fn sub_blocks_with_residual() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 96, 90), &d).unwrap();
        let w = Tensor::randn(0f32, 0.3, (16, 3, 3, 3), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 16, &d).unwrap();
        let attrs = Conv2dAttrs {
            padding: [1, 1],
            ..Default::default()
        };
        let pool = resnet_pool();
        let residual = Tensor::randn(0f32, 1.0, (2, 16, 96, 90), &d).unwrap();
        let hardswish = Some(wick_ir::Activation::HardSwish);
        let threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in Isa::available() {
            let conv = |pool| DirectConv::for_test(&w, Some(&b), attrs, hardswish, pool, Panels, isa).unwrap();
            let (got, want) = threads.install(|| fused_and_plain(conv, pool, &x, Some(&residual)));
            assert_eq!(got.dims(), [2, 16, 48, 45]);
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(diff <= crate::test_util::ulps_of(&want, 8), "{isa:?}: {diff}");
        }
    }

    #[test]
    fn rejects_bad_pools() {
        let d = Device::Cpu;
        let w = Tensor::zeros((2, 1, 3, 3), candle_core::DType::F32, &d).unwrap();
        let too_much_padding = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [2, 2],
        };
        assert!(DirectConv::for_test(
            &w,
            None,
            Conv2dAttrs::default(),
            None,
            Some(too_much_padding),
            Panels,
            Isa::Scalar
        )
        .is_err());
        let big = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [9, 9],
            stride: [1, 1],
            padding: [0, 0],
        };
        let conv =
            DirectConv::for_test(&w, None, Conv2dAttrs::default(), None, Some(big), Panels, Isa::Scalar).unwrap();
        let x = Tensor::zeros((1, 1, 6, 6), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, None).is_err(), "a 9x9 window on a 4x4 conv output");
    }
}
