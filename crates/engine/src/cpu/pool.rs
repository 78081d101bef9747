//! The CPU f32 max pool over NCHW with implicit −∞ padding, one pass over
//! the input, planes in parallel, its loops compiled for an instruction-set
//! path, and the row operations it shares with the conv's fused pool
//! (candle's own pool has no padding, so the candle path builds a padded
//! copy first: `crate::candle::max_pool2d`).

use crate::cpu::data::with_cpu_f32;
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::output::Output;
use crate::cpu::parallel::{for_each, per_task};
use crate::cpu::pool_window::pool_window_row;
use candle_core::{bail, Tensor};
use wick_ir::MaxPool2dAttrs;

/// A max pool with the path its loops run on (one of [`Isa::available`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool {
    /// Window, stride, padding, ceil mode.
    pub(crate) attrs: MaxPool2dAttrs,
    /// The instruction-set path.
    pub(crate) isa: Isa,
}

impl MaxPool {
    /// [`max_pool2d`] with these attributes on this path.
    pub(crate) fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        max_pool2d(self.isa, x, &self.attrs)
    }
}

/// Max-pools a CPU f32 tensor `[N, C, H, W]` on `isa`'s path.
pub(crate) fn max_pool2d(isa: Isa, x: &Tensor, attrs: &MaxPool2dAttrs) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let &[n, c, h, w] = x.dims() else {
        bail!("max_pool2d input must be NCHW, got {:?}", x.dims())
    };
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
    let mut out = Output::new(len, "max_pool2d output")?;
    out.fill(len, 0.0);
    if len == 0 {
        return out.into_tensor(&[n, c, oh, ow]);
    }
    with_cpu_f32("CPU max-pool", &x, None, |data, _| {
        let per = per_task(n * c, 4);
        let tasks = out.values_mut().chunks_mut(per * oh * ow).zip(data.chunks(per * h * w));
        for_each(tasks, |(outs, planes)| {
            let (mut column_max, mut window_max) = (vec![0f32; w], vec![0f32; w]);
            for (out, plane) in outs.chunks_mut(oh * ow).zip(planes.chunks(h * w)) {
                isa.run(PoolPlane {
                    isa,
                    plane,
                    size: [h, w],
                    pooled_width: ow,
                    attrs,
                    column_max: &mut column_max,
                    window_max: &mut window_max,
                    out,
                })
            }
        });
        Ok(())
    })?;
    out.into_tensor(&[n, c, oh, ow])
}

/// One plane of [`max_pool2d`] (`plane` `[size[0], size[1]]` into `out`
/// `[OH, pooled_width]`, through row scratch `column_max` and
/// `window_max`), as a body for [`Isa::run`].
struct PoolPlane<'a> {
    isa: Isa,
    plane: &'a [f32],
    size: [usize; 2],
    pooled_width: usize,
    attrs: &'a MaxPool2dAttrs,
    column_max: &'a mut [f32],
    window_max: &'a mut [f32],
    out: &'a mut [f32],
}

impl IsaBody for PoolPlane<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let PoolPlane {
            isa,
            plane,
            size: [h, w],
            pooled_width,
            attrs,
            column_max,
            window_max,
            out,
        } = self;
        let ([kh, kw], [sh, sw], [ph, pw]) = (attrs.kernel, attrs.stride, attrs.padding);
        for (oy, out) in out.chunks_mut(pooled_width).enumerate() {
            // Window rows clipped to the image: padding never wins a max
            // (pad <= kernel / 2, so every window holds a real row).
            let y0 = (oy * sh).saturating_sub(ph);
            let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
            let rows = &plane[y0 * w..y1 * w];
            pool_window_row(
                isa,
                rows,
                w,
                [kw, sw, pw],
                [&mut *column_max, &mut *window_max],
                out,
                None,
            );
        }
    }
}

/// Columns per register block of the max loops: two AVX2 vectors. The
/// maxima build up in a local array (registers) and are stored once: a
/// running max kept in memory (`out[x] = max(out[x], v)`) compiles, on
/// AVX2, to masked stores (`vmaskmovps`, slow on AMD: ResNet18's fused stem
/// took 1.15x the time of its baseline SSE build on Zen 3). `max_rows` and
/// `pool_row` each write their block loop out: one helper taking the other
/// rows as an iterator of slices made the stem 1.05-1.08x slower
/// (alternating forwards, Zen 3).
const BLOCK: usize = 16;

