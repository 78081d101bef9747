//! The closed set of ops, their attributes, and output-fact inference.

use crate::{OpKind, OpRole, TensorFact};

/// Attributes of a 2-D convolution (PyTorch semantics, NCHW, OIHW weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dAttrs {
    /// Stride per spatial axis `[h, w]`, each >= 1.
    pub stride: [usize; 2],
    /// Zero padding added on both sides of each spatial axis `[h, w]`.
    pub padding: [usize; 2],
    /// Dilation per spatial axis `[h, w]`, each >= 1.
    pub dilation: [usize; 2],
    /// Number of groups; input and output channels must both divide by it.
    pub groups: usize,
}

impl Default for Conv2dAttrs {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// Attributes of a convolution with a fused epilogue.
///
/// Inputs are `(x, weight, bias[, residual][, scale])`; the output is
/// `conv(x · scale) + bias [+ residual]`, then the activation when one is
/// set, then a max pool when `pool` is set (the output fact is the pooled
/// one; a residual has the convolution's shape). `scale`, present when
/// `input_scale` is set, is `[N, C, 1, 1]`: one factor per image and input
/// channel (squeeze-and-excitation's), which a conv can fold into its
/// weights per image instead of rescaling its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FusedConv2dAttrs {
    /// The convolution's own attributes.
    pub conv: Conv2dAttrs,
    /// The activation applied after the bias (and residual), if any.
    pub activation: Option<crate::Activation>,
    /// A max pool applied last, if any.
    pub pool: Option<MaxPool2dAttrs>,
    /// Whether the last input scales the conv's input channels per image.
    pub input_scale: bool,
}

/// A fused conv's inputs by role (see [`FusedConv2dAttrs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedConvInputs<T> {
    /// The conv's input.
    pub x: T,
    /// `[O, C/groups, kh, kw]`.
    pub weight: T,
    /// `[O]`.
    pub bias: T,
    /// Added before the activation, of the conv output's shape.
    pub residual: Option<T>,
    /// `[N, C, 1, 1]`, multiplying `x` per image and channel.
    pub scale: Option<T>,
}

impl FusedConv2dAttrs {
    /// `inputs` by role, or `None` when their number does not fit these
    /// attributes (3 or 4, one more with `input_scale`).
    pub fn inputs<T: Copy>(&self, inputs: &[T]) -> Option<FusedConvInputs<T>> {
        let (scale, rest) = match self.input_scale {
            true => inputs.split_last().map(|(s, rest)| (Some(*s), rest))?,
            false => (None, inputs),
        };
        match *rest {
            [x, weight, bias] => Some(FusedConvInputs {
                x,
                weight,
                bias,
                residual: None,
                scale,
            }),
            [x, weight, bias, residual] => Some(FusedConvInputs {
                x,
                weight,
                bias,
                residual: Some(residual),
                scale,
            }),
            _ => None,
        }
    }
}

/// Attributes of an inference-mode batch norm over channel axis 1.
///
/// Inputs are `(x, running_mean, running_var)` or, with affine parameters,
/// `(x, running_mean, running_var, weight, bias)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormAttrs {
    /// Added to the running variance before the square root; must be >= 0.
    pub eps: f64,
}

/// Attributes of a 2-D max pool as torchvision uses it (dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaxPool2dAttrs {
    /// Window size `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Implicit negative-infinity padding `[h, w]`, at most half the window.
    pub padding: [usize; 2],
    /// Round the output size up (PyTorch's `ceil_mode`, SqueezeNet's
    /// pools): a last window that starts inside the input (or its left
    /// padding) and runs past its end counts, clipped.
    pub ceil_mode: bool,
}

/// Attributes of a 2-D average pool without padding (floor mode): the
/// transitions of torchvision's DenseNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AvgPool2dAttrs {
    /// Window size `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
}

/// Attributes of a zero padding of an NCHW value's spatial axes, each side
/// on its own (what a symmetric conv padding cannot express: ONNX's
/// asymmetric `pads` and `SAME_*` auto-padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PadAttrs {
    /// Zeros added `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

/// Attributes of a concatenation of values along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConcatAttrs {
    /// The axis the values are joined along; every other dimension agrees.
    pub axis: usize,
}

/// Attributes of a flatten: dimensions `start_dim..` are merged into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlattenAttrs {
    /// First dimension merged.
    pub start_dim: usize,
}

