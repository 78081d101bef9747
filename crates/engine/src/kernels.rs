//! Per-node kernels: candle operations chosen once at compile time, with
//! constant-only work (batch-norm scale and shift) precomputed.

use crate::cpu_conv::PackedConv;
use crate::direct_conv::DirectConv;
use crate::error::AtNode;
use crate::gemm_kernel::Isa;
use crate::winograd::{f2::WinogradF2Conv, WinogradConv};
use crate::EngineError;
use candle_core::{DType, Device, Tensor, D};
use wick_ir::{Conv2dAttrs, FusedConv2dAttrs, Graph, MaxPool2dAttrs, Node, Op};

/// What one step executes.
#[derive(Debug, Clone)]
pub(crate) enum Kernel {
    /// candle's conv2d (symmetric per call), with zero pre-padding when the
    /// padding differs between axes, and a broadcast bias add.
    Conv2d {
        attrs: Conv2dAttrs,
    },
    /// wick's own CPU f32 convolution with weights packed at compile time
    /// and the bias (residual, ReLU) applied in the same pass. Reads the
    /// input and, if present, the residual.
    CpuConv {
        conv: Box<CpuConv>,
        residual: bool,
    },
    /// candle's conv2d with the epilogue as one in-place pass for f32
    /// (`epilogue_op`, a CUDA kernel on GPUs), as candle ops otherwise.
    FusedConv2d {
        attrs: Conv2dAttrs,
        relu: bool,
        pool: Option<MaxPool2dAttrs>,
    },
    /// `x * scale + shift` with both precomputed from constant statistics.
    BatchNormFolded {
        scale: Tensor,
        shift: Tensor,
    },
    /// Batch norm whose statistics are computed at run time (non-constant parameters).
    BatchNorm {
        eps: f64,
    },
    Relu,
    Add,
    MaxPool2d(MaxPool2dAttrs),
    /// wick's own CPU f32 max-pool (padding handled in the window, no copy).
    CpuMaxPool2d(MaxPool2dAttrs),
    GlobalAvgPool2d,
    Reshape {
        shape: Vec<usize>,
    },
    Linear,
}

/// The CPU f32 convolution algorithms, chosen per node at compile time.
#[derive(Debug, Clone)]
pub(crate) enum CpuConv {
    /// Winograd F(4×4, 3×3): 3×3, stride 1, one group, enough tiles.
    Winograd(WinogradConv),
    /// Winograd F(2×2, 3×3): the same convs with many channels and few
    /// pixels (batch 1 at 7×7).
    WinogradF2(WinogradF2Conv),
    /// Blocked implicit GEMM: any other one-group convolution.
    Direct(DirectConv),
    /// Per-group im2col + `gemm` crate: grouped and depthwise convolutions,
    /// then the fused max pool, if any, as a separate pass.
    Grouped(PackedConv, Option<MaxPool2dAttrs>),
}

impl CpuConv {
    /// The algorithm, as logged at compile time (and checked by tests).
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            CpuConv::Winograd(_) => "winograd-f4x4",
            CpuConv::WinogradF2(_) => "winograd-f2x2",
            CpuConv::Direct(conv) if conv.lanes() => "direct-lanes",
            CpuConv::Direct(_) => "direct-panels",
            CpuConv::Grouped(..) => "grouped",
        }
    }

    fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match self {
            CpuConv::Winograd(conv) => conv.run(x, residual),
            CpuConv::WinogradF2(conv) => conv.run(x, residual),
            CpuConv::Direct(conv) => conv.run(x, residual),
            CpuConv::Grouped(conv, None) => conv.run(x, residual),
            CpuConv::Grouped(conv, Some(pool)) => crate::cpu_pool::max_pool2d(&conv.run(x, residual)?, pool),
        }
    }
}

fn unsupported(node: &Node, device: &Device, reason: String) -> EngineError {
    EngineError::Unsupported {
        node: node.name.clone(),
        op: node.op.name(),
        device: format!("{:?}", device.location()),
        reason,
    }
}

/// Shape `[1, C, 1, ...]` for broadcasting a per-channel vector over a value of rank `rank`.
fn channel_shape(channels: usize, rank: usize) -> Vec<usize> {
    let mut shape = vec![1; rank];
    shape[1] = channels;
    shape
}

/// `(scale, shift)` with `scale = weight / sqrt(var + eps)` and
/// `shift = bias - mean * scale`, computed in f32 (f64 for f64 models) and cast
/// to `dtype`; missing affine parameters are 1 and 0.
pub(crate) fn batch_norm_scale_shift(
    params: &[&Tensor],
    eps: f64,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let work = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let mean = params[0].to_dtype(work)?;
    let var = params[1].to_dtype(work)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let (scale, shift) = match params.get(2..4) {
        Some([weight, bias]) => {
            let scale = (weight.to_dtype(work)? * &inv_std)?;
            let shift = (bias.to_dtype(work)? - (&mean * &scale)?)?;
            (scale, shift)
        }
        _ => {
            let shift = (&mean * &inv_std)?.neg()?;
            (inv_std, shift)
        }
    };
    Ok((scale.to_dtype(dtype)?, shift.to_dtype(dtype)?))
}

