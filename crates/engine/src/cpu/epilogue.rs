//! The conv epilogue, once: `y = act(x + bias[c] (+ residual))`, the same
//! arithmetic in the same order for every CPU kernel (grouped, direct,
//! pooled, both Winograd transforms) and for the candle path's one-pass op
//! (whose CUDA kernel mirrors it).

use crate::cpu::activation::scalar;
use crate::cpu::gemm::{Isa, IsaBody};
use candle_core::{bail, Tensor};
use wick_ir::Activation;

/// `v` through the optional activation.
#[inline(always)]
pub(crate) fn activate(activation: Option<Activation>, v: f32) -> f32 {
    match activation {
        None => v,
        Some(Activation::Relu) => v.max(0.0),
        Some(a) => scalar(a, v),
    }
}

/// One output value: `x + bias (+ residual)`, then the activation.
#[inline(always)]
pub(crate) fn value(x: f32, bias: f32, residual: Option<f32>, activation: Option<Activation>) -> f32 {
    let v = match residual {
        Some(r) => x + bias + r,
        None => x + bias,
    };
    activate(activation, v)
}

/// Runs `$body` with `$f` bound to the activation as a closure, one match
/// outside the loop in `$body`: each activation gets its own loop with the
/// activation a constant in it, so every loop vectorises.
macro_rules! with_activation {
    ($activation:expr, |$f:ident| $body:expr) => {
        match $activation {
            None => {
                let $f = |v: f32| v;
                $body
            }
            Some(Activation::Relu) => {
                let $f = |v: f32| scalar(Activation::Relu, v);
                $body
            }
            Some(Activation::Relu6) => {
                let $f = |v: f32| scalar(Activation::Relu6, v);
                $body
            }
            Some(Activation::HardSwish) => {
                let $f = |v: f32| scalar(Activation::HardSwish, v);
                $body
            }
            Some(Activation::HardSigmoid) => {
                let $f = |v: f32| scalar(Activation::HardSigmoid, v);
                $body
            }
            Some(Activation::Sigmoid) => {
                let $f = |v: f32| scalar(Activation::Sigmoid, v);
                $body
            }
            Some(Activation::Silu) => {
                let $f = |v: f32| scalar(Activation::Silu, v);
                $body
            }
        }
    };
}

/// `values[i] = act(values[i] + bias (+ residual[i]))` over one channel's run.
#[inline(always)]
pub(crate) fn in_place(values: &mut [f32], bias: f32, residual: Option<&[f32]>, activation: Option<Activation>) {
    with_activation!(activation, |f| match residual {
        Some(residual) => {
            for (v, &r) in values.iter_mut().zip(residual) {
                *v = f(*v + bias + r);
            }
        }
        None => values.iter_mut().for_each(|v| *v = f(*v + bias)),
    })
}

/// `values[i] = act(values[i] + biases[i])`: one pixel's channels.
#[inline(always)]
pub(crate) fn in_place_channels(values: &mut [f32], biases: &[f32], activation: Option<Activation>) {
    with_activation!(activation, |f| {
        for (v, &bias) in values.iter_mut().zip(biases) {
            *v = f(*v + bias);
        }
    })
}

/// `out[i] = act(src[i] + bias (+ residual[i]))` over one channel's run.
#[inline(always)]
pub(crate) fn write(out: &mut [f32], src: &[f32], bias: f32, residual: Option<&[f32]>, activation: Option<Activation>) {
    with_activation!(activation, |f| match residual {
        Some(residual) => {
            for ((out, &x), &r) in out.iter_mut().zip(src).zip(residual) {
                *out = f(x + bias + r);
            }
        }
        None => {
            for (out, &x) in out.iter_mut().zip(src) {
                *out = f(x + bias);
            }
        }
    })
}