/// One IR operation. Closed on purpose: adding an op is a compile error
/// everywhere it must be handled.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A graph input; its fact is declared in the graph signature.
    Input,
    /// A weight, named by its safetensors key; data is held by the graph.
    Constant,
    /// `conv2d(x, weight[, bias])`.
    Conv2d(Conv2dAttrs),
    /// `fused_conv2d(x, weight, bias[, residual][, scale])`: a conv with its
    /// epilogue (bias, residual add, activation, max pool) and its input's
    /// per-channel scale in one op, produced by the fusion passes.
    FusedConv2d(FusedConv2dAttrs),
    /// `batch_norm(x, running_mean, running_var[, weight, bias])` in inference form.
    BatchNorm(BatchNormAttrs),
    /// Elementwise `max(x, 0)`.
    Relu,
    /// Elementwise `min(max(x, 0), 6)` (PyTorch's `ReLU6`, ONNX `Clip(0, 6)`).
    Relu6,
    /// Elementwise `x · relu6(x + 3) / 6` (PyTorch's `Hardswish`).
    HardSwish,
    /// Elementwise `relu6(x + 3) / 6` (PyTorch's `Hardsigmoid`).
    HardSigmoid,
    /// Elementwise `1 / (1 + e^-x)`.
    Sigmoid,
    /// Elementwise `x · sigmoid(x)` (PyTorch's `SiLU`, swish).
    Silu,
    /// Elementwise `a + b` of two values of equal fact.
    Add,
    /// Elementwise `a · b`, `b` broadcast to `a`'s shape: of `a`'s rank,
    /// each dimension `a`'s or 1 (squeeze-and-excitation's
    /// `[N,C,H,W] · [N,C,1,1]`).
    Mul,
    /// 2-D max pool over NCHW.
    MaxPool2d(MaxPool2dAttrs),
    /// Adaptive average pool to 1x1: `[N,C,H,W] -> [N,C,1,1]`.
    GlobalAvgPool2d,
    /// 2-D average pool over NCHW, no padding.
    AvgPool2d(AvgPool2dAttrs),
    /// Zero padding of the spatial axes, each side on its own.
    Pad(PadAttrs),
    /// `concat(x1, x2, ...)` along an axis (DenseNet's and SqueezeNet's
    /// channel concatenations): one or more inputs.
    Concat(ConcatAttrs),
    /// Merges dimensions `start_dim..` into one.
    Flatten(FlattenAttrs),
    /// `x @ weight^T (+ bias)` over the last dimension of `x`.
    Linear,
}

