//! Steps run with candle's device-generic ops: every op on every device
//! and dtype (the CPU f32 convs and pool have kernels of their own in
//! `crate::cpu`), with the fused conv's epilogue as one in-place op
//! ([`epilogue`], a CUDA kernel on GPUs). Operands are named by role.

pub(crate) mod depthwise;
pub(crate) mod epilogue;

use crate::kernel::Slot;
use candle_core::{DType, Device, Tensor, D};
use wick_ir::{Activation, Conv2dAttrs, MaxPool2dAttrs};
use wick_passes::BatchNormParams;

/// A fused conv on candle's ops: the conv, then bias (+ residual) (+ ReLU)
/// as one in-place pass for f32 ([`epilogue`]), as candle ops otherwise;
/// then the max pool, if any.
#[derive(Debug)]
pub(crate) struct FusedConv {
    pub(crate) attrs: Conv2dAttrs,
    pub(crate) activation: Option<Activation>,
    pub(crate) pool: Option<MaxPool2dAttrs>,
    pub(crate) x: Slot,
    pub(crate) weight: Slot,
    pub(crate) bias: Slot,
    pub(crate) residual: Option<Slot>,
    /// `[N, C, 1, 1]` factors of `x`'s channels, applied first (as the
    /// unfused `mul` would: the same values).
    pub(crate) scale: Option<Slot>,
}

impl FusedConv {
    fn run(&self, value: impl Fn(Slot) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let (x, weight, bias) = (value(self.x)?, value(self.weight)?, value(self.bias)?);
        let x = match self.scale {
            Some(scale) => x.broadcast_mul(&value(scale)?)?,
            None => x,
        };
        let residual = self.residual.map(&value).transpose()?;
        let y = if x.dtype() == DType::F32 && bias.dtype() == DType::F32 {
            // The convolution without bias, then bias (+ residual, + ReLU)
            // in one in-place pass (one kernel launch on CUDA).
            let y = conv2d(&self.attrs, &x, &weight, None)?.contiguous()?;
            // ReLU in the one pass (the CUDA kernel's); another activation after it.
            let relu = self.activation == Some(Activation::Relu);
            epilogue::apply(&y, &bias, residual.as_ref(), relu)?;
            match self.activation {
                Some(activation) if !relu => activation.apply(&y)?,
                _ => y,
            }
        } else {
            let y = conv2d(&self.attrs, &x, &weight, Some(&bias))?;
            let y = match residual {
                Some(residual) => (y + residual)?,
                None => y,
            };
            match self.activation {
                Some(activation) => activation.apply(&y)?,
                None => y,
            }
        };
        match &self.pool {
            Some(pool) => max_pool2d(&y, pool),
            None => Ok(y),
        }
    }
}

/// One step on candle's ops, with its operands by role.
#[derive(Debug)]
pub(crate) enum CandleOp {
    /// candle's conv2d (symmetric per call), with zero pre-padding when the
    /// padding differs between axes, and a broadcast bias add.
    Conv2d {
        attrs: Conv2dAttrs,
        x: Slot,
        weight: Slot,
        bias: Option<Slot>,
    },
    /// The conv, its epilogue and the fused max pool.
    FusedConv2d(FusedConv),
    /// `x · scale + shift` with both precomputed from constant statistics
    /// (`[1, C, 1, ...]`, the node's dtype).
    BatchNormFolded {
        scale: Tensor,
        shift: Tensor,
        x: Slot,
    },
    /// Batch norm whose statistics arrive at run time.
    BatchNorm {
        eps: f64,
        x: Slot,
        mean: Slot,
        var: Slot,
        /// `(weight, bias)`, when affine.
        affine: Option<(Slot, Slot)>,
    },
    /// An elementwise activation ([`Activation::apply`]).
    Activation {
        activation: Activation,
        x: Slot,
    },
    Add {
        a: Slot,
        b: Slot,
    },
    /// `a · b`, `b` broadcast to `a`.
    Mul {
        a: Slot,
        b: Slot,
    },
    MaxPool2d {
        attrs: MaxPool2dAttrs,
        x: Slot,
    },
    GlobalAvgPool2d {
        x: Slot,
    },
    AvgPool2d {
        attrs: wick_ir::AvgPool2dAttrs,
        x: Slot,
    },
    /// Zeros around the spatial axes, `[top, left, bottom, right]`.
    Pad {
        pads: [usize; 4],
        x: Slot,
    },
    /// The values of `xs` joined along `axis`.
    Concat {
        axis: usize,
        xs: Vec<Slot>,
    },
    /// A flatten: the same data under the node's shape.
    Reshape {
        shape: Vec<usize>,
        x: Slot,
    },
    Linear {
        x: Slot,
        weight: Slot,
        bias: Option<Slot>,
    },
}