impl Kernel {
    /// Chooses the kernel for `node`; `constant(i)` is the data of operand `i` if it is a constant.
    pub(crate) fn select(graph: &Graph, node: &Node, device: &Device) -> Result<Kernel, EngineError> {
        let constant = |i: usize| {
            let operand = graph.node(node.inputs[i]);
            (operand.op == Op::Constant)
                .then(|| graph.constant_data(&operand.name))
                .flatten()
        };
        Ok(match &node.op {
            Op::Input | Op::Constant => {
                return Err(unsupported(
                    node,
                    device,
                    "inputs and constants are not executed".into(),
                ))
            }
            Op::Conv2d(attrs) | Op::FusedConv2d(FusedConv2dAttrs { conv: attrs, .. }) => {
                let (relu, fused, pool) = match &node.op {
                    Op::FusedConv2d(fused) => (fused.relu, true, fused.pool),
                    _ => (false, false, None),
                };
                let residual = fused && node.inputs.len() == 4;
                let parameter_count = node.inputs.len() - 1 - usize::from(residual);
                let parameters: Option<Vec<&Tensor>> = (1..=parameter_count).map(constant).collect();
                if let (true, DType::F32, Some(parameters)) = (device.is_cpu(), node.fact.dtype, parameters) {
                    let [_, in_channels, kh, kw] = parameters[0].dims() else {
                        return Err(unsupported(node, device, "conv weight must be rank 4".into()));
                    };
                    let (weight, bias, isa) = (parameters[0], parameters.get(1).copied(), Isa::detect());
                    // (With a fused pool the node's fact is the pooled shape, and
                    // only the direct conv fuses the pool; Winograd is not chosen.)
                    let conv = if pool.is_none()
                        && WinogradConv::pays_off([*kh, *kw], attrs, *in_channels, &node.fact.shape)
                    {
                        CpuConv::Winograd(WinogradConv::new(weight, bias, attrs.padding, relu, isa).at(&node.name)?)
                    } else if pool.is_none()
                        && WinogradF2Conv::pays_off([*kh, *kw], attrs, *in_channels, &node.fact.shape)
                    {
                        CpuConv::WinogradF2(WinogradF2Conv::new(weight, bias, attrs.padding, relu, isa).at(&node.name)?)
                    } else if attrs.groups == 1 {
                        // N·OH·OW; with a fused pool the fact is pooled, but the
                        // hint only picks the weights' layout, and pooled convs
                        // keep the default one.
                        let pixels = match node.fact.shape.as_slice() {
                            [n, _, h, w] => n * h * w,
                            _ => usize::MAX,
                        };
                        CpuConv::Direct(DirectConv::new(weight, bias, *attrs, relu, pool, isa, pixels).at(&node.name)?)
                    } else {
                        CpuConv::Grouped(PackedConv::new(weight, bias, *attrs, relu).at(&node.name)?, pool)
                    };
                    tracing::debug!(node = %node.name, kernel = conv.describe(), "cpu conv kernel");
                    return Ok(Kernel::CpuConv {
                        conv: Box::new(conv),
                        residual,
                    });
                }
                if attrs.stride[0] != attrs.stride[1] || attrs.dilation[0] != attrs.dilation[1] {
                    return Err(unsupported(
                        node,
                        device,
                        format!(
                            "candle's conv2d needs equal stride and dilation on both axes, got stride {:?}, dilation {:?}",
                            attrs.stride, attrs.dilation
                        ),
                    ));
                }
                if fused {
                    Kernel::FusedConv2d {
                        attrs: *attrs,
                        relu,
                        pool,
                    }
                } else {
                    Kernel::Conv2d { attrs: *attrs }
                }
            }
            Op::BatchNorm(attrs) => {
                let params: Option<Vec<&Tensor>> = (1..node.inputs.len()).map(constant).collect();
                match params {
                    Some(params) => {
                        let channels = node.fact.shape[1];
                        let shape = channel_shape(channels, node.fact.rank());
                        let (scale, shift) = batch_norm_scale_shift(&params, attrs.eps, node.fact.dtype)
                            .and_then(|(s, b)| Ok((s.reshape(shape.clone())?, b.reshape(shape)?)))
                            .at(&node.name)?;
                        Kernel::BatchNormFolded { scale, shift }
                    }
                    None => Kernel::BatchNorm { eps: attrs.eps },
                }
            }
            Op::Relu => Kernel::Relu,
            Op::Add => Kernel::Add,
            Op::MaxPool2d(attrs) if device.is_cpu() && node.fact.dtype == DType::F32 => Kernel::CpuMaxPool2d(*attrs),
            Op::MaxPool2d(attrs) => Kernel::MaxPool2d(*attrs),
            Op::GlobalAvgPool2d => Kernel::GlobalAvgPool2d,
            Op::Flatten(_) => Kernel::Reshape {
                shape: node.fact.shape.clone(),
            },
            Op::Linear => Kernel::Linear,
        })
    }

