//! MobileNetV2 with torchvision's architecture and parameter names
//! (`features.{i}.conv.{j}`, `classifier.1`): inverted residual blocks of a
//! 1x1 expansion, a 3x3 depthwise conv and a linear 1x1 projection, ReLU6.

use crate::conv_norm::{same_conv, ConvNormActivation};
use crate::layers::{child, ConvSpec};
use crate::{BatchNorm, Conv2d, Frontend, Linear, ModelError, Module, ParamSource};
use wick_ir::Activation;

/// torchvision's `InvertedResidual`: [1x1 expansion →] 3x3 depthwise →
/// 1x1 linear projection, plus the input when the stride is 1 and the
/// channels agree.
#[derive(Debug, Clone)]
pub struct InvertedResidual {
    /// Module path, e.g. `features.3`.
    pub path: String,
    /// Expansion (absent when the expand ratio is 1), depthwise, projection.
    pub layers: Vec<ConvNormActivation>,
    /// Whether the input is added to the output.
    pub residual: bool,
}

impl InvertedResidual {
    /// Loads a block `in -> out` with `stride` and expand ratio `expand`.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        expand: usize,
    ) -> Result<Self, ModelError> {
        let conv = child(path, "conv");
        let hidden = in_channels * expand;
        let relu6 = Some(Activation::Relu6);
        let mut layers = Vec::new();
        if expand != 1 {
            layers.push(ConvNormActivation::load(
                params,
                &child(&conv, "0"),
                same_conv(in_channels, hidden, 1, 1, 1),
                BN_EPS,
                relu6,
            )?);
        }
        let next = layers.len();
        layers.push(ConvNormActivation::load(
            params,
            &child(&conv, &next.to_string()),
            same_conv(hidden, hidden, 3, stride, hidden),
            BN_EPS,
            relu6,
        )?);
        // The projection is a bare conv and batch norm at `conv.{n}`, `conv.{n+1}`.
        let projection = ConvSpec {
            in_channels: hidden,
            out_channels,
            kernel: 1,
            stride: 1,
            padding: 0,
            bias: false,
            groups: 1,
        };
        layers.push(ConvNormActivation {
            conv: Conv2d::load(params, &child(&conv, &(next + 1).to_string()), projection)?,
            bn: BatchNorm::load(params, &child(&conv, &(next + 2).to_string()), out_channels)?,
            activation: None,
            path: child(&conv, &(next + 1).to_string()),
        });
        Ok(Self {
            path: path.to_string(),
            layers,
            residual: stride == 1 && in_channels == out_channels,
        })
    }
}

impl Module for InvertedResidual {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = layer.forward(frontend, y)?;
        }
        if self.residual {
            frontend.add(&child(&self.path, "add"), &y, &x)
        } else {
            Ok(y)
        }
    }
}

/// torchvision's MobileNetV2 (width 1.0): a 3x3/2 stem, 17 inverted
/// residual blocks, a 1x1 conv to 1280 channels, global average pool and
/// `classifier.1` (its dropout is the identity in inference). 52 conv →
/// batch_norm pairs.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    /// `features.0`.
    pub stem: ConvNormActivation,
    /// `features.1` .. `features.17`.
    pub blocks: Vec<InvertedResidual>,
    /// `features.18`.
    pub head: ConvNormActivation,
    /// `classifier.1`.
    pub classifier: Linear,
}

/// MobileNetV2's batch-norm eps (PyTorch's default).
const BN_EPS: f64 = 1e-5;

/// Channels of MobileNetV2's last conv, into the classifier.
pub const MOBILENET_V2_FEATURES: usize = 1280;

impl MobileNetV2 {
    /// Loads MobileNetV2 with `num_classes` outputs.
    pub fn load(params: &mut dyn ParamSource, num_classes: usize) -> Result<Self, ModelError> {
        let relu6 = Some(Activation::Relu6);
        let stem = ConvNormActivation::load(params, "features.0", same_conv(3, 32, 3, 2, 1), BN_EPS, relu6)?;
        // (expand ratio, output channels, repeats, first stride), torchvision's table.
        let settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ];
        let mut blocks = Vec::new();
        let mut in_channels = 32;
        for (expand, out_channels, repeats, first_stride) in settings {
            for i in 0..repeats {
                let stride = if i == 0 { first_stride } else { 1 };
                let path = format!("features.{}", blocks.len() + 1);
                blocks.push(InvertedResidual::load(
                    params,
                    &path,
                    in_channels,
                    out_channels,
                    stride,
                    expand,
                )?);
                in_channels = out_channels;
            }
        }
        let head = ConvNormActivation::load(
            params,
            &format!("features.{}", blocks.len() + 1),
            same_conv(in_channels, MOBILENET_V2_FEATURES, 1, 1, 1),
            BN_EPS,
            relu6,
        )?;
        Ok(Self {
            stem,
            blocks,
            head,
            classifier: Linear::load(params, "classifier.1", MOBILENET_V2_FEATURES, num_classes)?,
        })
    }
}

impl Module for MobileNetV2 {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let mut x = self.stem.forward(frontend, x)?;
        for block in &self.blocks {
            x = block.forward(frontend, x)?;
        }
        let x = self.head.forward(frontend, x)?;
        let x = frontend.pooled_features(&x)?;
        frontend.linear(&self.classifier, &x)
    }
}
