//! The closed set of ops, their attributes, and output-fact inference.

mod attrs;
mod infer;

pub use attrs::{
    windowed_len, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, FusedConv2dAttrs,
    FusedConvInputs, MaxPool2dAttrs, PadAttrs,
};

use crate::{OpKind, OpRole};

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
}

#[cfg(test)]
mod tests;
