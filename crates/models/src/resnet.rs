//! ResNet18, ResNet34 and ResNet50 with torchvision's architecture and
//! parameter names (also timm's `resnet18`, `resnet34`, `resnet50`).

use crate::layers::{child, ConvSpec};
use crate::{BatchNorm, Conv2d, Frontend, Linear, MaxPool2d, ModelError, Module, ParamSource};

/// torchvision's `BasicBlock`: conv3x3 → bn → relu → conv3x3 → bn, plus the
/// (optionally downsampled) identity, then relu.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    /// Module path, e.g. `layer2.0`.
    pub path: String,
    /// First 3x3 conv (carries the stride).
    pub conv1: Conv2d,
    /// Its batch norm.
    pub bn1: BatchNorm,
    /// Second 3x3 conv.
    pub conv2: Conv2d,
    /// Its batch norm.
    pub bn2: BatchNorm,
    /// `downsample = Sequential(conv1x1, BatchNorm2d)` when shape changes.
    pub downsample: Option<(Conv2d, BatchNorm)>,
}

fn conv(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> ConvSpec {
    ConvSpec {
        in_channels,
        out_channels,
        kernel,
        stride,
        padding: kernel / 2,
        bias: false,
        groups: 1,
    }
}

impl BasicBlock {
    /// Loads a block `in -> out` with the given stride.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let downsample = downsample(params, path, in_channels, out_channels, stride)?;
        Ok(Self {
            path: path.to_string(),
            conv1: Conv2d::load(
                params,
                &child(path, "conv1"),
                conv(in_channels, out_channels, 3, stride),
            )?,
            bn1: BatchNorm::load(params, &child(path, "bn1"), out_channels)?,
            conv2: Conv2d::load(params, &child(path, "conv2"), conv(out_channels, out_channels, 3, 1))?,
            bn2: BatchNorm::load(params, &child(path, "bn2"), out_channels)?,
            downsample,
        })
    }
}

impl Module for BasicBlock {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let pairs = [(&self.conv1, &self.bn1), (&self.conv2, &self.bn2)];
        residual_forward(frontend, &self.path, &pairs, self.downsample.as_ref(), x)
    }
}

/// What both block kinds compute: each (conv, bn) pair in turn with the
/// block's ReLU between them, plus the (optionally downsampled) identity,
/// then the ReLU.
fn residual_forward<F: Frontend>(
    frontend: &mut F,
    path: &str,
    pairs: &[(&Conv2d, &BatchNorm)],
    downsample: Option<&(Conv2d, BatchNorm)>,
    x: F::Value,
) -> Result<F::Value, ModelError> {
    let relu = child(path, "relu");
    let mut out = x.clone();
    for (index, (conv, bn)) in pairs.iter().enumerate() {
        if index > 0 {
            out = frontend.relu(&relu, &out)?;
        }
        out = frontend.conv2d(conv, &out)?;
        out = frontend.batch_norm(bn, &out)?;
    }
    let identity = match downsample {
        Some((conv, bn)) => {
            let y = frontend.conv2d(conv, &x)?;
            frontend.batch_norm(bn, &y)?
        }
        None => x,
    };
    let out = frontend.add(&child(path, "add"), &out, &identity)?;
    frontend.relu(&relu, &out)
}

/// torchvision's `Bottleneck` (ResNet v1.5): conv1x1 → bn → relu → conv3x3
/// (carries the stride) → bn → relu → conv1x1 (×4 channels) → bn, plus the
/// (optionally downsampled) identity, then relu.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    /// Module path, e.g. `layer2.0`.
    pub path: String,
    /// 1x1 reduction to the block's width.
    pub conv1: Conv2d,
    /// Its batch norm.
    pub bn1: BatchNorm,
    /// 3x3 conv (carries the stride).
    pub conv2: Conv2d,
    /// Its batch norm.
    pub bn2: BatchNorm,
    /// 1x1 expansion to 4 × the width.
    pub conv3: Conv2d,
    /// Its batch norm.
    pub bn3: BatchNorm,
    /// `downsample = Sequential(conv1x1, BatchNorm2d)` when shape changes.
    pub downsample: Option<(Conv2d, BatchNorm)>,
}

/// How many output channels a [`Bottleneck`] has per unit of width.
pub const BOTTLENECK_EXPANSION: usize = 4;