impl Op {
    /// The op's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Input => OpKind::Input,
            Op::Constant => OpKind::Constant,
            Op::Conv2d(_) => OpKind::Conv2d,
            Op::FusedConv2d(_) => OpKind::FusedConv2d,
            Op::BatchNorm(_) => OpKind::BatchNorm,
            Op::Relu => OpKind::Relu,
            Op::Relu6 => OpKind::Relu6,
            Op::HardSwish => OpKind::HardSwish,
            Op::HardSigmoid => OpKind::HardSigmoid,
            Op::Sigmoid => OpKind::Sigmoid,
            Op::Silu => OpKind::Silu,
            Op::Add => OpKind::Add,
            Op::Mul => OpKind::Mul,
            Op::MaxPool2d(_) => OpKind::MaxPool2d,
            Op::GlobalAvgPool2d => OpKind::GlobalAvgPool2d,
            Op::AvgPool2d(_) => OpKind::AvgPool2d,
            Op::Concat(_) => OpKind::Concat,
            Op::Pad(_) => OpKind::Pad,
            Op::Flatten(_) => OpKind::Flatten,
            Op::Linear => OpKind::Linear,
        }
    }

    /// The op's name in IR text.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// What the node is in a graph.
    pub fn role(&self) -> OpRole {
        self.kind().role()
    }

    /// Accepted numbers of inputs; empty for any number from one on
    /// ([`Op::Concat`]).
    pub fn arity(&self) -> &'static [usize] {
        match self {
            Op::Input | Op::Constant => &[0],
            Op::Conv2d(_) | Op::Linear => &[2, 3],
            Op::BatchNorm(_) => &[3, 5],
            Op::FusedConv2d(attrs) if attrs.input_scale => &[4, 5],
            Op::FusedConv2d(_) => &[3, 4],
            Op::Relu
            | Op::Relu6
            | Op::HardSwish
            | Op::HardSigmoid
            | Op::Sigmoid
            | Op::Silu
            | Op::MaxPool2d(_)
            | Op::GlobalAvgPool2d
            | Op::AvgPool2d(_)
            | Op::Pad(_)
            | Op::Flatten(_) => &[1],
            Op::Add | Op::Mul => &[2],
            Op::Concat(_) => &[],
        }
    }

    /// Which inputs are parameters (weights) rather than activations: they
    /// are expected to be constants, although the IR does not require it.
    pub fn is_parameter_input(&self, index: usize) -> bool {
        match self {
            Op::Conv2d(_) | Op::BatchNorm(_) | Op::Linear => index > 0,
            Op::FusedConv2d(_) => index == 1 || index == 2,
            Op::Input
            | Op::Constant
            | Op::Relu
            | Op::Relu6
            | Op::HardSwish
            | Op::HardSigmoid
            | Op::Sigmoid
            | Op::Silu
            | Op::Add
            | Op::Mul
            | Op::MaxPool2d(_)
            | Op::GlobalAvgPool2d
            | Op::AvgPool2d(_)
            | Op::Concat(_)
            | Op::Pad(_)
            | Op::Flatten(_) => false,
        }
    }

    /// Infers the output fact from the input facts, or says what is wrong.
    ///
    /// `Input` and `Constant` have no inputs and declare their fact; for them
    /// this returns an error.
    pub fn infer(&self, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
        let arity = self.arity();
        let accepted = match arity {
            [] => !inputs.is_empty(),
            counts => counts.contains(&inputs.len()),
        };
        if !accepted {
            let expected = match arity {
                [] => "at least 1".to_string(),
                counts => counts.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" or "),
            };
            return Err(format!("expected {expected} input(s), got {}", inputs.len()));
        }
        for (i, input) in inputs.iter().enumerate() {
            if input.shape.contains(&0) {
                return Err(format!(
                    "input {i} {input} has a zero-sized dimension; empty tensors are not supported"
                ));
            }
        }
        if let Some(first) = inputs.first() {
            for (i, other) in inputs.iter().enumerate().skip(1) {
                if other.dtype != first.dtype {
                    return Err(format!(
                        "input {i} has dtype {}, expected {} like input 0",
                        other.dtype.as_str(),
                        first.dtype.as_str()
                    ));
                }
            }
            if !first.dtype.is_float() && !matches!(self, Op::Input | Op::Constant) {
                return Err(format!("expected a floating-point dtype, got {}", first.dtype.as_str()));
            }
        }
        match self {
            Op::Input | Op::Constant => Err("declares its fact; nothing to infer".into()),
            Op::Conv2d(attrs) => infer_conv2d(attrs, inputs),
            Op::FusedConv2d(attrs) => {
                let operands = attrs.inputs(inputs).ok_or("operands do not fit the attributes")?;
                let out = infer_conv2d(&attrs.conv, &[operands.x, operands.weight, operands.bias])?;
                if let Some(residual) = operands.residual {
                    if residual.shape != out.shape {
                        return Err(format!("residual must be {out}, got {residual}"));
                    }
                }
                if let Some(scale) = operands.scale {
                    let x = operands.x;
                    let expected = [x.shape[0], x.shape[1], 1, 1];
                    if scale.shape != expected || scale.dtype != x.dtype {
                        return Err(format!(
                            "scale must be {} {expected:?} (one factor per image and input channel), got {scale}",
                            x.dtype.as_str()
                        ));
                    }
                }
                match &attrs.pool {
                    Some(pool) => infer_max_pool2d(pool, &out),
                    None => Ok(out),
                }
            }
            Op::BatchNorm(attrs) => infer_batch_norm(attrs, inputs),
            Op::Relu | Op::Relu6 | Op::HardSwish | Op::HardSigmoid | Op::Sigmoid | Op::Silu => Ok(inputs[0].clone()),
            Op::Mul => {
                let (a, b) = (&inputs[0].shape, &inputs[1].shape);
                let broadcasts = a.len() == b.len() && a.iter().zip(b).all(|(&a, &b)| b == a || b == 1);
                if !broadcasts {
                    return Err(format!(
                        "the second operand must broadcast to the first (same rank, each dimension equal or 1), got {} and {}",
                        inputs[0], inputs[1]
                    ));
                }
                Ok(inputs[0].clone())
            }
            Op::Add => {
                if inputs[0].shape != inputs[1].shape {
                    return Err(format!(
                        "operands must have equal shapes, got {} and {}",
                        inputs[0], inputs[1]
                    ));
                }
                Ok(inputs[0].clone())
            }
            Op::MaxPool2d(attrs) => infer_max_pool2d(attrs, inputs[0]),
            Op::GlobalAvgPool2d => {
                let x = expect_rank(inputs[0], 4, "input")?;
                Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], 1, 1]))
            }
            Op::AvgPool2d(attrs) => {
                check_positive(&attrs.kernel, "kernel")?;
                check_positive(&attrs.stride, "stride")?;
                let x = expect_rank(inputs[0], 4, "input")?;
                let axis = |i: usize| windowed_len(x[2 + i], attrs.kernel[i], attrs.stride[i], 0, 1);
                match (axis(0), axis(1)) {
                    (Some(oh), Some(ow)) => Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], oh, ow])),
                    _ => Err(format!("window {:?} does not fit input {}", attrs.kernel, inputs[0])),
                }
            }
            Op::Concat(ConcatAttrs { axis }) => infer_concat(*axis, inputs),
            Op::Pad(PadAttrs {
                pads: [top, left, bottom, right],
            }) => {
                let x = expect_rank(inputs[0], 4, "input")?;
                let grow = |len: usize, a: usize, b: usize| len.checked_add(a)?.checked_add(b);
                match (grow(x[2], *top, *bottom), grow(x[3], *left, *right)) {
                    (Some(h), Some(w)) => Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], h, w])),
                    _ => Err(format!(
                        "padding {:?} of {} overflows",
                        [top, left, bottom, right],
                        inputs[0]
                    )),
                }
            }
            Op::Flatten(FlattenAttrs { start_dim }) => {
                let x = &inputs[0].shape;
                if *start_dim >= x.len() {
                    return Err(format!(
                        "start_dim {start_dim} out of range for rank-{} input {}",
                        x.len(),
                        inputs[0]
                    ));
                }
                let Some(merged) = x[*start_dim..].iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
                    return Err(format!("merged dimension of {} overflows", inputs[0]));
                };
                let mut shape = x[..*start_dim].to_vec();
                shape.push(merged);
                Ok(TensorFact::new(inputs[0].dtype, shape))
            }
            Op::Linear => infer_linear(inputs),
        }
    }
}

