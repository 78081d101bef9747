//! The CPU f32 ops that treat an NCHW tensor as `N·C` planes with one value
//! each: the global average pool (a plane to its mean), the channel scale
//! (a plane times its value: squeeze-and-excitation's `[N,C,H,W] ·
//! [N,C,1,1]`) and the channel affine (a batch norm no conv precedes, its
//! scale and shift folded at compile time: DenseNet's 62 took 6.2 of its
//! 53 ms on candle's two broadcast ops). One pass, planes in parallel in tasks of at least
//! [`MIN_TASK`] values, compiled for the instruction-set path. candle's
//! `mean_keepdim` twice and `broadcast_mul` took 1.9 ms of EfficientNet-B0's
//! batch-1 forward on Zen 4 for ~2 M values.

use crate::cpu::data::with_cpu_f32;
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::output::Output;
use crate::cpu::parallel::for_each;
use candle_core::{bail, Tensor};

/// Fewest values per parallel task (fewer planes are not worth a thread).
const MIN_TASK: usize = 1 << 14;

/// Lanes of the partial sums (a whole AVX-512 vector, two AVX2 ones).
const LANES: usize = 16;

/// `[N, C, H, W]` of `x`, or an error naming `what`.
fn nchw(x: &Tensor, what: &str) -> candle_core::Result<[usize; 4]> {
    match *x.dims() {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => bail!("the {what} takes an NCHW tensor, got {:?}", x.dims()),
    }
}

/// Planes per task for planes of `plane` values.
fn planes_per_task(plane: usize) -> usize {
    MIN_TASK.div_ceil(plane.max(1))
}

/// The mean of each plane of a CPU f32 `[N, C, H, W]`: `[N, C, 1, 1]`
/// (the sum in f32, divided by `H·W`, as PyTorch's CPU kernel computes it
/// up to summation order; an empty plane's mean is NaN, as there).
pub(crate) fn global_avg_pool2d(isa: Isa, x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let [n, c, h, w] = nchw(&x, "global average pool")?;
    let planes = n * c;
    let plane = h * w;
    let mut out = Output::new(planes, "global average pool output")?;
    out.fill(planes, 0.0);
    if plane > 0 {
        with_cpu_f32("global average pool", &x, None, |data, _| {
            let per_task = planes_per_task(plane);
            let tasks = out.values_mut().chunks_mut(per_task).zip(data.chunks(per_task * plane));
            for_each(tasks, |(out, data)| isa.run(Means { data, plane, out }));
            Ok(())
        })?;
    } else {
        out.fill(planes, f32::NAN);
    }
    out.into_tensor(&[n, c, 1, 1])
}

/// Each `plane`-long run of `data` to its mean in `out`.
struct Means<'a> {
    data: &'a [f32],
    plane: usize,
    out: &'a mut [f32],
}

impl IsaBody for Means<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (mean, values) in self.out.iter_mut().zip(self.data.chunks_exact(self.plane)) {
            let mut lanes = [0f32; LANES];
            let chunks = values.chunks_exact(LANES);
            let rest: f32 = chunks.remainder().iter().sum();
            for chunk in chunks {
                for (l, &v) in lanes.iter_mut().zip(chunk) {
                    *l += v;
                }
            }
            *mean = (lanes.iter().sum::<f32>() + rest) / self.plane as f32;
        }
    }
}

/// `f` on [`channel_scale`]`(isa, a, s)`, a step's own intermediate: its
/// buffer, which may have come from the forward's pool, goes back there
/// after `f` (dropped, the pool would lose it every forward:
/// `cpu::recycle`). `f` must return fresh storage, as every CPU kernel
/// does, never a view of the scaled input.
pub(crate) fn on_channel_scaled<R>(
    isa: Isa,
    a: &Tensor,
    s: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let scaled = channel_scale(isa, a, s)?;
    let out = f(&scaled);
    super::recycle::reclaim(scaled);
    out
}

/// `a · s` for CPU f32 `a` `[N, C, H, W]` and `s` `[N, C, 1, 1]`: every
/// plane of `a` times its value of `s`.
pub(crate) fn channel_scale(isa: Isa, a: &Tensor, s: &Tensor) -> candle_core::Result<Tensor> {
    let (a, s) = (a.contiguous()?, s.contiguous()?);
    let [n, c, _, _] = nchw(&a, "channel scale")?;
    if s.dims() != [n, c, 1, 1] {
        bail!(
            "the channel scale multiplies {:?} by one value per plane, [{n}, {c}, 1, 1], got {:?}",
            a.dims(),
            s.dims()
        )
    }
    with_cpu_f32("channel scale", &s, None, |scale, _| {
        per_plane(isa, &a, scale, None, "channel scale")
    })
}

/// `x · scale[c] + shift[c]` for CPU f32 `x` `[N, C, H, W]` (an inference
/// batch norm folded at compile time; the same two f32 operations as the
/// candle path's `broadcast_mul` and `broadcast_add`, so the same values).
pub(crate) fn channel_affine(isa: Isa, x: &Tensor, scale: &[f32], shift: &[f32]) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let [_, c, _, _] = nchw(&x, "batch norm")?;
    if scale.len() != c || shift.len() != c {
        bail!(
            "the batch norm has {} scales for {:?} ({c} channels)",
            scale.len(),
            x.dims()
        )
    }
    per_plane(isa, &x, scale, Some(shift), "batch norm")
}