fn downsample(
    params: &mut dyn ParamSource,
    path: &str,
    in_channels: usize,
    out_channels: usize,
    stride: usize,
) -> Result<Option<(Conv2d, BatchNorm)>, ModelError> {
    if stride == 1 && in_channels == out_channels {
        return Ok(None);
    }
    let ds = child(path, "downsample");
    Ok(Some((
        Conv2d::load(params, &child(&ds, "0"), conv(in_channels, out_channels, 1, stride))?,
        BatchNorm::load(params, &child(&ds, "1"), out_channels)?,
    )))
}

impl Bottleneck {
    /// Loads a block `in -> 4·width` with the given stride.
    pub fn load(
        params: &mut dyn ParamSource,
        path: &str,
        in_channels: usize,
        width: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let out_channels = width * BOTTLENECK_EXPANSION;
        Ok(Self {
            path: path.to_string(),
            conv1: Conv2d::load(params, &child(path, "conv1"), conv(in_channels, width, 1, 1))?,
            bn1: BatchNorm::load(params, &child(path, "bn1"), width)?,
            conv2: Conv2d::load(params, &child(path, "conv2"), conv(width, width, 3, stride))?,
            bn2: BatchNorm::load(params, &child(path, "bn2"), width)?,
            conv3: Conv2d::load(params, &child(path, "conv3"), conv(width, out_channels, 1, 1))?,
            bn3: BatchNorm::load(params, &child(path, "bn3"), out_channels)?,
            downsample: downsample(params, path, in_channels, out_channels, stride)?,
        })
    }
}

impl Module for Bottleneck {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let pairs = [
            (&self.conv1, &self.bn1),
            (&self.conv2, &self.bn2),
            (&self.conv3, &self.bn3),
        ];
        residual_forward(frontend, &self.path, &pairs, self.downsample.as_ref(), x)
    }
}

/// One residual block of a [`ResNet`].
#[derive(Debug, Clone)]
pub enum ResidualBlock {
    /// ResNet18/34's two 3x3 convs.
    Basic(BasicBlock),
    /// ResNet50's 1x1 → 3x3 → 1x1.
    Bottleneck(Bottleneck),
}

impl ResidualBlock {
    /// Every conv of the block with the batch norm that follows it, in
    /// forward order (the downsample last).
    pub fn conv_norm_pairs(&self) -> Vec<(&Conv2d, &BatchNorm)> {
        let (mut pairs, downsample) = match self {
            ResidualBlock::Basic(b) => (vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2)], &b.downsample),
            ResidualBlock::Bottleneck(b) => (
                vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2), (&b.conv3, &b.bn3)],
                &b.downsample,
            ),
        };
        pairs.extend(downsample.as_ref().map(|(c, n)| (c, n)));
        pairs
    }
}

impl Module for ResidualBlock {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        match self {
            ResidualBlock::Basic(b) => b.forward(frontend, x),
            ResidualBlock::Bottleneck(b) => b.forward(frontend, x),
        }
    }
}

/// The kind and count of blocks per stage of a ResNet depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetDepth {
    /// `[2, 2, 2, 2]` basic blocks.
    R18,
    /// `[3, 4, 6, 3]` basic blocks.
    R34,
    /// `[3, 4, 6, 3]` bottleneck blocks.
    R50,
}

impl ResNetDepth {
    fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 | ResNetDepth::R50 => [3, 4, 6, 3],
        }
    }

    /// Channels into the classifier.
    pub fn features(self) -> usize {
        match self {
            ResNetDepth::R18 | ResNetDepth::R34 => 512,
            ResNetDepth::R50 => 512 * BOTTLENECK_EXPANSION,
        }
    }
}

/// torchvision's ResNet: stem (conv 7x7/2, bn, relu, max-pool 3x3/2), four
/// stages of residual blocks (64, 128, 256, 512 channels of width), global
/// average pool, flatten and a `fc` classifier. ResNet18 has 20 conv →
/// batch_norm pairs, ResNet34 36, ResNet50 53.
#[derive(Debug, Clone)]
pub struct ResNet {
    /// Stem conv.
    pub conv1: Conv2d,
    /// Stem batch norm.
    pub bn1: BatchNorm,
    /// Stem max pool.
    pub maxpool: MaxPool2d,
    /// `layer1` .. `layer4`.
    pub layers: Vec<Vec<ResidualBlock>>,
    /// Classifier.
    pub fc: Linear,
}

