//! The mobile inverted bottleneck of MobileNetV3 and EfficientNet: [1x1
//! expansion →] k×k depthwise → [squeeze-and-excitation →] linear 1x1
//! projection [+ input], with torchvision's names (`{path}.block.{j}`).

use crate::conv_norm::{same_conv, ConvNormActivation};
use crate::layers::{child, ConvSpec};
use crate::{Conv2d, Frontend, ModelError, Module, ParamSource};
use wick_ir::Activation;

/// torchvision's `_make_divisible(v, 8)`: `v` rounded to the nearest
/// multiple of 8 (at least 8), never more than 10% below `v`.
pub fn make_divisible(v: usize) -> usize {
    let rounded = ((v + 4) / 8 * 8).max(8);
    if rounded * 10 < v * 9 {
        rounded + 8
    } else {
        rounded
    }
}

/// torchvision's `SqueezeExcitation`: global average pool → 1x1 conv
/// (`fc1`) → activation → 1x1 conv (`fc2`) → scale activation, and the
/// input multiplied by that per-channel scale.
#[derive(Debug, Clone)]
pub struct SqueezeExcitation {
    /// Module path.
    pub path: String,
    /// Squeeze: channels → squeeze channels, with bias.
    pub fc1: Conv2d,
    /// Excite: squeeze channels → channels, with bias.
    pub fc2: Conv2d,
    /// After `fc1` (ReLU in MobileNetV3, SiLU in EfficientNet).
    pub activation: Activation,
    /// After `fc2` (hardsigmoid in MobileNetV3, sigmoid in EfficientNet).
    pub scale_activation: Activation,
}

impl SqueezeExcitation {
    /// Loads `{path}.fc1` and `{path}.fc2` for `channels` squeezed to `squeeze`.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        channels: usize,
        squeeze: usize,
        activation: Activation,
        scale_activation: Activation,
    ) -> Result<Self, ModelError> {
        let one_by_one = |in_channels, out_channels| ConvSpec {
            in_channels,
            out_channels,
            kernel: 1,
            stride: 1,
            padding: 0,
            bias: true,
            groups: 1,
        };
        Ok(Self {
            path: path.to_string(),
            fc1: Conv2d::load(params, &child(path, "fc1"), one_by_one(channels, squeeze))?,
            fc2: Conv2d::load(params, &child(path, "fc2"), one_by_one(squeeze, channels))?,
            activation,
            scale_activation,
        })
    }
}

impl Module for SqueezeExcitation {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let s = frontend.global_avg_pool2d(&child(&self.path, "avgpool"), &x)?;
        let s = frontend.conv2d(&self.fc1, &s)?;
        let s = frontend.activation(&child(&self.path, "activation"), self.activation, &s)?;
        let s = frontend.conv2d(&self.fc2, &s)?;
        let s = frontend.activation(&child(&self.path, "scale_activation"), self.scale_activation, &s)?;
        frontend.mul(&child(&self.path, "mul"), &x, &s)
    }
}

/// One layer of an [`MbConv`] block.
#[derive(Debug, Clone)]
pub enum MbLayer {
    /// Expansion, depthwise or projection.
    ConvNorm(ConvNormActivation),
    /// Squeeze-and-excitation.
    Se(SqueezeExcitation),
}

/// The shape of one [`MbConv`] block.
#[derive(Debug, Clone, Copy)]
pub struct MbConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Channels after the expansion (no expansion when equal to the input's).
    pub expanded: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Depthwise stride.
    pub stride: usize,
    /// Squeeze-and-excitation's squeeze channels, when the block has one.
    pub squeeze: Option<usize>,
    /// Activation of the expansion and depthwise convs.
    pub activation: Activation,
    /// Squeeze-and-excitation's inner and scale activations.
    pub se_activations: (Activation, Activation),
    /// Batch-norm eps.
    pub eps: f64,
}

/// A mobile inverted bottleneck block (`InvertedResidual` of MobileNetV3,
/// `MBConv` of EfficientNet; stochastic depth is the identity in inference).
#[derive(Debug, Clone)]
pub struct MbConv {
    /// Module path, e.g. `features.4` or `features.2.0`.
    pub path: String,
    /// `{path}.block.0`, `.1`, ...
    pub layers: Vec<MbLayer>,
    /// Whether the input is added to the output.
    pub residual: bool,
}

impl MbConv {
    /// Loads a block of `spec` at `path`.
    pub fn load(params: &mut dyn ParamSource, path: &str, spec: MbConvSpec) -> Result<Self, ModelError> {
        let block = child(path, "block");
        let mut layers = Vec::new();
        // Layers are `{path}.block.{index}`, numbered as they are added.
        let next = |layers: &Vec<MbLayer>| child(&block, &layers.len().to_string());
        let conv = |layers: &mut Vec<MbLayer>, params: &mut dyn ParamSource, conv: ConvSpec, act| {
            let layer = ConvNormActivation::load(params, &next(layers), conv, spec.eps, act)?;
            layers.push(MbLayer::ConvNorm(layer));
            Ok::<_, ModelError>(())
        };
        let act = Some(spec.activation);
        if spec.expanded != spec.in_channels {
            conv(
                &mut layers,
                params,
                same_conv(spec.in_channels, spec.expanded, 1, 1, 1),
                act,
            )?;
        }
        let depthwise = same_conv(spec.expanded, spec.expanded, spec.kernel, spec.stride, spec.expanded);
        conv(&mut layers, params, depthwise, act)?;
        if let Some(squeeze) = spec.squeeze {
            let (inner, scale) = spec.se_activations;
            let se = SqueezeExcitation::load(params, &next(&layers), spec.expanded, squeeze, inner, scale)?;
            layers.push(MbLayer::Se(se));
        }
        conv(
            &mut layers,
            params,
            same_conv(spec.expanded, spec.out_channels, 1, 1, 1),
            None,
        )?;
        Ok(Self {
            path: path.to_string(),
            layers,
            residual: spec.stride == 1 && spec.in_channels == spec.out_channels,
        })
    }
}

impl Module for MbConv {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = match layer {
                MbLayer::ConvNorm(l) => l.forward(frontend, y)?,
                MbLayer::Se(l) => l.forward(frontend, y)?,
            };
        }
        if self.residual {
            frontend.add(&child(&self.path, "add"), &y, &x)
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's rounding: squeeze channels of MobileNetV3's blocks.
    #[test]
    fn make_divisible_as_torchvision() {
        for (v, want) in [(18, 24), (30, 32), (120, 120), (168, 168), (240, 240), (4, 8), (96, 96)] {
            assert_eq!(make_divisible(v), want, "{v}");
        }
    }
}