/// [`value`] on a fixed-size row (kept in one vector register).
#[inline(always)]
pub(crate) fn row<const N: usize>(
    x: [f32; N],
    bias: f32,
    residual: Option<&[f32; N]>,
    activation: Option<Activation>,
) -> [f32; N] {
    // Whole-array steps (not `value` per element), the form that stays in
    // one register in the Winograd output transform's inner loop.
    let mut row = x.map(|x| x + bias);
    if let Some(r) = residual {
        for (v, r) in row.iter_mut().zip(r) {
            *v += r;
        }
    }
    match activation {
        None => row,
        Some(Activation::Relu) => row.map(|v| v.max(0.0)),
        Some(a) => row.map(|v| scalar(a, v)),
    }
}

/// `$activation` (an `Option<Activation>`) on the SIMD vector `$v`, for the
/// kernels that apply the epilogue in registers, with the path's
/// intrinsics and sigmoid (`crate::cpu::activation::sigmoid_avx512` or
/// `_avx2`). The piecewise-linear activations use min/max with operands
/// ordered as `f32::clamp` and `f32::max` treat NaN (a NaN operand makes
/// the intrinsics return their second one); the hard ones multiply by
/// 1/6 where the scalar forms divide by 6 (within an ulp: a 512-bit
/// division costs as much as a dozen multiplies), sigmoid and SiLU are
/// within 8 ulp of the scalar forms (`vector_sigmoid!`).
macro_rules! vector_activation {
    ($activation:expr, $v:expr, $set1:ident, $zero:ident, $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {{
        let v = $v;
        match $activation {
            None => v,
            Some(Activation::Sigmoid) => $sigmoid(v),
            Some(Activation::Silu) => $mul(v, $sigmoid(v)),
            // `v.max(0.0)`: 0 for NaN.
            Some(Activation::Relu) => $max(v, $zero()),
            // `clamp`: NaN stays NaN.
            Some(Activation::Relu6) => $min($set1(6.0), $max($zero(), v)),
            Some(Activation::HardSigmoid) => {
                $mul($min($set1(6.0), $max($zero(), $add(v, $set1(3.0)))), $set1(1.0 / 6.0))
            }
            Some(Activation::HardSwish) => $mul(
                v,
                $mul($min($set1(6.0), $max($zero(), $add(v, $set1(3.0)))), $set1(1.0 / 6.0)),
            ),
        }
    }};
}
pub(crate) use vector_activation;

/// A conv's epilogue as a kernel holds it: the bias per output channel
/// (zeros without one), the activation that follows, if any, and the path
/// its loops run on.
#[derive(Debug, Clone)]
pub(crate) struct Epilogue {
    bias: Vec<f32>,
    activation: Option<Activation>,
    isa: Isa,
}

impl Epilogue {
    /// `bias` (`[out_channels]`, f32) or zeros; an error when its length differs.
    pub(crate) fn new(
        bias: Option<&Tensor>,
        out_channels: usize,
        activation: Option<Activation>,
    ) -> candle_core::Result<Self> {
        let bias = match bias {
            Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; out_channels],
        };
        if bias.len() != out_channels {
            bail!("conv bias has {} values for {out_channels} output channels", bias.len())
        }
        Ok(Self {
            bias,
            activation,
            isa: Isa::Scalar,
        })
    }

    /// This epilogue with its loops compiled for `isa` (one of
    /// [`Isa::available`]; portable code until set). Called from a kernel
    /// body that already runs on the path, or not: SiLU's `exp` on
    /// EfficientNet-B0's largest 1×1 conv took 2.4 ms at batch 1 on Zen 4
    /// compiled for baseline x86-64, against 0.8 ms for ReLU6 on the same shape.
    pub(crate) fn on(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The activation that follows, if any.
    #[inline(always)]
    pub(crate) fn activation(&self) -> Option<Activation> {
        self.activation
    }

    /// Whether this epilogue may follow a max pool instead of preceding
    /// it: without a residual, the bias and a monotonic activation (or
    /// none) commute with the max (and so does f32 rounding of `x + b`).
    pub(crate) fn commutes_with_max(&self, residual: bool) -> bool {
        !residual && self.activation.is_none_or(|a| a.is_monotonic())
    }

    /// The bias of output channel `channel`.
    #[inline(always)]
    pub(crate) fn bias(&self, channel: usize) -> f32 {
        self.bias[channel]
    }

    /// The biases of output channels `channels`.
    pub(crate) fn biases(&self, channels: std::ops::Range<usize>) -> &[f32] {
        &self.bias[channels]
    }

    /// [`in_place`] for output channel `channel`, on the epilogue's path.
    #[inline(always)]
    pub(crate) fn in_place(&self, channel: usize, values: &mut [f32], residual: Option<&[f32]>) {
        self.run(channel, values, None, residual)
    }

    /// [`write()`] for output channel `channel`, on the epilogue's path.
    #[inline(always)]
    pub(crate) fn write(&self, channel: usize, out: &mut [f32], src: &[f32], residual: Option<&[f32]>) {
        self.run(channel, out, Some(src), residual)
    }

    /// [`Run`] on the epilogue's path; sigmoid and SiLU after it, through
    /// the activation kernel ([`crate::cpu::activation::in_place`]: the
    /// kernels' vector form on the SIMD paths, where the loop's scalar
    /// formula vectorised with a division).
    #[inline(always)]
    fn run(&self, channel: usize, out: &mut [f32], src: Option<&[f32]>, residual: Option<&[f32]>) {
        let after = self.activation.filter(|&a| crate::cpu::activation::is_sigmoid(a));
        self.isa.run(Run {
            out: &mut *out,
            src,
            bias: self.bias[channel],
            residual,
            activation: self.activation.filter(|_| after.is_none()),
        });
        crate::cpu::activation::in_place(self.isa, after, out);
    }
}

/// [`in_place`] (no `src`) or [`write()`] as a body for [`Isa::run`].
struct Run<'a> {
    out: &'a mut [f32],
    src: Option<&'a [f32]>,
    bias: f32,
    residual: Option<&'a [f32]>,
    activation: Option<Activation>,
}