/// Every plane `p` of `x` times `scale[p mod scale.len()]` (plus the same
/// of `shift`): one value per plane (`N·C`) or per channel (`C`, repeated
/// for every image). One pass, planes in parallel.
fn per_plane(isa: Isa, x: &Tensor, scale: &[f32], shift: Option<&[f32]>, what: &str) -> candle_core::Result<Tensor> {
    let [_, _, h, w] = nchw(x, what)?;
    let plane = h * w;
    let len = x.elem_count();
    let mut out = Output::new(len, what)?;
    if len > 0 {
        let per_task = planes_per_task(plane);
        with_cpu_f32(what, x, None, |data, _| {
            let tasks = out.spare()[..len]
                .chunks_mut(per_task * plane)
                .zip(data.chunks(per_task * plane));
            for_each(tasks.enumerate(), |(task, (out, data))| {
                isa.run(Scale {
                    data,
                    plane,
                    first_plane: task * per_task,
                    scale,
                    shift,
                    out,
                })
            });
            Ok(())
        })?;
        // SAFETY: the tasks wrote all `len` values (every plane of every task).
        unsafe { out.assume_written(len) };
    }
    out.into_tensor(x.dims())
}

/// Each `plane`-long run of `data` (planes `first_plane..` of the tensor)
/// times its value of `scale` (plus its value of `shift`), into `out`.
struct Scale<'a> {
    data: &'a [f32],
    plane: usize,
    first_plane: usize,
    /// Per plane or per channel: plane `p` takes value `p mod len`.
    scale: &'a [f32],
    shift: Option<&'a [f32]>,
    out: &'a mut [std::mem::MaybeUninit<f32>],
}

impl IsaBody for Scale<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let runs = self
            .out
            .chunks_exact_mut(self.plane)
            .zip(self.data.chunks_exact(self.plane));
        let period = self.scale.len();
        for (p, (out, values)) in (self.first_plane..).zip(runs) {
            let s = self.scale[p % period];
            match self.shift {
                None => {
                    for (o, &v) in out.iter_mut().zip(values) {
                        o.write(v * s);
                    }
                }
                Some(shift) => {
                    let t = shift[p % period];
                    for (o, &v) in out.iter_mut().zip(values) {
                        o.write(v * s + t);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Both ops on every path against f64 (the mean) and the exact
        /// product (one f32 multiply), across plane sizes around the lane
        /// count and task size.
        #[test]
        fn match_reference(n in 1usize..3, c in 1usize..9, h in 1usize..40, w in 1usize..70, seed in any::<u64>()) {
            let mut next = crate::test_util::uniform(seed);
            let x: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let s: Vec<f32> = (0..n * c).map(|_| next()).collect();
            let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
            let st = Tensor::from_vec(s.clone(), (n, c, 1, 1), &Device::Cpu).unwrap();
            let plane = h * w;
            for isa in Isa::available() {
                let means: Vec<f32> = global_avg_pool2d(isa, &xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let scaled: Vec<f32> = channel_scale(isa, &xt, &st).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for (p, values) in x.chunks_exact(plane).enumerate() {
                    let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
                    let abs: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
                    // Any f32 summation order: |error| <= n·ε·Σ|v|, over n; then the division's rounding.
                    let want = sum / plane as f64;
                    let bound = 1.01 * f64::from(f32::EPSILON) * (abs + want.abs()) + 1e-30;
                    prop_assert!((f64::from(means[p]) - want).abs() <= bound, "{isa:?} plane {p}");
                    for (i, &v) in values.iter().enumerate() {
                        prop_assert_eq!(scaled[p * plane + i], v * s[p], "{:?} plane {} value {}", isa, p, i);
                    }
                }
            }
        }
    }

    /// The channel affine equals `v · scale[c] + shift[c]` exactly (the
    /// same two f32 operations), channel by channel across the batch; a
    /// scale of the wrong length is refused.
    #[test]
    fn channel_affine_per_channel() {
        let (n, c, plane) = (3, 5, 37);
        let mut next = crate::test_util::uniform(9);
        let x: Vec<f32> = (0..n * c * plane).map(|_| next()).collect();
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c).map(|_| (next(), next())).unzip();
        let xt = Tensor::from_vec(x.clone(), (n, c, 1, plane), &Device::Cpu).unwrap();
        for isa in Isa::available() {
            let got: Vec<f32> = channel_affine(isa, &xt, &scale, &shift)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                let ch = i / plane % c;
                assert_eq!(g, v * scale[ch] + shift[ch], "{isa:?} value {i}");
            }
        }
        assert!(channel_affine(Isa::Scalar, &xt, &scale[1..], &shift)
            .unwrap_err()
            .to_string()
            .contains("4 scales"));
    }

    /// Shapes other than NCHW and `[N, C, 1, 1]` are refused with the
    /// shapes named; an empty plane's mean is NaN.
    #[test]
    fn shapes_are_checked() {
        let d = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4, 4), candle_core::DType::F32, &d).unwrap();
        let isa = Isa::Scalar;
        let err = channel_scale(
            isa,
            &x,
            &Tensor::zeros((2, 3, 4, 1), candle_core::DType::F32, &d).unwrap(),
        );
        assert!(err.unwrap_err().to_string().contains("[2, 3, 1, 1]"));
        let flat = Tensor::zeros((2, 3), candle_core::DType::F32, &d).unwrap();
        assert!(global_avg_pool2d(isa, &flat).unwrap_err().to_string().contains("NCHW"));
        let empty = Tensor::zeros((1, 2, 0, 3), candle_core::DType::F32, &d).unwrap();
        let means: Vec<f32> = global_avg_pool2d(isa, &empty)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(means.iter().all(|m| m.is_nan()));
    }
}
