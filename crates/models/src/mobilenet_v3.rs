//! MobileNetV3-Large with torchvision's architecture and parameter names:
//! hardswish, squeeze-and-excitation with hardsigmoid, batch-norm eps 1e-3.

use crate::conv_norm::{same_conv, ConvNormActivation};
use crate::mbconv::{make_divisible, MbConv, MbConvSpec};
use crate::{Frontend, Linear, ModelError, Module, ParamSource};
use wick_ir::Activation;

/// MobileNetV3's batch-norm eps.
const BN_EPS: f64 = 1e-3;
/// Channels of the last conv (6 × 160).
const LAST_CONV: usize = 960;
/// Channels into the classifier's last layer.
pub const MOBILENET_V3_LARGE_FEATURES: usize = 1280;

/// torchvision's MobileNetV3-Large: a 3x3/2 stem, 15 blocks, a 1x1 conv to
/// 960 channels, global average pool, `classifier.0` (960 → 1280),
/// hardswish, (dropout,) `classifier.3`. 46 conv → batch_norm pairs.
#[derive(Debug, Clone)]
pub struct MobileNetV3 {
    /// `features.0`.
    pub stem: ConvNormActivation,
    /// `features.1` .. `features.15`.
    pub blocks: Vec<MbConv>,
    /// `features.16`.
    pub head: ConvNormActivation,
    /// `classifier.0`.
    pub pre_classifier: Linear,
    /// `classifier.3`.
    pub classifier: Linear,
}

impl MobileNetV3 {
    /// Loads MobileNetV3-Large with `num_classes` outputs.
    pub fn large(params: &mut dyn ParamSource, num_classes: usize) -> Result<Self, ModelError> {
        let hs = Activation::HardSwish;
        let stem = ConvNormActivation::load(params, "features.0", same_conv(3, 16, 3, 2, 1), BN_EPS, Some(hs))?;
        // (in, kernel, expanded, out, squeeze-and-excitation, hardswish, stride): torchvision's table.
        let table = [
            (16, 3, 16, 16, false, false, 1),
            (16, 3, 64, 24, false, false, 2),
            (24, 3, 72, 24, false, false, 1),
            (24, 5, 72, 40, true, false, 2),
            (40, 5, 120, 40, true, false, 1),
            (40, 5, 120, 40, true, false, 1),
            (40, 3, 240, 80, false, true, 2),
            (80, 3, 200, 80, false, true, 1),
            (80, 3, 184, 80, false, true, 1),
            (80, 3, 184, 80, false, true, 1),
            (80, 3, 480, 112, true, true, 1),
            (112, 3, 672, 112, true, true, 1),
            (112, 5, 672, 160, true, true, 2),
            (160, 5, 960, 160, true, true, 1),
            (160, 5, 960, 160, true, true, 1),
        ];
        let mut blocks = Vec::new();
        for (index, (in_channels, kernel, expanded, out_channels, se, use_hs, stride)) in table.into_iter().enumerate()
        {
            let spec = MbConvSpec {
                in_channels,
                kernel,
                expanded,
                out_channels,
                stride,
                squeeze: se.then(|| make_divisible(expanded / 4)),
                activation: if use_hs { hs } else { Activation::Relu },
                se_activations: (Activation::Relu, Activation::HardSigmoid),
                eps: BN_EPS,
            };
            blocks.push(MbConv::load(params, &format!("features.{}", index + 1), spec)?);
        }
        let head = ConvNormActivation::load(
            params,
            &format!("features.{}", blocks.len() + 1),
            same_conv(160, LAST_CONV, 1, 1, 1),
            BN_EPS,
            Some(hs),
        )?;
        Ok(Self {
            stem,
            blocks,
            head,
            pre_classifier: Linear::load(params, "classifier.0", LAST_CONV, MOBILENET_V3_LARGE_FEATURES)?,
            classifier: Linear::load(params, "classifier.3", MOBILENET_V3_LARGE_FEATURES, num_classes)?,
        })
    }
}

impl Module for MobileNetV3 {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let mut x = self.stem.forward(frontend, x)?;
        for block in &self.blocks {
            x = block.forward(frontend, x)?;
        }
        let x = self.head.forward(frontend, x)?;
        let x = frontend.pooled_features(&x)?;
        let x = frontend.linear(&self.pre_classifier, &x)?;
        let x = frontend.activation("classifier.1", Activation::HardSwish, &x)?;
        frontend.linear(&self.classifier, &x)
    }
}
