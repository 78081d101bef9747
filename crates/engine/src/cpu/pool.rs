//! The CPU f32 max pool over NCHW with implicit −∞ padding, one pass over
//! the input, planes in parallel, and the row operations it shares with the
//! conv's fused pool (candle's own pool has no padding, so the candle path
//! builds a padded copy first: `crate::candle::max_pool2d`).

use crate::cpu::data::{output_buffer, with_cpu_f32};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;
use wick_ir::MaxPool2dAttrs;

/// Max-pools a CPU f32 tensor `[N, C, H, W]`.
pub(crate) fn max_pool2d(x: &Tensor, attrs: &MaxPool2dAttrs) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let &[n, c, h, w] = x.dims() else {
        bail!("max_pool2d input must be NCHW, got {:?}", x.dims())
    };
    let ([kh, kw], [sh, sw], [ph, pw]) = (attrs.kernel, attrs.stride, attrs.padding);
    let Some([oh, ow]) = attrs.output_size([h, w]) else {
        bail!("max_pool2d window {:?} does not fit {:?}", attrs.kernel, x.dims())
    };
    if (0..2).any(|i| attrs.padding[i] > attrs.kernel[i] / 2) {
        bail!(
            "max_pool2d padding {:?} exceeds half the window {:?}",
            attrs.padding,
            attrs.kernel
        )
    }
    let Some(len) = [n, c, oh, ow].iter().try_fold(1usize, |len, &d| len.checked_mul(d)) else {
        bail!("max_pool2d output [{n}, {c}, {oh}, {ow}] has more elements than fit in memory")
    };
    let mut out = output_buffer(len, "max_pool2d output")?;
    out.resize(len, 0.0);
    if len == 0 {
        return Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu);
    }
    with_cpu_f32("CPU max-pool", &x, None, |data, _| {
        out.par_chunks_mut(oh * ow).zip(data.par_chunks(h * w)).for_each_init(
            || (vec![0f32; w], vec![0f32; w]),
            |(column_max, window_max), (out, plane)| {
                for (oy, out) in out.chunks_mut(ow).enumerate() {
                    // Window rows clipped to the image: padding never wins a max
                    // (pad <= kernel / 2, so every window holds a real row).
                    let y0 = (oy * sh).saturating_sub(ph);
                    let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
                    max_rows(&plane[y0 * w..y1 * w], w, column_max);
                    pool_row(column_max, [kw, sw, pw], window_max, out);
                }
            },
        );
        Ok(())
    })?;
    Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu)
}

/// `out[x] = max(rows[r·width + x])` over the (at least one) `width`-long
/// rows of `rows`, one whole row at a time (vectorises).
#[inline]
pub(crate) fn max_rows(rows: &[f32], width: usize, out: &mut [f32]) {
    let (first, rest) = rows.split_at(width);
    out.copy_from_slice(first);
    for row in rest.chunks_exact(width) {
        for (m, &v) in out.iter_mut().zip(row) {
            *m = nan_max(*m, v);
        }
    }
}

/// Max-pools one row: `out[x] = max(row[x·stride − pad ..][..kernel])`,
/// the window clipped to the row (padding never wins: pad <= kernel / 2,
/// and `out.len()` is the pooled width). `scratch` holds `row.len()` values.
///
/// Done as a stride-1 sliding max over whole rows (vectorises) and a pick
/// of every `stride`-th window, instead of a short scalar fold per output.
#[inline]
pub(crate) fn pool_row(row: &[f32], [kernel, stride, pad]: [usize; 3], scratch: &mut [f32], out: &mut [f32]) {
    let w = row.len();
    // scratch[x] = max(row[x..min(x + kernel, w)]).
    scratch.copy_from_slice(row);
    for k in 1..kernel.min(w) {
        for (m, &v) in scratch[..w - k].iter_mut().zip(&row[k..]) {
            *m = nan_max(*m, v);
        }
    }
    for (x, out) in out.iter_mut().enumerate() {
        let start = x * stride;
        *out = if start >= pad {
            scratch[start - pad]
        } else {
            // Window cut by the left padding: row[0..start + kernel − pad].
            row[..(start + kernel - pad).min(w)]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, nan_max)
        };
    }
}

/// `max` that propagates NaN like PyTorch (`f32::max` drops it), branch-free.
#[inline(always)]
pub(crate) fn nan_max(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Equals the candle path's max-pool (on a −∞-padded copy), across windows,
        /// strides, paddings (<= half the window), ceil and floor mode and odd
        /// sizes incl. C == H == W.
        #[test]
        fn matches_candle(
            n in 1usize..3, c in 1usize..5, kernel in [1usize..4, 1usize..4], stride in [1usize..3, 1usize..3],
            extra in [0usize..6, 0usize..6], pad_flags in [any::<bool>(), any::<bool>()], square in any::<bool>(),
            ceil_mode in any::<bool>(),
        ) {
            let padding = [usize::from(pad_flags[0]) * kernel[0] / 2, usize::from(pad_flags[1]) * kernel[1] / 2];
            let mut size = [kernel[0] + extra[0], kernel[1] + extra[1]];
            if square {
                let s = size[0].max(size[1]).max(c);
                size = [s, s];
            }
            let x = Tensor::randn(0f32, 1.0, (n, if square { size[0] } else { c }, size[0], size[1]), &Device::Cpu).unwrap();
            let attrs = MaxPool2dAttrs { kernel, stride, padding, ceil_mode };
            let got = max_pool2d(&x, &attrs).unwrap();
            let want = crate::candle::max_pool2d(&x, &attrs).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert_eq!(diff, 0.0);
        }
    }

    /// Ceil mode adds the window that starts inside the input and runs past
    /// its end (clipped), as PyTorch does: 5 columns, window 2, stride 2.
    #[test]
    fn ceil_mode_keeps_the_last_window() {
        let x = Tensor::new(&[[[[1f32, 5.0, 2.0, 3.0, 7.0]]]], &Device::Cpu).unwrap();
        let attrs = |ceil_mode| MaxPool2dAttrs {
            kernel: [1, 2],
            stride: [1, 2],
            padding: [0, 0],
            ceil_mode,
        };
        let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(max_pool2d(&x, &attrs(false)).unwrap()), [5.0, 3.0]);
        assert_eq!(values(max_pool2d(&x, &attrs(true)).unwrap()), [5.0, 3.0, 7.0]);
        assert_eq!(
            values(crate::candle::max_pool2d(&x, &attrs(true)).unwrap()),
            [5.0, 3.0, 7.0]
        );
    }

    /// A NaN in a window makes that window's output NaN (PyTorch's rule);
    /// windows without it are unaffected.
    #[test]
    fn nan_propagates() {
        let mut values = vec![0f32; 16];
        values[5] = f32::NAN; // row 1, column 1
        values[15] = 9.0;
        let x = Tensor::from_vec(values, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let attrs = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        let got: Vec<f32> = max_pool2d(&x, &attrs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(got[0].is_nan(), "{got:?}");
        assert_eq!(&got[1..], &[0.0, 0.0, 9.0]);
    }
}
