//! Engine-owned CPU f32 max-pool over NCHW with implicit −∞ padding, one
//! pass over the input, planes in parallel (candle's own pool has no padding,
//! so the candle path must first build a padded copy).

use candle_core::{bail, CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;
use wick_ir::MaxPool2dAttrs;

/// Max-pools a CPU f32 tensor `[N, C, H, W]`.
pub(crate) fn max_pool2d(x: &Tensor, attrs: &MaxPool2dAttrs) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let &[n, c, h, w] = x.dims() else {
        bail!("max_pool2d input must be NCHW, got {:?}", x.dims())
    };
    let ([kh, kw], [sh, sw], [ph, pw]) = (attrs.kernel, attrs.stride, attrs.padding);
    let out_len = |len: usize, k: usize, s: usize, p: usize| (len + 2 * p).checked_sub(k).map(|v| v / s + 1);
    let (Some(oh), Some(ow)) = (out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)) else {
        bail!("max_pool2d window {:?} does not fit {:?}", attrs.kernel, x.dims())
    };
    let mut out = vec![0f32; n * c * oh * ow];
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            bail!("the CPU max-pool takes f32 tensors on the CPU")
        };
        let data = &data[layout.start_offset()..][..n * c * h * w];
        out.par_chunks_mut(oh * ow)
            .zip(data.par_chunks(h * w))
            .for_each(|(out, plane)| {
                for oy in 0..oh {
                    // Window rows clipped to the image: padding never wins a max.
                    let y0 = (oy * sh).saturating_sub(ph);
                    let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
                    for ox in 0..ow {
                        let x0 = (ox * sw).saturating_sub(pw);
                        let x1 = (ox * sw + kw).saturating_sub(pw).min(w);
                        let mut best = f32::NEG_INFINITY;
                        for row in plane[y0 * w..y1 * w].chunks(w) {
                            for &v in &row[x0..x1] {
                                // `max` would drop NaN; keep PyTorch's NaN propagation.
                                if v > best || v.is_nan() {
                                    best = v;
                                }
                            }
                        }
                        out[oy * ow + ox] = best;
                    }
                }
            });
    }
    Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(x: &Tensor, a: &MaxPool2dAttrs) -> Tensor {
        let mut padded = x.clone();
        for (dim, pad) in [(2, a.padding[0]), (3, a.padding[1])] {
            if pad > 0 {
                let mut edge = padded.dims().to_vec();
                edge[dim] = pad;
                let fill = Tensor::full(f32::NEG_INFINITY, edge, x.device()).unwrap();
                padded = Tensor::cat(&[&fill, &padded, &fill], dim).unwrap();
            }
        }
        padded
            .max_pool2d_with_stride((a.kernel[0], a.kernel[1]), (a.stride[0], a.stride[1]))
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Equals candle's max-pool on a −∞-padded copy, across windows,
        /// strides, paddings (<= half the window) and odd sizes incl. C == H == W.
        #[test]
        fn matches_candle(
            n in 1usize..3, c in 1usize..5, kernel in [1usize..4, 1usize..4], stride in [1usize..3, 1usize..3],
            extra in [0usize..6, 0usize..6], pad_flags in [any::<bool>(), any::<bool>()], square in any::<bool>(),
        ) {
            let padding = [usize::from(pad_flags[0]) * kernel[0] / 2, usize::from(pad_flags[1]) * kernel[1] / 2];
            let mut size = [kernel[0] + extra[0], kernel[1] + extra[1]];
            if square {
                let s = size[0].max(size[1]).max(c);
                size = [s, s];
            }
            let x = Tensor::randn(0f32, 1.0, (n, if square { size[0] } else { c }, size[0], size[1]), &Device::Cpu).unwrap();
            let attrs = MaxPool2dAttrs { kernel, stride, padding };
            let got = max_pool2d(&x, &attrs).unwrap();
            let want = reference(&x, &attrs);
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert_eq!(diff, 0.0);
        }
    }
}
