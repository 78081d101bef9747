//! EfficientNet-B0 with torchvision's architecture and parameter names:
//! SiLU, squeeze-and-excitation with sigmoid, 3x3 and 5x5 depthwise convs,
//! stochastic depth (the identity in inference).

use crate::conv_norm::{same_conv, ConvNormActivation};
use crate::mbconv::{make_divisible, MbConv, MbConvSpec};
use crate::{Frontend, Linear, ModelError, Module, ParamSource};
use wick_ir::Activation;

/// EfficientNet-B0's batch-norm eps (PyTorch's default).
const BN_EPS: f64 = 1e-5;
/// Channels into the classifier (4 × 320).
pub const EFFICIENTNET_B0_FEATURES: usize = 1280;

/// torchvision's EfficientNet-B0: a 3x3/2 stem, seven stages of MBConv
/// blocks (`features.{stage}.{i}`), a 1x1 conv to 1280 channels, global
/// average pool, (dropout,) `classifier.1`. 49 conv → batch_norm pairs.
#[derive(Debug, Clone)]
pub struct EfficientNet {
    /// `features.0`.
    pub stem: ConvNormActivation,
    /// `features.1` .. `features.7`, each a list of blocks.
    pub stages: Vec<Vec<MbConv>>,
    /// `features.8`.
    pub head: ConvNormActivation,
    /// `classifier.1`.
    pub classifier: Linear,
}

impl EfficientNet {
    /// Loads EfficientNet-B0 with `num_classes` outputs.
    pub fn b0(params: &mut dyn ParamSource, num_classes: usize) -> Result<Self, ModelError> {
        let silu = Activation::Silu;
        let stem = ConvNormActivation::load(params, "features.0", same_conv(3, 32, 3, 2, 1), BN_EPS, Some(silu))?;
        // (expand ratio, kernel, first stride, in, out, blocks): torchvision's B0 table.
        let table = [
            (1, 3, 1, 32, 16, 1),
            (6, 3, 2, 16, 24, 2),
            (6, 5, 2, 24, 40, 2),
            (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3),
            (6, 5, 2, 112, 192, 4),
            (6, 3, 1, 192, 320, 1),
        ];
        let mut stages = Vec::new();
        for (stage, (expand, kernel, first_stride, first_in, out_channels, count)) in table.into_iter().enumerate() {
            let mut blocks = Vec::new();
            for index in 0..count {
                let in_channels = if index == 0 { first_in } else { out_channels };
                let spec = MbConvSpec {
                    in_channels,
                    kernel,
                    expanded: make_divisible(in_channels * expand),
                    out_channels,
                    stride: if index == 0 { first_stride } else { 1 },
                    squeeze: Some((in_channels / 4).max(1)),
                    activation: silu,
                    se_activations: (silu, Activation::Sigmoid),
                    eps: BN_EPS,
                };
                blocks.push(MbConv::load(params, &format!("features.{}.{index}", stage + 1), spec)?);
            }
            stages.push(blocks);
        }
        let head = ConvNormActivation::load(
            params,
            &format!("features.{}", stages.len() + 1),
            same_conv(320, EFFICIENTNET_B0_FEATURES, 1, 1, 1),
            BN_EPS,
            Some(silu),
        )?;
        Ok(Self {
            stem,
            stages,
            head,
            classifier: Linear::load(params, "classifier.1", EFFICIENTNET_B0_FEATURES, num_classes)?,
        })
    }
}

impl Module for EfficientNet {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let mut x = self.stem.forward(frontend, x)?;
        for block in self.stages.iter().flatten() {
            x = block.forward(frontend, x)?;
        }
        let x = self.head.forward(frontend, x)?;
        let x = frontend.pooled_features(&x)?;
        frontend.linear(&self.classifier, &x)
    }
}