    /// Which of the node's operands the kernel reads at run time, when not
    /// all of them (the others were packed at compile time).
    pub(crate) fn runtime_operands(&self) -> Option<&'static [usize]> {
        match self {
            Kernel::CpuConv { residual: false, .. } => Some(&[0]),
            Kernel::CpuConv { residual: true, .. } => Some(&[0, 3]),
            _ => None,
        }
    }

    /// Runs the kernel on its operands (in IR operand order).
    pub(crate) fn run(&self, args: &[&Tensor]) -> candle_core::Result<Tensor> {
        match self {
            Kernel::Conv2d { attrs } => {
                let mut x = args[0].clone();
                let [ph, pw] = attrs.padding;
                let padding = if ph == pw {
                    ph
                } else {
                    x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
                    0
                };
                let y = x.conv2d(args[1], padding, attrs.stride[0], attrs.dilation[0], attrs.groups)?;
                match args.get(2) {
                    Some(bias) => y.broadcast_add(&bias.reshape(channel_shape(bias.dim(0)?, 4))?),
                    None => Ok(y),
                }
            }
            Kernel::CpuConv { conv, .. } => conv.run(args[0], args.get(1).copied()),
            Kernel::FusedConv2d { attrs, relu, pool } => {
                let y = if args[0].dtype() == DType::F32 && args[2].dtype() == DType::F32 {
                    // The convolution without bias, then bias (+ residual, + ReLU)
                    // in one in-place pass (one kernel launch on CUDA).
                    let y = Kernel::Conv2d { attrs: *attrs }.run(&args[..2])?.contiguous()?;
                    crate::epilogue_op::apply(&y, args[2], args.get(3).copied(), *relu)?;
                    y
                } else {
                    let y = Kernel::Conv2d { attrs: *attrs }.run(&args[..3])?;
                    let y = match args.get(3) {
                        Some(residual) => (y + *residual)?,
                        None => y,
                    };
                    if *relu {
                        y.relu()?
                    } else {
                        y
                    }
                };
                match pool {
                    Some(pool) => max_pool2d(&y, pool),
                    None => Ok(y),
                }
            }
            Kernel::BatchNormFolded { scale, shift } => args[0].broadcast_mul(scale)?.broadcast_add(shift),
            Kernel::BatchNorm { eps } => {
                let x = args[0];
                let shape = channel_shape(x.dim(1)?, x.rank());
                let (scale, shift) = batch_norm_scale_shift(&args[1..], *eps, x.dtype())?;
                x.broadcast_mul(&scale.reshape(shape.clone())?)?
                    .broadcast_add(&shift.reshape(shape)?)
            }
            Kernel::Relu => args[0].relu(),
            Kernel::Add => args[0] + args[1],
            Kernel::MaxPool2d(attrs) => max_pool2d(args[0], attrs),
            Kernel::CpuMaxPool2d(attrs) => crate::cpu_pool::max_pool2d(args[0], attrs),
            Kernel::GlobalAvgPool2d => args[0].mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2),
            Kernel::Reshape { shape } => args[0].reshape(shape.as_slice()),
            Kernel::Linear => {
                let x = args[0];
                let (out_features, in_features) = args[1].dims2()?;
                let mut out_shape = x.dims().to_vec();
                let rows = x.elem_count() / in_features;
                *out_shape.last_mut().expect("linear input has rank >= 1 (verified)") = out_features;
                let y = x.reshape((rows, in_features))?.matmul(&args[1].t()?)?;
                let y = match args.get(2) {
                    Some(bias) => y.broadcast_add(bias)?,
                    None => y,
                };
                y.reshape(out_shape)
            }
        }
    }
}

/// Max pool with implicit -inf padding (candle's own has no padding).
fn max_pool2d(x: &Tensor, attrs: &MaxPool2dAttrs) -> candle_core::Result<Tensor> {
    let mut padded = x.clone();
    for (dim, pad) in [(2, attrs.padding[0]), (3, attrs.padding[1])] {
        if pad == 0 {
            continue;
        }
        let mut edge = padded.dims().to_vec();
        edge[dim] = pad;
        let fill = Tensor::full(f32::NEG_INFINITY, edge, x.device())?.to_dtype(x.dtype())?;
        padded = Tensor::cat(&[&fill, &padded, &fill], dim)?;
    }
    padded.max_pool2d_with_stride((attrs.kernel[0], attrs.kernel[1]), (attrs.stride[0], attrs.stride[1]))
}