/// Where the register blocks over columns `0..n` start, and how many
/// columns they cover from 0 (the rest go column by column): whole blocks,
/// and where `n` is at least a block but not a multiple of one, a last
/// block ending at `n`, overlapping the one before (its columns get the
/// same values twice). Without it the windows of a 112-wide row (ResNet's
/// stem) left 16 columns to the scalar loop (a NaN-aware max one column at
/// a time, the pool's hottest code in `perf`); with it ResNet's fused stem
/// conv + pool alone took 0.92x the time at batch 1 and 10 (alternating
/// runs, Intel Xeon with AVX-512).
#[inline(always)]
fn block_starts(n: usize) -> (impl Iterator<Item = usize>, usize) {
    let whole = n / BLOCK * BLOCK;
    let last = (n > whole && n >= BLOCK).then(|| n - BLOCK);
    let covered = if last.is_some() { n } else { whole };
    ((0..whole).step_by(BLOCK).chain(last), covered)
}

/// `out[x] = max(rows[r·width + x])` over the (at least one) `width`-long
/// rows of `rows`, a [`BLOCK`] of columns at a time (vectorises).
#[inline(always)]
pub(crate) fn max_rows(rows: &[f32], width: usize, out: &mut [f32]) {
    let (starts, full) = block_starts(width);
    for x0 in starts {
        let mut acc = [0f32; BLOCK];
        acc.copy_from_slice(&rows[x0..x0 + BLOCK]);
        for row in rows.chunks_exact(width).skip(1) {
            for (m, &v) in acc.iter_mut().zip(&row[x0..x0 + BLOCK]) {
                *m = nan_max(*m, v);
            }
        }
        out[x0..x0 + BLOCK].copy_from_slice(&acc);
    }
    for (x, out) in out.iter_mut().enumerate().take(width).skip(full) {
        *out = rows
            .chunks_exact(width)
            .skip(1)
            .fold(rows[x], |m, row| nan_max(m, row[x]));
    }
}

