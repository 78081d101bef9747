//! Batch norm's arithmetic as pure tensor functions: its per-channel scale
//! and shift, and the conv → batch-norm weight fold built on them.

use candle_core::{DType, Tensor};

/// An inference batch norm's parameters (`[C]` each; any float dtype).
#[derive(Debug, Clone, Copy)]
pub struct BatchNormParams<'a> {
    /// μ.
    pub running_mean: &'a Tensor,
    /// σ².
    pub running_var: &'a Tensor,
    /// γ, when affine (1 otherwise).
    pub weight: Option<&'a Tensor>,
    /// β, when affine (0 otherwise).
    pub bias: Option<&'a Tensor>,
    /// ε, added to σ².
    pub eps: f64,
}

impl<'a> BatchNormParams<'a> {
    /// The parameters `(μ, σ²)`, with `(γ, β)` when affine.
    pub fn new(
        running_mean: &'a Tensor,
        running_var: &'a Tensor,
        affine: Option<(&'a Tensor, &'a Tensor)>,
        eps: f64,
    ) -> Self {
        Self {
            running_mean,
            running_var,
            weight: affine.map(|(w, _)| w),
            bias: affine.map(|(_, b)| b),
            eps,
        }
    }

    /// The batch norm as an affine map per channel, `y = x · scale + shift`:
    ///
    /// `scale = γ / √(σ² + ε)`, `shift = β − μ · scale`,
    ///
    /// computed in f64 (the results are f64 `[C]` tensors). The one
    /// statement of batch norm's arithmetic: the conv fold below and the
    /// engine's unfused batch norm use it.
    pub fn scale_shift(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let wide = |t: &Tensor| t.to_dtype(DType::F64);
        let inv_std = (wide(self.running_var)? + self.eps)?.sqrt()?.recip()?;
        let scale = match self.weight {
            Some(gamma) => (wide(gamma)? * &inv_std)?,
            None => inv_std,
        };
        let shifted_mean = (wide(self.running_mean)? * &scale)?;
        let shift = match self.bias {
            Some(beta) => (wide(beta)? - shifted_mean)?,
            None => shifted_mean.neg()?,
        };
        Ok((scale, shift))
    }
}

/// Folds an inference batch norm into the preceding convolution:
///
/// `W' = W · scale` (per output channel), `b' = b · scale + shift`, with
/// `scale` and `shift` from [`BatchNormParams::scale_shift`] (so `b' = (b −
/// μ) · s + β`), and a missing conv bias taken as 0. The arithmetic is done
/// in f64 whatever the model's dtype, and the results are cast back to the
/// weight's dtype (so f16/bf16 models lose no precision in the fold itself).
/// Returns `(W', b')`.
pub fn fold_conv_batch_norm(
    weight: &Tensor,
    bias: Option<&Tensor>,
    batch_norm: &BatchNormParams<'_>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dtype = weight.dtype();
    let (scale, shift) = batch_norm.scale_shift()?;
    let mut per_channel = vec![1; weight.rank()];
    per_channel[0] = weight.dim(0)?;
    let folded_weight = weight
        .to_dtype(DType::F64)?
        .broadcast_mul(&scale.reshape(per_channel)?)?;
    let folded_bias = match bias {
        Some(bias) => ((bias.to_dtype(DType::F64)? * &scale)? + shift)?,
        None => shift,
    };
    Ok((folded_weight.to_dtype(dtype)?, folded_bias.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    /// A batch norm without affine parameters.
    fn plain<'a>(mean: &'a Tensor, var: &'a Tensor, eps: f64) -> BatchNormParams<'a> {
        BatchNormParams::new(mean, var, None, eps)
    }

    /// The fold equals the formula worked by hand for two channels.
    #[test]
    fn folds_by_hand_example() {
        let weight = t(&[1.0, 2.0, 3.0, 4.0]).reshape((2, 2, 1, 1)).unwrap();
        let (mean, var, gamma, beta) = (t(&[1.0, 2.0]), t(&[3.0, 0.0]), t(&[2.0, 3.0]), t(&[0.25, 0.0]));
        let bn = BatchNormParams::new(&mean, &var, Some((&gamma, &beta)), 1.0);
        let (w, b) = fold_conv_batch_norm(&weight, Some(&t(&[0.5, -1.0])), &bn).unwrap();
        // channel 0: s = 2 / sqrt(4) = 1; channel 1: s = 3 / sqrt(1) = 3.
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0, 9.0, 12.0]
        );
        // b0 = (0.5 - 1) * 1 + 0.25 = -0.25; b1 = (-1 - 2) * 3 + 0 = -9.
        assert_eq!(b.to_vec1::<f32>().unwrap(), [-0.25, -9.0]);
    }

    /// Without conv bias and affine parameters: b' = -μ s, s = 1/√(σ²+ε).
    #[test]
    fn missing_bias_and_affine() {
        let weight = t(&[2.0]).reshape((1, 1, 1, 1)).unwrap();
        let three = t(&[3.0]);
        let (w, b) = fold_conv_batch_norm(&weight, None, &plain(&three, &three, 1.0)).unwrap();
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1.0]);
        assert_eq!(b.to_vec1::<f32>().unwrap(), [-1.5]);
    }

    /// Half-precision weights are folded in f64 and returned in their own dtype.
    #[test]
    fn keeps_dtype() {
        let weight = t(&[1.0, 1.0])
            .reshape((2, 1, 1, 1))
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let v = t(&[1.0, 1.0]).to_dtype(DType::F16).unwrap();
        let (w, b) = fold_conv_batch_norm(&weight, None, &plain(&v, &v, 1e-5)).unwrap();
        assert_eq!((w.dtype(), b.dtype()), (DType::F16, DType::F16));
    }
}
