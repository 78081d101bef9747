//! The fused conv epilogue as an in-place candle custom op: `y = act(y +
//! bias[c] (+ residual))` in one pass over an NCHW f32 convolution output.
//! On CUDA it is one kernel launch (`cuda/epilogue.cu`, committed as PTX)
//! instead of candle's broadcast add, residual add and ReLU (three passes,
//! two temporaries). Its CPU implementation is wick's one CPU epilogue
//! ([`crate::cpu::epilogue`]), the reference the CUDA kernel mirrors, and
//! lets the op's checks and indexing be tested anywhere.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// Applies the epilogue in place to `y` (`[N, C, H, W]`, f32, contiguous and
/// owned by the caller): adds `bias` (`[C]`) and `residual` (`y`'s shape),
/// then ReLU when `relu`.
pub(crate) fn apply(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<()> {
    let op = ConvEpilogue { relu };
    match residual {
        None => y.inplace_op2(bias, &op),
        Some(r) => y.inplace_op3(bias, r, &op),
    }
}

/// `y += bias[c] (+ residual)`, then ReLU: an [`InplaceOp2`] without a
/// residual, an [`InplaceOp3`] with one.
struct ConvEpilogue {
    relu: bool,
}

impl ConvEpilogue {
    fn operands<'a, S>(&self, bias: (&'a S, &'a Layout), residual: Option<(&'a S, &'a Layout)>) -> Operands<'a, S> {
        Operands {
            bias,
            residual,
            relu: self.relu,
        }
    }
}

/// The epilogue's read-only operands on one backend's storage `S`.
struct Operands<'a, S> {
    bias: (&'a S, &'a Layout),
    residual: Option<(&'a S, &'a Layout)>,
    relu: bool,
}

/// `(n, channels, plane)` after checking the operands: `y` a contiguous
/// rank-4 value, `bias` `[C]` contiguous, `residual` (if any) `y`'s
/// contiguous shape. Errors name what was expected.
fn geometry<S>(y: &Layout, operands: &Operands<'_, S>) -> Result<(usize, usize, usize)> {
    let &[_, channels, h, w] = y.dims() else {
        bail!("conv epilogue: output must be NCHW, got {:?}", y.dims())
    };
    if !y.is_contiguous() {
        bail!("conv epilogue: output must be contiguous")
    }
    let bias = operands.bias.1;
    if bias.dims() != [channels] || !bias.is_contiguous() {
        bail!(
            "conv epilogue: bias must be [{channels}] contiguous, got {:?}",
            bias.dims()
        )
    }
    if let Some((_, r)) = operands.residual {
        if r.dims() != y.dims() || !r.is_contiguous() {
            bail!(
                "conv epilogue: residual must be {:?} contiguous, got {:?}",
                y.dims(),
                r.dims()
            )
        }
    }
    Ok((y.shape().elem_count(), channels, h * w))
}

fn cpu_epilogue(y: &mut CpuStorage, yl: &Layout, operands: Operands<'_, CpuStorage>) -> Result<()> {
    let (n, channels, plane) = geometry(yl, &operands)?;
    let (CpuStorage::F32(y), (CpuStorage::F32(bias), bl)) = (y, operands.bias) else {
        bail!("conv epilogue: f32 operands only")
    };
    let y = &mut y[yl.start_offset()..][..n];
    let bias = &bias[bl.start_offset()..][..channels];
    let residual = match operands.residual {
        None => None,
        Some((CpuStorage::F32(r), l)) => Some(&r[l.start_offset()..][..n]),
        Some(_) => bail!("conv epilogue: f32 operands only"),
    };
    if plane == 0 {
        return Ok(());
    }
    // One (image, channel) plane at a time: plane `i` is channel `i % C`.
    for (i, values) in y.chunks_mut(plane).enumerate() {
        let residual = residual.map(|r| &r[i * plane..][..plane]);
        let activation = operands.relu.then_some(wick_ir::Activation::Relu);
        crate::cpu::epilogue::in_place(values, bias[i % channels], residual, activation);
    }
    Ok(())
}

impl InplaceOp2 for ConvEpilogue {
    fn name(&self) -> &'static str {
        "wick-conv-epilogue"
    }

    fn cpu_fwd(&self, y: &mut CpuStorage, yl: &Layout, bias: &CpuStorage, bl: &Layout) -> Result<()> {
        cpu_epilogue(y, yl, self.operands((bias, bl), None))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout, bias: &CudaStorage, bl: &Layout) -> Result<()> {
        cuda::launch(y, yl, self.operands((bias, bl), None))
    }
}

