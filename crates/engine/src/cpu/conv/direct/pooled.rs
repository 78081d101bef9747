//! The direct conv with a fused max pool (ResNet's stem): each task takes a
//! few pooled rows of one image, computes the convolution rows their
//! windows need into scratch (the epilogue applied there), and pools them
//! into the output. The convolution's output, 4× the pooled one (32 MB for
//! ResNet18 at batch 10), is never written to memory; the price is
//! recomputing the one convolution row that neighbouring tasks share.

use super::Run;
use crate::cpu::data::with_scratch;
use crate::cpu::epilogue;
use crate::cpu::pool::{max_rows, pool_row};
use rayon::prelude::*;
use std::ops::Range;
use wick_ir::MaxPool2dAttrs;

impl Run<'_> {
    /// Writes the pooled output `[N, O, pooled[0], pooled[1]]`.
    pub(super) fn pooled(&mut self, pool: &MaxPool2dAttrs, pooled: [usize; 2]) -> candle_core::Result<()> {
        let (pool_rows, [sh, kh]) = (pooled[0], [pool.stride[0], pool.kernel[0]]);
        // Pooled rows per task: the convolution rows they need fit the block budget.
        let per_conv_row = self.shape.out_width * (self.conv.depth() + self.conv.padded_out) * 4;
        let conv_rows = |rows: usize| (rows - 1) * sh + kh;
        let mut rows = 1;
        while rows < pool_rows && conv_rows(rows + 1) * per_conv_row <= self.conv.block_bytes {
            rows += 1;
        }
        let chunks = pool_rows.div_ceil(rows);
        let tasks = self.shape.batch * chunks;
        let threads = rayon::current_num_threads();
        self.split = tasks < 2 * threads && threads > 1;
        let this = &*self;
        let task = |t: usize| {
            let (image, first) = (t / chunks, t % chunks * rows);
            this.pooled_task(image, first..(first + rows).min(pool_rows), pool, pooled)
        };
        if self.split {
            (0..tasks).try_for_each(task)
        } else {
            (0..tasks).into_par_iter().try_for_each(task)
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
        let ([kh, kw], [sh, sw], [ph, pw]) = (pool.kernel, pool.stride, pool.padding);
        let (oh, ow, out_channels) = (self.shape.out_height, self.shape.out_width, self.shape.out_channels);
        let conv = self.conv;
        // Window rows of pooled row r: r·sh − ph .. r·sh − ph + kh, clipped to the image.
        let window = |r: usize| (r * sh).saturating_sub(ph)..(r * sh + kh).saturating_sub(ph).min(oh);
        let (y_lo, y_hi) = (window(rows.start).start, window(rows.end - 1).end);
        let block = self.block_of((image * oh + y_lo) * ow, (y_hi - y_lo) * ow);
        let (v_len, m_len) = (conv.depth() * block.cols, conv.products_len(block.cols));
        with_scratch(v_len + m_len + 2 * ow + pooled[1], |scratch| {
            let (v, rest) = scratch.split_at_mut(v_len);
            let (m, rest) = rest.split_at_mut(m_len);
            let (column_max, rest) = rest.split_at_mut(ow);
            let (window_max, pooled_row) = rest.split_at_mut(ow);
            self.products(&block, v, m);
            let (conv_plane, pooled_plane) = (oh * ow, pooled[0] * pooled[1]);
            for o in 0..out_channels {
                let conv_rows = &mut m[o * block.cols..][..block.pixels];
                // Without a residual, the bias and a monotonic activation
                // commute with the max (and so does f32 rounding of `x + b`):
                // they are applied to the pooled values only, a quarter of
                // the work. Otherwise before the max.
                let monotonic = conv.epilogue.activation().is_none_or(|a| a.is_monotonic());
                let late_epilogue = self.residual.is_none() && monotonic;
                if !late_epilogue {
                    let r = self
                        .residual
                        .map(|r| &r[(image * out_channels + o) * conv_plane + y_lo * ow..][..block.pixels]);
                    conv.epilogue.in_place(o, conv_rows, r);
                }
                let conv_rows = &*conv_rows;
                for r in rows.clone() {
                    // The window's rows lie within y_lo..y_hi (windows grow
                    // with r) and are not empty: padding <= half the window
                    // (checked in `DirectConv::new`); likewise its columns.
                    let ys = window(r);
                    max_rows(&conv_rows[(ys.start - y_lo) * ow..(ys.end - y_lo) * ow], ow, column_max);
                    pool_row(column_max, [kw, sw, pw], window_max, pooled_row);
                    if late_epilogue {
                        epilogue::in_place(pooled_row, conv.epilogue.bias(o), None, conv.epilogue.activation());
                    }
                    let base = (image * out_channels + o) * pooled_plane + r * pooled[1];
                    // SAFETY: pooled pixels (image, o, r, ..) belong to this
                    // task only (tasks split images' rows).
                    unsafe { self.dst.slice(base, pooled[1]) }.copy_from_slice(pooled_row);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::conv::direct::DirectConv;
    use crate::cpu::gemm::Isa;
    use crate::cpu::gemm::Layout::Panels;
    use crate::cpu::pool::max_pool2d;
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

    proptest! {
           #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

           /// The fused conv + max pool equals the conv followed by the engine's
           /// max pool exactly (same products, same maxima), on every SIMD
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
                   let want = max_pool2d(&plain.run(&x, r.as_ref()).unwrap(), &pool).unwrap();
                   let fused = DirectConv::for_test(&w, Some(&b), attrs, activation, Some(pool), Panels, isa).unwrap();
                   let got = fused.run(&x, r.as_ref()).unwrap();
                   prop_assert_eq!(got.dims(), want.dims());
                   prop_assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0, "{:?}", isa);
               }
           }
       }

    /// ResNet's stem at 224×224: several row chunks per image (the
    /// recomputed boundary rows included), exactly as conv then pool.
    #[test]
    fn resnet_stem_in_row_chunks() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &d).unwrap();
        let w = Tensor::randn(0f32, 0.1, (64, 3, 7, 7), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 64, &d).unwrap();
        let attrs = Conv2dAttrs {
            stride: [2, 2],
            padding: [3, 3],
            ..Default::default()
        };
        let pool = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        };
        let relu = Some(wick_ir::Activation::Relu);
        let plain = DirectConv::for_test(&w, Some(&b), attrs, relu, None, Panels, Isa::detect()).unwrap();
        let want = max_pool2d(&plain.run(&x, None).unwrap(), &pool).unwrap();
        let fused = DirectConv::for_test(&w, Some(&b), attrs, relu, Some(pool), Panels, Isa::detect()).unwrap();
        let got = fused.run(&x, None).unwrap();
        assert_eq!(got.dims(), [2, 64, 56, 56]);
        assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
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
