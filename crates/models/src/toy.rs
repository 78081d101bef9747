//! The tutorial's toy model `M` and its Sequential model, defined with the same nesting as in PyTorch.

use crate::layers::{child, ConvSpec};
use crate::{BatchNorm, Conv2d, Frontend, ModelError, Module, ParamSource, Relu, Sequential, SequentialLayer};

/// `WrappedBatchNorm`: a module whose only child `mod` is a `BatchNorm2d(1)`.
#[derive(Debug, Clone)]
pub struct WrappedBatchNorm {
    /// The wrapped batch norm (path `{parent}.mod`).
    pub module: BatchNorm,
}

impl Module for WrappedBatchNorm {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        self.module.forward(frontend, x)
    }
}

/// The tutorial's model `M`: conv1, bn1, conv2, nested = Sequential(BatchNorm2d(1),
/// Conv2d(1,1,1)), wrapped = WrappedBatchNorm. Tracing flattens it into three
/// conv → batch_norm pairs.
#[derive(Debug, Clone)]
pub struct Toy {
    /// `Conv2d(1, 1, 1)`.
    pub conv1: Conv2d,
    /// `BatchNorm2d(1)`.
    pub bn1: BatchNorm,
    /// `Conv2d(1, 1, 1)`.
    pub conv2: Conv2d,
    /// `Sequential(BatchNorm2d(1), Conv2d(1, 1, 1))`.
    pub nested: Sequential,
    /// `WrappedBatchNorm()`.
    pub wrapped: WrappedBatchNorm,
}

const ONE_BY_ONE: ConvSpec = ConvSpec {
    in_channels: 1,
    out_channels: 1,
    kernel: 1,
    stride: 1,
    padding: 0,
    bias: true,
    groups: 1,
};

impl Toy {
    /// Loads `conv1.*`, `bn1.*`, `conv2.*`, `nested.0.*`, `nested.1.*`, `wrapped.mod.*`.
    pub fn load(params: &mut dyn ParamSource) -> Result<Self, ModelError> {
        Ok(Self {
            conv1: Conv2d::load(params, "conv1", ONE_BY_ONE)?,
            bn1: BatchNorm::load(params, "bn1", 1)?,
            conv2: Conv2d::load(params, "conv2", ONE_BY_ONE)?,
            nested: Sequential {
                layers: vec![
                    SequentialLayer::BatchNorm(BatchNorm::load(params, "nested.0", 1)?),
                    SequentialLayer::Conv2d(Conv2d::load(params, "nested.1", ONE_BY_ONE)?),
                ],
            },
            wrapped: WrappedBatchNorm {
                module: BatchNorm::load(params, "wrapped.mod", 1)?,
            },
        })
    }
}

impl Module for Toy {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let x = self.conv1.forward(frontend, x)?;
        let x = self.bn1.forward(frontend, x)?;
        let x = self.conv2.forward(frontend, x)?;
        let x = self.nested.forward(frontend, x)?;
        self.wrapped.forward(frontend, x)
    }
}

/// The tutorial's `Sequential(Conv2d(3,16,5), BatchNorm2d(16), ReLU(), Conv2d(16,32,7), BatchNorm2d(32))`,
/// with parameters `0.*`, `1.*`, `3.*`, `4.*`.
pub fn toy_sequential(params: &mut dyn ParamSource) -> Result<Sequential, ModelError> {
    let conv = |in_channels, out_channels, kernel| ConvSpec {
        in_channels,
        out_channels,
        kernel,
        stride: 1,
        padding: 0,
        bias: true,
        groups: 1,
    };
    Ok(Sequential {
        layers: vec![
            SequentialLayer::Conv2d(Conv2d::load(params, &child("", "0"), conv(3, 16, 5))?),
            SequentialLayer::BatchNorm(BatchNorm::load(params, "1", 16)?),
            SequentialLayer::Relu(Relu { path: "2".into() }),
            SequentialLayer::Conv2d(Conv2d::load(params, "3", conv(16, 32, 7))?),
            SequentialLayer::BatchNorm(BatchNorm::load(params, "4", 32)?),
        ],
    })
}