impl InplaceOp3 for ConvEpilogue {
    fn name(&self) -> &'static str {
        "wick-conv-epilogue"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        yl: &Layout,
        bias: &CpuStorage,
        bl: &Layout,
        residual: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let operands = self.operands((bias, bl), Some((residual, rl)));
        cpu_epilogue(y, yl, operands)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut CudaStorage,
        yl: &Layout,
        bias: &CudaStorage,
        bl: &Layout,
        residual: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        let operands = self.operands((bias, bl), Some((residual, rl)));
        cuda::launch(y, yl, operands)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{geometry, Operands};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaStorage, Layout, Result};

    const PTX: &str = include_str!("../../cuda/epilogue.ptx");

    pub(super) fn launch(y: &mut CudaStorage, yl: &Layout, operands: Operands<'_, CudaStorage>) -> Result<()> {
        let (n, channels, plane) = geometry(yl, &operands)?;
        let (Ok(channels), Ok(plane)) = (u32::try_from(channels), u32::try_from(plane)) else {
            bail!("conv epilogue: {channels} channels of {plane} values exceed the kernel's u32 indices")
        };
        let (residual, relu) = (operands.residual, operands.relu);
        let (bias, bl) = operands.bias;
        let dev = y.device().clone();
        let name = if residual.is_some() {
            "wick_bias_residual_act_f32"
        } else {
            "wick_bias_act_f32"
        };
        let func = dev.get_or_load_custom_func(name, "wick_epilogue", PTX)?;
        let bias = bias.as_cuda_slice::<f32>()?.slice(bl.start_offset()..);
        let residual = match residual {
            Some((r, l)) => Some(r.as_cuda_slice::<f32>()?.slice(l.start_offset()..)),
            None => None,
        };
        let y = y.as_cuda_slice_mut::<f32>()?;
        let mut y = y.slice_mut(yl.start_offset()..);
        let (n64, relu) = (n as u64, i32::from(relu));
        // Grid-stride loop in the kernel: cap the grid, any n is covered.
        let cfg = LaunchConfig::for_num_elems(n.min(1 << 30) as u32);
        let mut builder = func.builder();
        builder.arg(&mut y);
        builder.arg(&bias);
        if let Some(r) = &residual {
            builder.arg(r);
        }
        builder.arg(&n64);
        builder.arg(&channels);
        builder.arg(&plane);
        builder.arg(&relu);
        // SAFETY: the argument list matches the kernel's signature in
        // cuda/epilogue.cu (y, bias, [residual,] n, channels, plane, relu);
        // `geometry` checked that y and residual hold n contiguous f32 from
        // their offsets and bias holds `channels`, so every index the kernel
        // forms (i < n, c < channels) is in bounds.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One pass equals candle's three (bias, residual, ReLU) on the CPU
    /// implementation, which the CUDA kernel mirrors index for index.
    #[test]
    fn equals_candle_ops() {
        let d = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 3, &d).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &d).unwrap();
        let with_bias = y.broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap()).unwrap();
        for (residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut want = with_bias.clone();
            if residual {
                want = (want + &r).unwrap();
            }
            if relu {
                want = want.relu().unwrap();
            }
            let got = y.copy().unwrap();
            apply(&got, &b, residual.then_some(&r), relu).unwrap();
            assert!(crate::test_util::max_abs_diff(&got, &want) < 1e-6, "{residual} {relu}");
        }
    }

    #[test]
    fn rejects_mismatched_operands() {
        let d = Device::Cpu;
        let y = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &d).unwrap();
        let wrong_bias = Tensor::zeros(4, candle_core::DType::F32, &d).unwrap();
        assert!(apply(&y, &wrong_bias, None, true).is_err());
        let bias = Tensor::zeros(3, candle_core::DType::F32, &d).unwrap();
        let wrong_residual = Tensor::zeros((1, 3, 2, 1), candle_core::DType::F32, &d).unwrap();
        assert!(apply(&y, &bias, Some(&wrong_residual), true).is_err());
        let flat = Tensor::zeros(12, candle_core::DType::F32, &d).unwrap();
        assert!(apply(&flat, &bias, None, false).is_err());
    }
}