impl CandleOp {
    /// The slots the op reads.
    pub(crate) fn reads(&self) -> Vec<Slot> {
        match self {
            CandleOp::Conv2d { x, weight, bias, .. } | CandleOp::Linear { x, weight, bias } => {
                [*x, *weight].into_iter().chain(*bias).collect()
            }
            CandleOp::FusedConv2d(op) => [op.x, op.weight, op.bias]
                .into_iter()
                .chain(op.residual)
                .chain(op.scale)
                .collect(),
            CandleOp::BatchNorm {
                x, mean, var, affine, ..
            } => [*x, *mean, *var]
                .into_iter()
                .chain(affine.iter().flat_map(|&(w, b)| [w, b]))
                .collect(),
            CandleOp::BatchNormFolded { x, .. }
            | CandleOp::Activation { x, .. }
            | CandleOp::MaxPool2d { x, .. }
            | CandleOp::GlobalAvgPool2d { x }
            | CandleOp::AvgPool2d { x, .. }
            | CandleOp::Pad { x, .. }
            | CandleOp::Reshape { x, .. } => vec![*x],
            CandleOp::Concat { xs, .. } => xs.clone(),
            CandleOp::Add { a, b } | CandleOp::Mul { a, b } => vec![*a, *b],
        }
    }

    /// Runs on the values `value` returns for each slot.
    pub(crate) fn run(&self, value: impl Fn(Slot) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let optional = |slot: Option<Slot>| slot.map(&value).transpose();
        match self {
            CandleOp::Conv2d { attrs, x, weight, bias } => {
                conv2d(attrs, &value(*x)?, &value(*weight)?, optional(*bias)?.as_ref())
            }
            CandleOp::FusedConv2d(op) => op.run(value),
            CandleOp::BatchNormFolded { scale, shift, x } => value(*x)?.broadcast_mul(scale)?.broadcast_add(shift),
            CandleOp::BatchNorm {
                eps,
                x,
                mean,
                var,
                affine,
            } => {
                let x = value(*x)?;
                let (running_mean, running_var) = (value(*mean)?, value(*var)?);
                let affine = affine
                    .map(|(w, b)| Ok::<_, candle_core::Error>((value(w)?, value(b)?)))
                    .transpose()?;
                let affine = affine.as_ref().map(|(w, b)| (w, b));
                let params = BatchNormParams::new(&running_mean, &running_var, affine, *eps);
                let (scale, shift) = batch_norm_affine(&params, x.dtype(), x.rank(), x.device())?;
                x.broadcast_mul(&scale)?.broadcast_add(&shift)
            }
            CandleOp::Activation { activation, x } => activation.apply(&value(*x)?),
            CandleOp::Add { a, b } => value(*a)? + value(*b)?,
            CandleOp::Mul { a, b } => value(*a)?.broadcast_mul(&value(*b)?),
            CandleOp::MaxPool2d { attrs, x } => max_pool2d(&value(*x)?, attrs),
            CandleOp::GlobalAvgPool2d { x } => value(*x)?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2),
            CandleOp::AvgPool2d { attrs, x } => {
                let ([kh, kw], [sh, sw]) = (attrs.kernel, attrs.stride);
                value(*x)?.avg_pool2d_with_stride((kh, kw), (sh, sw))
            }
            CandleOp::Pad {
                pads: [top, left, bottom, right],
                x,
            } => value(*x)?
                .pad_with_zeros(2, *top, *bottom)?
                .pad_with_zeros(3, *left, *right),
            CandleOp::Concat { axis, xs } => {
                let values = xs.iter().map(|&x| value(x)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&values, *axis)
            }
            CandleOp::Reshape { shape, x } => value(*x)?.reshape(shape.as_slice()),
            CandleOp::Linear { x, weight, bias } => linear(&value(*x)?, &value(*weight)?, optional(*bias)?.as_ref()),
        }
    }
}

