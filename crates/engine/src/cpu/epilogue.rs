//! The conv epilogue, once: `y = relu?(x + bias[c] (+ residual))`, the same
//! arithmetic in the same order for every CPU kernel (grouped, direct,
//! pooled, both Winograd transforms) and for the candle path's one-pass op
//! (whose CUDA kernel mirrors it).

use candle_core::{bail, Tensor};

/// One output value: `x + bias (+ residual)`, then ReLU when `relu`.
#[inline(always)]
pub(crate) fn value(x: f32, bias: f32, residual: Option<f32>, relu: bool) -> f32 {
    let v = match residual {
        Some(r) => x + bias + r,
        None => x + bias,
    };
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// `values[i] = relu?(values[i] + bias (+ residual[i]))` over one channel's run.
#[inline(always)]
pub(crate) fn in_place(values: &mut [f32], bias: f32, residual: Option<&[f32]>, relu: bool) {
    match residual {
        Some(residual) => {
            for (v, &r) in values.iter_mut().zip(residual) {
                *v = value(*v, bias, Some(r), relu);
            }
        }
        None => values.iter_mut().for_each(|v| *v = value(*v, bias, None, relu)),
    }
}

/// `out[i] = relu?(src[i] + bias (+ residual[i]))` over one channel's run.
#[inline(always)]
pub(crate) fn write(out: &mut [f32], src: &[f32], bias: f32, residual: Option<&[f32]>, relu: bool) {
    match residual {
        Some(residual) => {
            for ((out, &x), &r) in out.iter_mut().zip(src).zip(residual) {
                *out = value(x, bias, Some(r), relu);
            }
        }
        None => {
            for (out, &x) in out.iter_mut().zip(src) {
                *out = value(x, bias, None, relu);
            }
        }
    }
}

/// [`value`] on a fixed-size row (kept in one vector register).
#[inline(always)]
pub(crate) fn row<const N: usize>(x: [f32; N], bias: f32, residual: Option<&[f32; N]>, relu: bool) -> [f32; N] {
    // Whole-array steps (not `value` per element), the form that stays in
    // one register in the Winograd output transform's inner loop.
    let mut row = x.map(|x| x + bias);
    if let Some(r) = residual {
        for (v, r) in row.iter_mut().zip(r) {
            *v += r;
        }
    }
    if relu {
        row = row.map(|v| v.max(0.0));
    }
    row
}

/// A conv's epilogue as a kernel holds it: the bias per output channel
/// (zeros without one) and whether ReLU follows.
#[derive(Debug, Clone)]
pub(crate) struct Epilogue {
    bias: Vec<f32>,
    relu: bool,
}

impl Epilogue {
    /// `bias` (`[out_channels]`, f32) or zeros; an error when its length differs.
    pub(crate) fn new(bias: Option<&Tensor>, out_channels: usize, relu: bool) -> candle_core::Result<Self> {
        let bias = match bias {
            Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; out_channels],
        };
        if bias.len() != out_channels {
            bail!("conv bias has {} values for {out_channels} output channels", bias.len())
        }
        Ok(Self { bias, relu })
    }

    /// Whether ReLU follows.
    #[inline(always)]
    pub(crate) fn relu(&self) -> bool {
        self.relu
    }

    /// The bias of output channel `channel`.
    #[inline(always)]
    pub(crate) fn bias(&self, channel: usize) -> f32 {
        self.bias[channel]
    }

    /// [`in_place`] for output channel `channel`.
    #[inline(always)]
    pub(crate) fn in_place(&self, channel: usize, values: &mut [f32], residual: Option<&[f32]>) {
        in_place(values, self.bias[channel], residual, self.relu)
    }

    /// [`write()`] for output channel `channel`.
    #[inline(always)]
    pub(crate) fn write(&self, channel: usize, out: &mut [f32], src: &[f32], residual: Option<&[f32]>) {
        write(out, src, self.bias[channel], residual, self.relu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every form computes relu?(x + b + r) with the residual added before the ReLU.
    #[test]
    fn forms_agree() {
        let bias = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        for relu in [false, true] {
            let e = Epilogue::new(Some(&bias), 2, relu).unwrap();
            let (x, r) = ([1.0f32, -3.0, 0.25, 4.0], [0.5f32, 1.0, -1.0, -8.0]);
            let want: Vec<f32> = x
                .iter()
                .zip(&r)
                .map(|(x, r)| {
                    let v = x - 2.0 + r;
                    if relu {
                        v.max(0.0)
                    } else {
                        v
                    }
                })
                .collect();
            let mut a = x;
            e.in_place(1, &mut a, Some(&r));
            let mut b = [0f32; 4];
            e.write(1, &mut b, &x, Some(&r));
            let c = row(x, -2.0, Some(&r), relu);
            let d: Vec<f32> = x.iter().zip(&r).map(|(&x, &r)| value(x, -2.0, Some(r), relu)).collect();
            assert_eq!(
                (a.to_vec(), b.to_vec(), c.to_vec()),
                (want.clone(), want.clone(), want.clone())
            );
            assert_eq!(d, want);
        }
    }

    /// A bias of the wrong length is an error that says so.
    #[test]
    fn bias_length_is_checked() {
        let bias = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        let err = Epilogue::new(Some(&bias), 3, false).unwrap_err();
        assert!(err.to_string().contains("2 values for 3"), "{err}");
        assert_eq!(Epilogue::new(None, 3, true).unwrap().bias(2), 0.0);
    }
}