impl ResNet {
    /// Loads ResNet18 (`[2, 2, 2, 2]` basic blocks) with `num_classes` outputs.
    pub fn resnet18(params: &mut dyn ParamSource, num_classes: usize) -> Result<Self, ModelError> {
        Self::load(params, ResNetDepth::R18, num_classes)
    }

    /// Loads a ResNet of `depth` with `num_classes` outputs.
    pub fn load(params: &mut dyn ParamSource, depth: ResNetDepth, num_classes: usize) -> Result<Self, ModelError> {
        let conv1 = Conv2d::load(
            params,
            "conv1",
            ConvSpec {
                padding: 3,
                ..conv(3, 64, 7, 2)
            },
        )?;
        let bn1 = BatchNorm::load(params, "bn1", 64)?;
        let mut layers = Vec::new();
        let mut in_channels = 64;
        for (stage, (width, count)) in [64, 128, 256, 512].into_iter().zip(depth.blocks()).enumerate() {
            let name = format!("layer{}", stage + 1);
            let mut blocks = Vec::with_capacity(count);
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let path = child(&name, &index.to_string());
                let block = match depth {
                    ResNetDepth::R18 | ResNetDepth::R34 => {
                        let block = BasicBlock::load(params, &path, in_channels, width, stride)?;
                        in_channels = width;
                        ResidualBlock::Basic(block)
                    }
                    ResNetDepth::R50 => {
                        let block = Bottleneck::load(params, &path, in_channels, width, stride)?;
                        in_channels = width * BOTTLENECK_EXPANSION;
                        ResidualBlock::Bottleneck(block)
                    }
                };
                blocks.push(block);
            }
            layers.push(blocks);
        }
        Ok(Self {
            conv1,
            bn1,
            maxpool: MaxPool2d {
                path: "maxpool".into(),
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
            layers,
            fc: Linear::load(params, "fc", depth.features(), num_classes)?,
        })
    }
}

impl ResNet {
    /// Every parameter under its torchvision name (`layer1.0.conv1.weight`,
    /// `bn1.running_var`, `fc.bias`, ...): what a `state_dict` export
    /// holds, less `num_batches_tracked`.
    pub fn named_tensors(&self) -> Result<std::collections::HashMap<String, candle_core::Tensor>, ModelError> {
        let mut tensors = std::collections::HashMap::new();
        let pairs = std::iter::once((&self.conv1, &self.bn1))
            .chain(self.layers.iter().flatten().flat_map(ResidualBlock::conv_norm_pairs));
        for (conv, bn) in pairs {
            tensors.insert(format!("{}.weight", conv.path), conv.inner.weight().clone());
            if let Some(bias) = conv.inner.bias() {
                tensors.insert(format!("{}.bias", conv.path), bias.clone());
            }
            let (weight, bias) = bn.inner.weight_and_bias().ok_or_else(|| ModelError::Candle {
                context: bn.path.clone(),
                source: Box::new(candle_core::Error::Msg("batch norm without affine parameters".into())),
            })?;
            tensors.insert(format!("{}.weight", bn.path), weight.clone());
            tensors.insert(format!("{}.bias", bn.path), bias.clone());
            tensors.insert(format!("{}.running_mean", bn.path), bn.inner.running_mean().clone());
            tensors.insert(format!("{}.running_var", bn.path), bn.inner.running_var().clone());
        }
        tensors.insert(format!("{}.weight", self.fc.path), self.fc.inner.weight().clone());
        if let Some(bias) = self.fc.inner.bias() {
            tensors.insert(format!("{}.bias", self.fc.path), bias.clone());
        }
        Ok(tensors)
    }
}

impl Module for ResNet {
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError> {
        let x = frontend.conv2d(&self.conv1, &x)?;
        let x = frontend.batch_norm(&self.bn1, &x)?;
        let x = frontend.relu("relu", &x)?;
        let mut x = frontend.max_pool2d(&self.maxpool, &x)?;
        for stage in &self.layers {
            for block in stage {
                x = block.forward(frontend, x)?;
            }
        }
        let x = frontend.pooled_features(&x)?;
        frontend.linear(&self.fc, &x)
    }
}
