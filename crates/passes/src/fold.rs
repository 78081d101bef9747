//! Batch norm's arithmetic as pure tensor functions: its per-channel scale
//! and shift, and the conv → batch-norm weight fold built on them.

use candle_core::{DType, Tensor};

/// Inference batch norm as an affine map per channel, `y = x · scale + shift`:
///
/// `scale = γ / √(σ² + ε)`, `shift = β − μ · scale`,
///
/// with a missing affine pair taken as γ = 1, β = 0; computed in f64 (the
/// results are f64 `[C]` tensors). The one statement of batch norm's
/// arithmetic: the conv fold below and the engine's unfused batch norm use it.
pub fn batch_norm_scale_shift(
    running_mean: &Tensor,
    running_var: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let wide = |t: &Tensor| t.to_dtype(DType::F64);
    let inv_std = (wide(running_var)? + eps)?.sqrt()?.recip()?;
    let scale = match gamma {
        Some(gamma) => (wide(gamma)? * &inv_std)?,
        None => inv_std,
    };
    let shifted_mean = (wide(running_mean)? * &scale)?;
    let shift = match beta {
        Some(beta) => (wide(beta)? - shifted_mean)?,
        None => shifted_mean.neg()?,
    };
    Ok((scale, shift))
}

/// Folds an inference batch norm into the preceding convolution:
///
/// `W' = W · scale` (per output channel), `b' = b · scale + shift`, with
/// `scale` and `shift` from [`batch_norm_scale_shift`] (so `b' = (b − μ) · s
/// + β`), and a missing conv bias taken as 0. The arithmetic is done in f64
/// whatever the model's dtype, and the results are cast back to the
/// weight's dtype (so f16/bf16 models lose no precision in the fold itself).
/// Returns `(W', b')`.
pub fn fold_conv_batch_norm(
    weight: &Tensor,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dtype = weight.dtype();
    let (scale, shift) = batch_norm_scale_shift(running_mean, running_var, gamma, beta, eps)?;
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

    /// The fold equals the formula worked by hand for two channels.
    #[test]
    fn folds_by_hand_example() {
        let weight = t(&[1.0, 2.0, 3.0, 4.0]).reshape((2, 2, 1, 1)).unwrap();
        let (w, b) = fold_conv_batch_norm(
            &weight,
            Some(&t(&[0.5, -1.0])),
            &t(&[1.0, 2.0]),
            &t(&[3.0, 0.0]),
            Some(&t(&[2.0, 3.0])),
            Some(&t(&[0.25, 0.0])),
            1.0,
        )
        .unwrap();
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
        let (w, b) = fold_conv_batch_norm(&weight, None, &t(&[3.0]), &t(&[3.0]), None, None, 1.0).unwrap();
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
        let (w, b) = fold_conv_batch_norm(&weight, None, &v, &v, None, None, 1e-5).unwrap();
        assert_eq!((w.dtype(), b.dtype()), (DType::F16, DType::F16));
    }
}