fn expect_rank<'a>(fact: &'a TensorFact, rank: usize, what: &str) -> Result<&'a [usize], String> {
    if fact.rank() != rank {
        return Err(format!("{what} must have rank {rank}, got {fact}"));
    }
    Ok(&fact.shape)
}

fn expect_vector(fact: &TensorFact, len: usize, what: &str) -> Result<(), String> {
    if fact.shape != [len] {
        return Err(format!("{what} must have shape [{len}], got {fact}"));
    }
    Ok(())
}

fn check_positive(values: &[usize], what: &str) -> Result<(), String> {
    if values.contains(&0) {
        return Err(format!("{what} must be >= 1, got {values:?}"));
    }
    Ok(())
}

/// Length of a sliding-window output along one axis (convolution or pool,
/// floor mode): `(len + 2·padding − dilation·(kernel − 1) − 1) / stride + 1`.
/// `None` when the dilated window does not fit the padded input, when
/// `kernel` or `stride` is 0, or when a step of the formula overflows or
/// the padded extent exceeds `isize::MAX` (kernels index it with signed
/// offsets).
pub fn windowed_len(len: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> Option<usize> {
    let span = dilation.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)?;
    let padded = padding.checked_mul(2)?.checked_add(len)?;
    if padded > isize::MAX as usize {
        return None;
    }
    Some(padded.checked_sub(span)?.checked_div(stride)? + 1)
}

impl Conv2dAttrs {
    /// Output `[height, width]` of this convolution with a `kernel` window
    /// on an `[height, width]` input; `None` when it does not fit (see [`windowed_len`]).
    pub fn output_size(&self, kernel: [usize; 2], [height, width]: [usize; 2]) -> Option<[usize; 2]> {
        let axis =
            |len: usize, i: usize| windowed_len(len, kernel[i], self.stride[i], self.padding[i], self.dilation[i]);
        Some([axis(height, 0)?, axis(width, 1)?])
    }
}

impl MaxPool2dAttrs {
    /// Output `[height, width]` of this pool on an `[height, width]` input;
    /// `None` when the window does not fit (see [`windowed_len`]). In ceil
    /// mode, PyTorch's rule: one more window when the floor leaves input
    /// uncovered, unless it would start past the input and left padding.
    pub fn output_size(&self, [height, width]: [usize; 2]) -> Option<[usize; 2]> {
        let axis = |len: usize, i: usize| {
            let (kernel, stride, padding) = (self.kernel[i], self.stride[i], self.padding[i]);
            let floor = windowed_len(len, kernel, stride, padding, 1)?;
            let covered = (floor - 1).checked_mul(stride)?.checked_add(kernel)?;
            let padded = len.checked_add(padding.checked_mul(2)?)?;
            let extra = self.ceil_mode && covered < padded && floor.checked_mul(stride)? < len.checked_add(padding)?;
            Some(floor + usize::from(extra))
        };
        Some([axis(height, 0)?, axis(width, 1)?])
    }
}

