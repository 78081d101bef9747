//! The elementwise activations as one family: which ops they are, and their
//! reference semantics on candle tensors (what the eager front end and the
//! engine's candle path both run, and what fused kernels are tested against).

use crate::Op;
use candle_core::Tensor;

/// An elementwise activation op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// [`Op::Relu`]: `max(x, 0)`.
    Relu,
    /// [`Op::Relu6`]: `min(max(x, 0), 6)`.
    Relu6,
    /// [`Op::HardSwish`]: `x · relu6(x + 3) / 6`.
    HardSwish,
    /// [`Op::HardSigmoid`]: `relu6(x + 3) / 6`.
    HardSigmoid,
    /// [`Op::Sigmoid`]: `1 / (1 + e^-x)`.
    Sigmoid,
    /// [`Op::Silu`]: `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 6] = [
        Activation::Relu,
        Activation::Relu6,
        Activation::HardSwish,
        Activation::HardSigmoid,
        Activation::Sigmoid,
        Activation::Silu,
    ];

    /// The activation `op` is, if it is one.
    pub fn of(op: &Op) -> Option<Activation> {
        Some(match op {
            Op::Relu => Activation::Relu,
            Op::Relu6 => Activation::Relu6,
            Op::HardSwish => Activation::HardSwish,
            Op::HardSigmoid => Activation::HardSigmoid,
            Op::Sigmoid => Activation::Sigmoid,
            Op::Silu => Activation::Silu,
            _ => return None,
        })
    }

    /// The op of this activation.
    pub fn op(self) -> Op {
        match self {
            Activation::Relu => Op::Relu,
            Activation::Relu6 => Op::Relu6,
            Activation::HardSwish => Op::HardSwish,
            Activation::HardSigmoid => Op::HardSigmoid,
            Activation::Sigmoid => Op::Sigmoid,
            Activation::Silu => Op::Silu,
        }
    }

    /// Whether the activation never decreases (then it commutes with a
    /// max: a fused pool may apply it after the max); hardswish and SiLU
    /// dip below zero before rising.
    pub fn is_monotonic(self) -> bool {
        !matches!(self, Activation::HardSwish | Activation::Silu)
    }

    /// Applies the activation with candle's ops, in `x`'s dtype, written
    /// the way PyTorch computes it (`hardsigmoid` as `relu6(x + 3) / 6`, not
    /// `x / 6 + 1/2`), so the two round alike.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        let relu6_of_x_plus_3 = || (x + 3.0)?.clamp(0f32, 6f32);
        match self {
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
            Activation::HardSwish => x * (relu6_of_x_plus_3()? / 6.0)?,
            Activation::HardSigmoid => relu6_of_x_plus_3()? / 6.0,
            Activation::Sigmoid => sigmoid(x),
            Activation::Silu => x * sigmoid(x)?,
        }
    }

    /// The activation of one f64 value: the scalar reference the tests
    /// compare tensors with.
    pub fn reference(self, x: f64) -> f64 {
        let relu6 = |v: f64| v.clamp(0.0, 6.0);
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Relu6 => relu6(x),
            Activation::HardSwish => x * relu6(x + 3.0) / 6.0,
            Activation::HardSigmoid => relu6(x + 3.0) / 6.0,
            Activation::Sigmoid => sigmoid(x),
            Activation::Silu => x * sigmoid(x),
        }
    }
}

/// `1 / (1 + e^-x)`: saturates to 0 and 1 without NaN (e^-x overflows to
/// infinity for very negative x, whose reciprocal sum is 0).
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Every activation's candle form equals its f64 reference on values
    /// from -20 to 20 (saturation included), in f32 and f64, and maps to
    /// and from its op.
    #[test]
    fn candle_form_matches_reference() {
        let values: Vec<f64> = (-400..=400).map(|i| f64::from(i) / 20.0).chain([-1e4, 1e4]).collect();
        for activation in Activation::ALL {
            assert_eq!(Activation::of(&activation.op()), Some(activation));
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::new(values.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got: Vec<f64> = activation
                    .apply(&x)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (&v, &g) in values.iter().zip(&got) {
                    let want = activation.reference(v);
                    let tol = if dtype == DType::F32 {
                        1e-6 * want.abs().max(1.0)
                    } else {
                        1e-12 * want.abs().max(1.0)
                    };
                    assert!(
                        (g - want).abs() <= tol,
                        "{activation:?} {dtype:?} at {v}: {g} vs {want}"
                    );
                }
            }
        }
        assert_eq!(Activation::of(&Op::Add), None);
    }
}