/// Max-pools one row: `out[x] = max(row[x·stride − pad ..][..kernel])`,
/// the window clipped to the row (padding never wins: pad <= kernel / 2,
/// and `out.len()` is the pooled width; kernel and stride at least 1, as
/// `MaxPool2dAttrs::output_size` requires). `scratch` holds `row.len()` values.
///
/// Done as a stride-1 sliding max over whole rows (vectorises, a
/// [`BLOCK`] at a time) and a pick of every `stride`-th window, instead of a
/// short scalar fold per output.
#[inline(always)]
pub(crate) fn pool_row(row: &[f32], [kernel, stride, pad]: [usize; 3], scratch: &mut [f32], out: &mut [f32]) {
    let w = row.len();
    // scratch[x] = max(row[x..min(x + kernel, w)]): whole blocks where
    // every window lies within the row, the rest column by column.
    let (starts, full) = block_starts((w + 1).saturating_sub(kernel.max(1)));
    for x0 in starts {
        let mut acc = [0f32; BLOCK];
        acc.copy_from_slice(&row[x0..x0 + BLOCK]);
        for k in 1..kernel {
            for (m, &v) in acc.iter_mut().zip(&row[x0 + k..x0 + k + BLOCK]) {
                *m = nan_max(*m, v);
            }
        }
        scratch[x0..x0 + BLOCK].copy_from_slice(&acc);
    }
    for (x, scratch) in scratch.iter_mut().enumerate().take(w).skip(full) {
        *scratch = row[x..(x + kernel).min(w)].iter().copied().fold(row[x], nan_max);
    }
    // Windows cut by the left padding (x·stride < pad): row[0..x·stride + kernel − pad].
    let cut = pad.div_ceil(stride.max(1)).min(out.len());
    let (head, tail) = out.split_at_mut(cut);
    for (x, out) in head.iter_mut().enumerate() {
        *out = row[..(x * stride + kernel - pad).min(w)]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, nan_max);
    }
    // The rest start at x·stride − pad within the row (the pooled width
    // keeps the last window's start inside it).
    if !tail.is_empty() {
        crate::cpu::data::gather_strided(&scratch[cut * stride - pad..], stride, tail);
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
    use candle_core::Device;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Equals the candle path's max-pool (on a −∞-padded copy), across windows,
        /// strides, paddings (<= half the window), ceil and floor mode and odd
        /// sizes incl. C == H == W, rows narrower and several times wider than
        /// a register block, with or without a NaN.
        #[test]
        fn matches_candle(
            n in 1usize..3, c in 1usize..5, kernel in [1usize..4, 1usize..4], stride in [1usize..3, 1usize..3],
            extra in [0usize..6, 0usize..(3 * BLOCK)], pad_flags in [any::<bool>(), any::<bool>()], square in any::<bool>(),
            ceil_mode in any::<bool>(), nan in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let padding = [usize::from(pad_flags[0]) * kernel[0] / 2, usize::from(pad_flags[1]) * kernel[1] / 2];
            let mut size = [kernel[0] + extra[0], kernel[1] + extra[1]];
            if square {
                let s = size[0].max(size[1]).max(c);
                size = [s, s];
            }
            let x = Tensor::randn(0f32, 1.0, (n, if square { size[0] } else { c }, size[0], size[1]), &Device::Cpu).unwrap();
            let x = match nan {
                Some(at) => {
                    let mut values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let at = at.index(values.len());
                    values[at] = f32::NAN;
                    Tensor::from_vec(values, x.dims(), &Device::Cpu).unwrap()
                }
                None => x,
            };
            let attrs = MaxPool2dAttrs { kernel, stride, padding, ceil_mode };
            let plain = naive(&x, &attrs);
            for isa in Isa::available() {
                let got = max_pool2d(isa, &x, &attrs).unwrap();
                prop_assert_eq!(got.dims(), plain.dims());
                let (got_values, plain_values) = (values(&got), values(&plain));
                for (i, (a, b)) in got_values.iter().zip(&plain_values).enumerate() {
                    prop_assert!(a == b || (a.is_nan() && b.is_nan()), "{:?} output {}: {} vs {}", isa, i, a, b);
                }
                if nan.is_none() {
                    // candle's pool drops NaN (PyTorch's keeps it): compared without.
                    let want = crate::candle::max_pool2d(&x, &attrs).unwrap();
                    prop_assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
                }
            }
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// A max pool written plainly: each output the fold of its window,
    /// clipped to the plane (PyTorch's sizes, ceil mode included), NaN when
    /// the window holds one.
    fn naive(x: &Tensor, attrs: &MaxPool2dAttrs) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let [oh, ow] = attrs.output_size([h, w]).unwrap();
        let data = values(x);
        let mut out = Vec::new();
        for plane in data.chunks(h * w).take(n * c) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for ky in 0..attrs.kernel[0] {
                        for kx in 0..attrs.kernel[1] {
                            let y = (oy * attrs.stride[0] + ky)
                                .checked_sub(attrs.padding[0])
                                .filter(|&y| y < h);
                            let xx = (ox * attrs.stride[1] + kx)
                                .checked_sub(attrs.padding[1])
                                .filter(|&x| x < w);
                            if let (Some(y), Some(xx)) = (y, xx) {
                                let v = plane[y * w + xx];
                                if v.is_nan() || m.is_nan() {
                                    m = f32::NAN;
                                } else {
                                    m = m.max(v);
                                }
                            }
                        }
                    }
                    out.push(m);
                }
            }
        }
        Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu).unwrap()
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
        for isa in Isa::available() {
            assert_eq!(values(max_pool2d(isa, &x, &attrs(false)).unwrap()), [5.0, 3.0]);
            assert_eq!(values(max_pool2d(isa, &x, &attrs(true)).unwrap()), [5.0, 3.0, 7.0]);
        }
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
        for isa in Isa::available() {
            let got: Vec<f32> = max_pool2d(isa, &x, &attrs)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(got[0].is_nan(), "{isa:?}: {got:?}");
            assert_eq!(&got[1..], &[0.0, 0.0, 9.0], "{isa:?}");
        }
    }
}