fn infer_conv2d(attrs: &Conv2dAttrs, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    check_positive(&attrs.stride, "stride")?;
    check_positive(&attrs.dilation, "dilation")?;
    check_positive(&[attrs.groups], "groups")?;
    let x = expect_rank(inputs[0], 4, "input")?;
    let w = expect_rank(inputs[1], 4, "weight")?;
    let (n, c, h, wd) = (x[0], x[1], x[2], x[3]);
    let (o, ci, kh, kw) = (w[0], w[1], w[2], w[3]);
    let g = attrs.groups;
    if c % g != 0 || o % g != 0 {
        return Err(format!(
            "groups={g} must divide input channels {c} and output channels {o}"
        ));
    }
    if ci.checked_mul(g) != Some(c) {
        return Err(format!(
            "weight {} expects {ci} input channels per group times groups={g}, input {} has {c}",
            inputs[1], inputs[0]
        ));
    }
    check_positive(&[kh, kw], "kernel size")?;
    if let Some(bias) = inputs.get(2) {
        expect_vector(bias, o, "bias")?;
    }
    match attrs.output_size([kh, kw], [h, wd]) {
        Some([oh, ow]) => Ok(TensorFact::new(inputs[0].dtype, [n, o, oh, ow])),
        None => Err(format!(
            "kernel {kh}x{kw} (dilation {:?}) does not fit input {} with padding {:?}",
            attrs.dilation, inputs[0], attrs.padding
        )),
    }
}

fn infer_batch_norm(attrs: &BatchNormAttrs, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    if !(attrs.eps >= 0.0 && attrs.eps.is_finite()) {
        return Err(format!("eps must be finite and >= 0, got {:?}", attrs.eps));
    }
    let x = &inputs[0].shape;
    if x.len() < 2 {
        return Err(format!("input must have rank >= 2, got {}", inputs[0]));
    }
    let names = ["running_mean", "running_var", "weight", "bias"];
    for (param, name) in inputs[1..].iter().zip(names) {
        expect_vector(param, x[1], name)?;
    }
    Ok(inputs[0].clone())
}

fn infer_max_pool2d(attrs: &MaxPool2dAttrs, input: &TensorFact) -> Result<TensorFact, String> {
    check_positive(&attrs.kernel, "kernel")?;
    check_positive(&attrs.stride, "stride")?;
    for axis in 0..2 {
        if attrs.padding[axis] > attrs.kernel[axis] / 2 {
            return Err(format!(
                "padding {:?} must be at most half of kernel {:?}",
                attrs.padding, attrs.kernel
            ));
        }
    }
    let x = expect_rank(input, 4, "input")?;
    match attrs.output_size([x[2], x[3]]) {
        Some([oh, ow]) => Ok(TensorFact::new(input.dtype, [x[0], x[1], oh, ow])),
        None => Err(format!(
            "window {:?} does not fit input {input} with padding {:?}",
            attrs.kernel, attrs.padding
        )),
    }
}

fn infer_concat(axis: usize, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    let first = &inputs[0].shape;
    if axis >= first.len() {
        return Err(format!(
            "axis {axis} out of range for rank-{} input {}",
            first.len(),
            inputs[0]
        ));
    }
    let mut shape = first.clone();
    for (i, input) in inputs.iter().enumerate().skip(1) {
        let agrees =
            input.shape.len() == first.len() && (0..first.len()).all(|d| d == axis || input.shape[d] == first[d]);
        if !agrees {
            return Err(format!(
                "input {i} {input} must match input 0 {} in every dimension but {axis}",
                inputs[0]
            ));
        }
        shape[axis] = shape[axis]
            .checked_add(input.shape[axis])
            .ok_or_else(|| format!("dimension {axis} of the result overflows"))?;
    }
    Ok(TensorFact::new(inputs[0].dtype, shape))
}

fn infer_linear(inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    let x = &inputs[0].shape;
    let w = expect_rank(inputs[1], 2, "weight")?;
    let Some(&features) = x.last() else {
        return Err(format!("input must have rank >= 1, got {}", inputs[0]));
    };
    if w[1] != features {
        return Err(format!(
            "weight {} expects {} input features, input {} has {features}",
            inputs[1], w[1], inputs[0]
        ));
    }
    if let Some(bias) = inputs.get(2) {
        expect_vector(bias, w[0], "bias")?;
    }
    let mut shape = x.clone();
    *shape.last_mut().expect("rank checked above") = w[0];
    Ok(TensorFact::new(inputs[0].dtype, shape))
}

#[cfg(test)]
mod tests;