/// Batch norm's `(scale, shift)` ([`BatchNormParams::scale_shift`]) in
/// `dtype`, shaped `[1, C, 1, ...]` to broadcast over a rank-`rank` value.
pub(crate) fn batch_norm_affine(
    params: &BatchNormParams<'_>,
    dtype: DType,
    rank: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (scale, shift) = params.scale_shift()?;
    let shape = channel_shape(scale.dim(0)?, rank);
    // On the step's device: the statistics are the graph's constants,
    // wherever they were built (a CPU-built graph compiled for a GPU).
    Ok((
        scale.to_dtype(dtype)?.reshape(shape.clone())?.to_device(device)?,
        shift.to_dtype(dtype)?.reshape(shape)?.to_device(device)?,
    ))
}

/// Shape `[1, C, 1, ...]` for broadcasting a per-channel vector over a value of rank `rank`.
fn channel_shape(channels: usize, rank: usize) -> Vec<usize> {
    let mut shape = vec![1; rank.max(2)];
    shape[1] = channels;
    shape
}

/// candle's conv2d with per-axis padding (pre-padded with zeros when the
/// axes differ) and a broadcast bias; stride and dilation must be equal on
/// both axes (checked when the step is chosen). An f32 depthwise conv runs
/// as one op ([`depthwise`]) instead of candle's conv per group.
fn conv2d(attrs: &Conv2dAttrs, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = if depthwise::applies(attrs, x, weight) {
        depthwise::conv2d(attrs, x, weight)?
    } else {
        candle_conv2d(attrs, x, weight)?
    };
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape(channel_shape(bias.dim(0)?, 4))?),
        None => Ok(y),
    }
}

/// candle's own conv2d, pre-padded with zeros when the padding differs between axes.
fn candle_conv2d(attrs: &Conv2dAttrs, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    let [ph, pw] = attrs.padding;
    let padding = if ph == pw {
        ph
    } else {
        x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
        0
    };
    x.conv2d(weight, padding, attrs.stride[0], attrs.dilation[0], attrs.groups)
}

/// `x @ weightᵀ (+ bias)` over the last dimension of `x`.
fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let mut out_shape = x.dims().to_vec();
    let rows = x.elem_count().checked_div(in_features).unwrap_or(0);
    if let Some(last) = out_shape.last_mut() {
        *last = out_features;
    }
    let y = x.reshape((rows, in_features))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    y.reshape(out_shape)
}

/// Max pool with implicit −∞ padding (candle's own has no padding): on a
/// padded copy. The candle path's pool, and the reference the CPU pool is
/// tested against.
pub(crate) fn max_pool2d(x: &Tensor, attrs: &MaxPool2dAttrs) -> candle_core::Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let Some(out) = attrs.output_size([height, width]) else {
        candle_core::bail!("max_pool2d window {:?} does not fit {:?}", attrs.kernel, x.dims())
    };
    let mut padded = x.clone();
    for (axis, len) in [height, width].into_iter().enumerate() {
        let dim = 2 + axis;
        let pad = attrs.padding[axis];
        // After the right padding, ceil mode's last window needs more
        // -inf columns to lie inside (candle pools in floor mode).
        let needed = (out[axis] - 1) * attrs.stride[axis] + attrs.kernel[axis];
        let extra = needed.saturating_sub(len + 2 * pad);
        let edge = |size: usize| -> candle_core::Result<Option<Tensor>> {
            if size == 0 {
                return Ok(None);
            }
            let mut dims = padded.dims().to_vec();
            dims[dim] = size;
            Ok(Some(
                Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())?,
            ))
        };
        let (left, right) = (edge(pad)?, edge(pad + extra)?);
        let parts: Vec<&Tensor> = left.iter().chain([&padded]).chain(right.iter()).collect();
        if parts.len() > 1 {
            padded = Tensor::cat(&parts, dim)?;
        }
    }
    padded.max_pool2d_with_stride((attrs.kernel[0], attrs.kernel[1]), (attrs.stride[0], attrs.stride[1]))
}
