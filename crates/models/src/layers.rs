//! Leaf layers (candle-nn layers kept with their module path) and `Sequential`.

use crate::error::CandleContext;
use crate::{Frontend, ModelError, Module, ParamKind, ParamSource};
use wick_ir::Conv2dAttrs;

fn key(path: &str, leaf: &str) -> String {
    if path.is_empty() {
        leaf.to_string()
    } else {
        format!("{path}.{leaf}")
    }
}

/// A 2-D convolution: a `candle_nn::Conv2d` and the module path it was loaded from.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Module path, e.g. `layer1.0.conv1`; parameters are `{path}.weight` / `{path}.bias`.
    pub path: String,
    /// The candle-nn layer.
    pub inner: candle_nn::Conv2d,
}

/// Shape of a convolution to load: `in -> out` channels, square kernel, symmetric stride and padding.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size (square).
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Zero padding on both axes.
    pub padding: usize,
    /// Whether the conv has a bias.
    pub bias: bool,
    /// Channel groups (1: dense; `in_channels`: depthwise).
    pub groups: usize,
}

impl Conv2d {
    /// Loads `{path}.weight` (and `{path}.bias`) for a conv of `spec`.
    pub fn load(params: &mut dyn ParamSource, path: &str, spec: ConvSpec) -> Result<Self, ModelError> {
        let groups = spec.groups.max(1);
        let fan_in = spec.in_channels / groups * spec.kernel * spec.kernel;
        let weight = params.param(
            &key(path, "weight"),
            &[spec.out_channels, spec.in_channels / groups, spec.kernel, spec.kernel],
            ParamKind::ConvWeight { fan_in },
        )?;
        let bias = if spec.bias {
            Some(params.param(&key(path, "bias"), &[spec.out_channels], ParamKind::ConvBias { fan_in })?)
        } else {
            None
        };
        let config = candle_nn::Conv2dConfig {
            padding: spec.padding,
            stride: spec.stride,
            groups,
            ..Default::default()
        };
        Ok(Self {
            path: path.to_string(),
            inner: candle_nn::Conv2d::new(weight, bias, config),
        })
    }

    /// The layer's attributes in IR form.
    pub fn attrs(&self) -> Conv2dAttrs {
        let c = self.inner.config();
        Conv2dAttrs {
            stride: [c.stride; 2],
            padding: [c.padding; 2],
            dilation: [c.dilation; 2],
            groups: c.groups,
        }
    }
}

/// An inference-mode 2-D batch norm: a `candle_nn::BatchNorm` and its module path.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Module path; parameters are `{path}.running_mean`, `.running_var`, `.weight`, `.bias`.
    pub path: String,
    /// The candle-nn layer.
    pub inner: candle_nn::BatchNorm,
}

impl BatchNorm {
    /// Loads an affine batch norm over `channels` with PyTorch's default eps 1e-5.
    pub fn load(params: &mut dyn ParamSource, path: &str, channels: usize) -> Result<Self, ModelError> {
        Self::load_with_eps(params, path, channels, 1e-5)
    }

    /// Loads an affine batch norm over `channels` with `eps` (MobileNetV3 uses 1e-3).
    pub fn load_with_eps(
        params: &mut dyn ParamSource,
        path: &str,
        channels: usize,
        eps: f64,
    ) -> Result<Self, ModelError> {
        let shape = [channels];
        let running_mean = params.param(&key(path, "running_mean"), &shape, ParamKind::RunningMean)?;
        let running_var = params.param(&key(path, "running_var"), &shape, ParamKind::RunningVar)?;
        let weight = params.param(&key(path, "weight"), &shape, ParamKind::BatchNormWeight)?;
        let bias = params.param(&key(path, "bias"), &shape, ParamKind::BatchNormBias)?;
        let inner = candle_nn::BatchNorm::new(channels, running_mean, running_var, weight, bias, eps).context(path)?;
        Ok(Self {
            path: path.to_string(),
            inner,
        })
    }
}

/// A fully connected layer: a `candle_nn::Linear` and its module path.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path; parameters are `{path}.weight` `[out, in]` and `{path}.bias`.
    pub path: String,
    /// The candle-nn layer.
    pub inner: candle_nn::Linear,
}

impl Linear {
    /// Loads a `in -> out` linear layer with bias.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self, ModelError> {
        let kind = ParamKind::LinearWeight { fan_in: in_features };
        let weight = params.param(&key(path, "weight"), &[out_features, in_features], kind)?;
        let bias = params.param(
            &key(path, "bias"),
            &[out_features],
            ParamKind::LinearBias { fan_in: in_features },
        )?;
        Ok(Self {
            path: path.to_string(),
            inner: candle_nn::Linear::new(weight, Some(bias)),
        })
    }
}

/// A max-pool module (torchvision semantics: -inf padding, floor mode).
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    /// Module path.
    pub path: String,
    /// Window `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Padding `[h, w]`.
    pub padding: [usize; 2],
}

/// A ReLU module.
#[derive(Debug, Clone)]
pub struct Relu {
    /// Module path.
    pub path: String,
}

/// One entry of a [`Sequential`].
#[derive(Debug, Clone)]
pub enum SequentialLayer {
    /// A convolution.
    Conv2d(Conv2d),
    /// A batch norm.
    BatchNorm(BatchNorm),
    /// A ReLU.
    Relu(Relu),
}

/// `nn.Sequential`: layers applied in order, named `{path}.0`, `{path}.1`, ...
#[derive(Debug, Clone)]
pub struct Sequential {
    /// The layers.
    pub layers: Vec<SequentialLayer>,
}

impl Module for Conv2d {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        frontend.conv2d(self, &x)
    }
}

impl Module for BatchNorm {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        frontend.batch_norm(self, &x)
    }
}

impl Module for Relu {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        frontend.relu(&self.path, &x)
    }
}

impl Module for Sequential {
    fn forward<F: Frontend>(&self, frontend: &mut F, mut x: F::Value) -> Result<F::Value, ModelError> {
        for layer in &self.layers {
            x = match layer {
                SequentialLayer::Conv2d(l) => l.forward(frontend, x)?,
                SequentialLayer::BatchNorm(l) => l.forward(frontend, x)?,
                SequentialLayer::Relu(l) => l.forward(frontend, x)?,
            };
        }
        Ok(x)
    }
}

/// Joins a parent path and a child name.
pub(crate) fn child(path: &str, name: &str) -> String {
    key(path, name)
}
