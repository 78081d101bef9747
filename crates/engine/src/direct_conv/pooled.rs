//! The direct conv with a fused max pool (ResNet's stem): each task takes a
//! few pooled rows of one image, computes the convolution rows their
//! windows need into scratch (bias, residual and ReLU applied there), and
//! pools them into the output. The convolution's output, 4× the pooled one
//! (32 MB for ResNet18 at batch 10), is never written to memory; the price
//! is recomputing the one convolution row that neighbouring tasks share.

use super::{segments, DirectConv, Shape, BLOCK_BYTES};
use crate::cpu_pool::{nan_max, pool_row};
use crate::cpu_shared::{with_scratch, SharedOut};
use crate::gemm_kernel::PANEL_GRANULE;
use rayon::prelude::*;
use std::ops::Range;
use wick_ir::MaxPool2dAttrs;

impl DirectConv {
    /// Writes the pooled output `[N, O, pooled[0], pooled[1]]` through `dst`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pooled(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        batch: usize,
        pool: &MaxPool2dAttrs,
        pooled: [usize; 2],
    ) {
        let (pool_rows, [sh, kh]) = (pooled[0], [pool.stride[0], pool.kernel[0]]);
        // Pooled rows per task: the convolution rows they need fit the block budget.
        let per_conv_row = s.out_width * (self.depth() + self.padded_out) * 4;
        let conv_rows = |rows: usize| (rows - 1) * sh + kh;
        let mut rows = 1;
        while rows < pool_rows && conv_rows(rows + 1) * per_conv_row <= BLOCK_BYTES {
            rows += 1;
        }
        let chunks = pool_rows.div_ceil(rows);
        let tasks = batch * chunks;
        let threads = rayon::current_num_threads();
        let split = tasks < 2 * threads && threads > 1;
        let task = |t: usize| {
            let (image, first) = (t / chunks, t % chunks * rows);
            let rows = first..(first + rows).min(pool_rows);
            self.pooled_task(input, residual, dst, s, image, rows, pool, pooled, split);
        };
        if split {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    /// Pooled rows `rows` of image `image`, every channel.
    #[allow(clippy::too_many_arguments)]
    fn pooled_task(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        dst: SharedOut,
        s: &Shape,
        image: usize,
        rows: Range<usize>,
        pool: &MaxPool2dAttrs,
        pooled: [usize; 2],
        split: bool,
    ) {
        let ([kh, kw], [sh, sw], [ph, pw]) = (pool.kernel, pool.stride, pool.padding);
        let (oh, ow) = (s.out_height, s.out_width);
        // Window rows of pooled row r: r·sh − ph .. r·sh − ph + kh, clipped to the image.
        let window = |r: usize| (r * sh).saturating_sub(ph)..(r * sh + kh).saturating_sub(ph).min(oh);
        let (y_lo, y_hi) = (window(rows.start).start, window(rows.end - 1).end);
        let first = (image * oh + y_lo) * ow;
        let pixels = (y_hi - y_lo) * ow;
        let cols = pixels.div_ceil(PANEL_GRANULE) * PANEL_GRANULE;
        let segments = segments(s, first, pixels);
        let (v_len, m_len) = (self.depth() * cols, self.products_len(cols));
        with_scratch(v_len + m_len + 2 * ow + pooled[1], |scratch| {
            let (v, rest) = scratch.split_at_mut(v_len);
            let (m, rest) = rest.split_at_mut(m_len);
            let (column_max, rest) = rest.split_at_mut(ow);
            let (window_max, pooled_row) = rest.split_at_mut(ow);
            self.products(input, s, &segments, pixels, cols, split, v, m);
            let (conv_plane, pooled_plane) = (oh * ow, pooled[0] * pooled[1]);
            for o in 0..self.out_channels {
                let conv = &mut m[o * cols..][..pixels];
                let bias = self.bias[o];
                // Without a residual, bias and ReLU commute with the max (both
                // are monotonic, and so is f32 rounding of `x + b`): they are
                // applied to the pooled values only, a quarter of the work.
                let late_epilogue = residual.is_none();
                if let Some(r) = residual {
                    let r = &r[(image * self.out_channels + o) * conv_plane + y_lo * ow..][..pixels];
                    for (v, r) in conv.iter_mut().zip(r) {
                        let x = *v + bias + r;
                        *v = if self.relu { x.max(0.0) } else { x };
                    }
                }
                let conv = &*conv;
                for r in rows.clone() {
                    let ys = window(r);
                    // ys lies within y_lo..y_hi (windows grow with r) and is
                    // non-empty: padding <= half the window (checked in `new`).
                    let conv_row = |y: usize| &conv[(y - y_lo) * ow..][..ow];
                    column_max.copy_from_slice(conv_row(ys.start));
                    for y in ys.start + 1..ys.end {
                        for (c, &x) in column_max.iter_mut().zip(conv_row(y)) {
                            *c = nan_max(*c, x);
                        }
                    }
                    // Windows are non-empty for the same reason as the rows.
                    pool_row(column_max, [kw, sw, pw], window_max, pooled_row);
                    if late_epilogue {
                        for value in pooled_row.iter_mut() {
                            *value += bias;
                            if self.relu {
                                *value = value.max(0.0);
                            }
                        }
                    }
                    let base = (image * self.out_channels + o) * pooled_plane + r * pooled[1];
                    // SAFETY: base + PW <= N·O·PH·PW (image < N, o < O, r < PH);
                    // pooled pixels (image, o, r, ..) belong to this task only
                    // (tasks split images' rows).
                    unsafe { std::ptr::copy_nonoverlapping(pooled_row.as_ptr(), dst.0.add(base), pooled[1]) };
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::direct_conv::DirectConv;
    use crate::gemm_kernel::Isa;
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

        /// The fused conv + max pool equals the conv followed by the engine's
        /// max pool exactly (same products, same maxima), on every SIMD
        /// path: kernels 1..=7, stride 1..=2, conv and pool padding, pool
        /// windows 1..=3 with stride 1..=2, residual and ReLU on or off,
        /// odd sizes, several images and row chunks.
        #[test]
        fn equals_conv_then_pool(
            batch in 1usize..3, channels in 1usize..5, outputs in 1usize..11, kernel in 1usize..8,
            stride in 1usize..3, conv_pad in 0usize..3, extra in [0usize..12, 0usize..12],
            pool_kernel in 1usize..4, pool_stride in 1usize..3, pool_pad_flag in any::<bool>(),
            relu in any::<bool>(), with_residual in any::<bool>(),
        ) {
            let d = Device::Cpu;
            // Large enough that the conv output holds a pool window even unpadded.
            let size = [kernel + stride * pool_kernel + extra[0], kernel + stride * pool_kernel + extra[1]];
            let attrs = Conv2dAttrs { stride: [stride; 2], padding: [conv_pad; 2], ..Default::default() };
            let pool = MaxPool2dAttrs {
                kernel: [pool_kernel; 2],
                stride: [pool_stride; 2],
                padding: [usize::from(pool_pad_flag) * pool_kernel / 2; 2],
            };
            let x = Tensor::randn(0f32, 1.0, (batch, channels, size[0], size[1]), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (outputs, channels, kernel, kernel), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, outputs, &d).unwrap();
            for isa in Isa::available() {
                let plain = DirectConv::new(&w, Some(&b), attrs, relu, None, isa, usize::MAX).unwrap();
                let conv_shape = plain.run(&x, None).unwrap().dims().to_vec();
                let r = with_residual.then(|| Tensor::randn(0f32, 1.0, conv_shape.as_slice(), &d).unwrap());
                let want = crate::cpu_pool::max_pool2d(&plain.run(&x, r.as_ref()).unwrap(), &pool).unwrap();
                let fused = DirectConv::new(&w, Some(&b), attrs, relu, Some(pool), isa, usize::MAX).unwrap();
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
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        };
        let plain = DirectConv::new(&w, Some(&b), attrs, true, None, Isa::detect(), usize::MAX).unwrap();
        let want = crate::cpu_pool::max_pool2d(&plain.run(&x, None).unwrap(), &pool).unwrap();
        let fused = DirectConv::new(&w, Some(&b), attrs, true, Some(pool), Isa::detect(), usize::MAX).unwrap();
        let got = fused.run(&x, None).unwrap();
        assert_eq!(got.dims(), [2, 64, 56, 56]);
        assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
    }

    #[test]
    fn rejects_bad_pools() {
        let d = Device::Cpu;
        let w = Tensor::zeros((2, 1, 3, 3), candle_core::DType::F32, &d).unwrap();
        let too_much_padding = MaxPool2dAttrs {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [2, 2],
        };
        assert!(DirectConv::new(
            &w,
            None,
            Conv2dAttrs::default(),
            false,
            Some(too_much_padding),
            Isa::Scalar,
            usize::MAX
        )
        .is_err());
        let big = MaxPool2dAttrs {
            kernel: [9, 9],
            stride: [1, 1],
            padding: [0, 0],
        };
        let conv = DirectConv::new(
            &w,
            None,
            Conv2dAttrs::default(),
            false,
            Some(big),
            Isa::Scalar,
            usize::MAX,
        )
        .unwrap();
        let x = Tensor::zeros((1, 1, 6, 6), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, None).is_err(), "a 9x9 window on a 4x4 conv output");
    }
}
