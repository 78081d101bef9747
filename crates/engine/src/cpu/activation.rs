//! The elementwise activations on CPU f32 tensors: one pass, chunks in
//! parallel, each chunk compiled for the instruction-set path (candle's
//! `clamp` makes two passes and two temporaries; ReLU6 on MobileNetV2 took
//! most of its forward that way).

use crate::cpu::data::{output_buffer, with_cpu_f32};
use crate::cpu::gemm::{Isa, IsaBody};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use wick_ir::Activation;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `activation(x)` for a CPU f32 tensor of any shape, on `isa`.
pub(crate) fn activation(isa: Isa, activation: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let len = x.elem_count();
    let mut out = output_buffer(len, "activation output")?;
    with_cpu_f32("CPU activation", &x, None, |data, _| {
        out.extend_from_slice(data);
        Ok(())
    })?;
    out.par_chunks_mut(CHUNK).for_each(|chunk| {
        isa.run(Apply {
            activation,
            values: chunk,
        })
    });
    Tensor::from_vec(out, x.dims(), &Device::Cpu)
}

/// One chunk, in place.
struct Apply<'a> {
    activation: Activation,
    values: &'a mut [f32],
}

impl IsaBody for Apply<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let values = self.values;
        // One loop per activation (a constant in each), so each vectorises
        // on its own.
        match self.activation {
            Activation::Relu => values.iter_mut().for_each(|v| *v = scalar(Activation::Relu, *v)),
            Activation::Relu6 => values.iter_mut().for_each(|v| *v = scalar(Activation::Relu6, *v)),
            Activation::HardSwish => values.iter_mut().for_each(|v| *v = scalar(Activation::HardSwish, *v)),
            Activation::HardSigmoid => values.iter_mut().for_each(|v| *v = scalar(Activation::HardSigmoid, *v)),
            Activation::Sigmoid => values.iter_mut().for_each(|v| *v = scalar(Activation::Sigmoid, *v)),
            Activation::Silu => values.iter_mut().for_each(|v| *v = scalar(Activation::Silu, *v)),
        }
    }
}

/// One value through `activation` in f32, as PyTorch writes it (the one
/// copy of the f32 formulas: this kernel and the conv epilogue use it).
#[inline(always)]
pub(crate) fn scalar(activation: Activation, v: f32) -> f32 {
    match activation {
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
        Activation::HardSwish => v * ((v + 3.0).clamp(0.0, 6.0) / 6.0),
        Activation::HardSigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
        Activation::Sigmoid => sigmoid(v),
        Activation::Silu => v * sigmoid(v),
    }
}

/// `1 / (1 + e^-x)` in f32; 0 for very negative `x` (e^-x is +∞), never NaN
/// for a finite `x`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every activation on every path this CPU has equals the f64
    /// reference within f32 rounding, over saturating values and a size
    /// that is not a whole number of chunks; NaN stays NaN.
    #[test]
    fn matches_reference_on_every_path() {
        let values: Vec<f32> = (0..CHUNK + 1001)
            .map(|i| (i as f32 - 8000.0) / 300.0)
            .chain([-1e30, 1e30, 88.0, -88.0, 0.0, -0.0])
            .collect();
        let x = Tensor::from_vec(values.clone(), values.len(), &Device::Cpu).unwrap();
        for isa in Isa::available() {
            for act in Activation::ALL {
                let got: Vec<f32> = activation(isa, act, &x).unwrap().to_vec1().unwrap();
                for (&v, &g) in values.iter().zip(&got) {
                    let want = act.reference(f64::from(v));
                    let tol = 4.0 * f64::from(f32::EPSILON) * want.abs().max(1.0);
                    assert!(
                        (f64::from(g) - want).abs() <= tol || (want.is_infinite() && f64::from(g) == want),
                        "{isa:?} {act:?} at {v}: {g} vs {want}"
                    );
                }
            }
            let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
            for act in [Activation::Sigmoid, Activation::Silu, Activation::HardSwish] {
                assert!(activation(isa, act, &nan).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
            }
        }
    }
}
