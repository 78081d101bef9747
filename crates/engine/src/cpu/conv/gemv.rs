//! A 1×1 conv whose output planes are 1×1 (squeeze-and-excitation's
//! squeeze after the global average pool) as dot products: `y[n][o] =
//! act(Σ_c W[o][c] · x[n][c] + b[o] (+ r[n][o]))` on the linear layer's
//! kernel, the weights `[O, C]` packed in its panels and streamed once per
//! five images.
//!
//! The panel GEMM computes 16 columns per micro-tile: on a 1×1 plane 15 of
//! them are padding. Chosen for the squeeze (more inputs than outputs),
//! where each dot product is long: EfficientNet-B0's SE convs took 0.43 ->
//! 0.27 ms at batch 1 and 2.4 -> 1.7-1.8 ms at batch 10 on Zen 4 (per-node
//! profile; ONNX Runtime 0.19 at batch 1); and, since the linear kernel
//! reads packed panels, for shallow excitations
//! ([`crate::cpu::GEMV_MAX_SHALLOW_DEPTH`]). Other plane sizes are computed
//! too (every CPU conv takes any input shape): pixels become rows of a
//! product on a transposed copy.

use super::{output, ConvSpec};
use crate::cpu::activation;
use crate::cpu::data::with_cpu_f32;
use crate::cpu::epilogue::{value, Epilogue};
use crate::cpu::gemm::Isa;
use crate::cpu::linear::CpuLinear;
use crate::cpu::output::Output;
use crate::cpu::recycle;
use candle_core::{bail, Tensor};

/// A 1×1 conv as dot products.
#[derive(Debug)]
pub(crate) struct GemvConv {
    spec: ConvSpec,
    /// The weights as a linear layer without bias (the epilogue adds it).
    linear: CpuLinear,
    epilogue: Epilogue,
    isa: Isa,
}

impl GemvConv {
    /// Keeps `weight` (`[O, C, 1, 1]`, f32) for `spec` (a 1×1 conv, stride
    /// 1, no padding, one group) on path `isa`.
    pub(crate) fn new(spec: ConvSpec, weight: &Tensor, epilogue: Epilogue, isa: Isa) -> candle_core::Result<Self> {
        if !super::pointwise::PointwiseConv::applies(&spec) {
            bail!(
                "a conv as dot products needs a 1x1 kernel, stride 1, no padding and one group, got {:?} {:?}",
                spec.kernel,
                spec.attrs
            )
        }
        let weight = weight.reshape((spec.out_channels, spec.in_channels))?;
        Ok(Self {
            spec,
            linear: CpuLinear::new(&weight, None, isa)?,
            epilogue,
            isa,
        })
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// output's shape) before the activation.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let (plane, outs) = (shape.out_plane(), shape.out_channels);
        // `[N·H·W, C]`: the pixels as rows (the input itself on 1×1 planes).
        let rows = match plane {
            1 => call.x,
            _ => call.x.flatten_from(2)?.transpose(1, 2)?.contiguous()?,
        };
        let activation = self.epilogue.activation();
        with_cpu_f32(
            "conv as dot products",
            &rows,
            call.residual.as_ref(),
            |input, residual| {
                // `[N, H·W, O]`, sums only. On 1×1 planes they become the
                // output, so from the forward's pool, where the output goes
                // back (`recycle::MAX_BUFFERS`; a small request takes only a
                // small buffer); otherwise an intermediate, from the heap.
                let buffer = match plane {
                    1 => recycle::take(shape.batch.saturating_mul(outs)).unwrap_or_default(),
                    _ => Vec::new(),
                };
                let sums = self.linear.products(input, shape.batch * plane, buffer)?;
                if plane == 1 {
                    // `[N, O]` is the output's layout: bias and residual
                    // value by value, the activation on the path's vectors
                    // (one sigmoid at a time took most of EfficientNet's
                    // squeeze convs at batch 10).
                    let mut values = sums;
                    for (image, row) in values.chunks_exact_mut(outs).enumerate() {
                        for (o, v) in row.iter_mut().enumerate() {
                            *v += self.epilogue.bias(o);
                            if let Some(r) = residual {
                                *v += r[image * outs + o];
                            }
                        }
                    }
                    activation::in_place(self.isa, activation, &mut values);
                    return output(values, shape.out_dims());
                }
                let mut values = Output::new(sums.len(), "conv output")?;
                // `[N, O, H·W]`, through the epilogue.
                for (image, sums) in sums.chunks_exact(plane * outs).enumerate() {
                    for o in 0..outs {
                        let bias = self.epilogue.bias(o);
                        let at = (image * outs + o) * plane;
                        values.extend((0..plane).map(|p| {
                            let r = residual.map(|r| r[at + p]);
                            value(sums[p * outs + o], bias, r, activation)
                        }));
                    }
                }
                values.into_tensor(&shape.out_dims())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::{random_case, RandomCase};
    use candle_core::Device;
    use proptest::prelude::*;
    use wick_ir::Conv2dAttrs;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals candle's conv + bias + residual + activation,
        /// on 1×1 planes (the case it is chosen for) and larger ones.
        #[test]
        fn matches_candle(
            batch in 1usize..6,
            channels in 1usize..40,
            out_channels in 1usize..40,
            [height, width] in [1usize..4, 1usize..4],
            residual in any::<bool>(),
            activation in proptest::option::of(0usize..6),
        ) {
            let attrs = Conv2dAttrs::default();
            let dims = [batch, channels, height, width];
            let RandomCase { x, w, b, residual: r, activation, want } =
                random_case(dims, [out_channels, channels, 1, 1], attrs, activation, residual);
            let spec = ConvSpec::of(&w, attrs).unwrap();
            for isa in Isa::available() {
                let epilogue = Epilogue::new(Some(&b), out_channels, activation).unwrap().on(isa);
                let got = GemvConv::new(spec, &w, epilogue, isa).unwrap().run(&x, r.as_ref()).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * channels as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    /// Kernels other than 1×1 stride 1 unpadded are refused; wrong channel
    /// counts are an error; an empty batch gives an empty output.
    #[test]
    fn refuses_what_it_does_not_compute() {
        let d = Device::Cpu;
        let w = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &d).unwrap();
        let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
        let epilogue = Epilogue::new(None, 4, None).unwrap();
        assert!(GemvConv::new(spec, &w, epilogue.clone(), Isa::Scalar).is_err());
        let w = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &d).unwrap();
        let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
        let conv = GemvConv::new(spec, &w, epilogue, Isa::Scalar).unwrap();
        let x = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, None).is_err());
        let empty = Tensor::zeros((0, 2, 1, 1), candle_core::DType::F32, &d).unwrap();
        assert_eq!(conv.run(&empty, None).unwrap().dims(), [0, 4, 1, 1]);
    }
}
