//! torchvision's `Conv2dNormActivation` (conv without bias → batch norm →
//! optional activation), the unit MobileNets and EfficientNets are built of.

use crate::layers::{child, ConvSpec};
use crate::{BatchNorm, Conv2d, Frontend, ModelError, Module, ParamSource};
use wick_ir::Activation;

/// A bias-free `kernel`×`kernel` conv padded to keep the size at stride 1
/// (torchvision's `(kernel - 1) / 2`), with `groups` groups.
pub fn same_conv(in_channels: usize, out_channels: usize, kernel: usize, stride: usize, groups: usize) -> ConvSpec {
    ConvSpec {
        in_channels,
        out_channels,
        kernel,
        stride,
        padding: (kernel - 1) / 2,
        bias: false,
        groups,
    }
}

/// Conv (`{path}.0`) → batch norm (`{path}.1`) → optional activation (`{path}.2`).
#[derive(Debug, Clone)]
pub struct ConvNormActivation {
    /// The conv.
    pub conv: Conv2d,
    /// Its batch norm.
    pub bn: BatchNorm,
    /// The activation, if any.
    pub activation: Option<Activation>,
    /// Module path.
    pub path: String,
}

impl ConvNormActivation {
    /// Loads `{path}.0` as `spec` and `{path}.1` with `eps`.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        spec: ConvSpec,
        eps: f64,
        activation: Option<Activation>,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            conv: Conv2d::load(params, &child(path, "0"), spec)?,
            bn: BatchNorm::load_with_eps(params, &child(path, "1"), spec.out_channels, eps)?,
            activation,
            path: path.to_string(),
        })
    }
}

impl Module for ConvNormActivation {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let y = frontend.conv2d(&self.conv, &x)?;
        let y = frontend.batch_norm(&self.bn, &y)?;
        match self.activation {
            Some(activation) => frontend.activation(&child(&self.path, "2"), activation, &y),
            None => Ok(y),
        }
    }
}