impl IsaBody for Run<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        match self.src {
            None => in_place(self.out, self.bias, self.residual, self.activation),
            Some(src) => write(self.out, src, self.bias, self.residual, self.activation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every form computes act(x + b + r) with the residual added before
    /// the activation, for no activation and each one (against the f64
    /// reference).
    #[test]
    fn forms_agree() {
        let bias = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        let activations = std::iter::once(None).chain(Activation::ALL.map(Some));
        for activation in activations {
            let e = Epilogue::new(Some(&bias), 2, activation).unwrap();
            let (x, r) = ([1.0f32, -3.0, 0.25, 4.0], [0.5f32, 1.0, -1.0, -8.0]);
            let want: Vec<f32> = x
                .iter()
                .zip(&r)
                .map(|(x, r)| {
                    let v = x - 2.0 + r;
                    activation.map_or(v, |a| a.reference(f64::from(v)) as f32)
                })
                .collect();
            let mut a = x;
            e.in_place(1, &mut a, Some(&r));
            let mut b = [0f32; 4];
            e.write(1, &mut b, &x, Some(&r));
            let c = row(x, -2.0, Some(&r), activation);
            let d: Vec<f32> = x
                .iter()
                .zip(&r)
                .map(|(&x, &r)| value(x, -2.0, Some(r), activation))
                .collect();
            for got in [a.to_vec(), b.to_vec(), c.to_vec(), d] {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "{activation:?}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    /// A bias of the wrong length is an error that says so.
    #[test]
    fn bias_length_is_checked() {
        let bias = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        let err = Epilogue::new(Some(&bias), 3, None).unwrap_err();
        assert!(err.to_string().contains("2 values for 3"), "{err}");
        assert_eq!(Epilogue::new(None, 3, Some(Activation::Relu)).unwrap().bias(2), 0.0);
    }
}
