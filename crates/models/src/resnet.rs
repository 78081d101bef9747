//! ResNet18 with torchvision's architecture and parameter names (also timm's `resnet18`).

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
        let downsample = if stride != 1 || in_channels != out_channels {
            let ds = child(path, "downsample");
            Some((
                Conv2d::load(params, &child(&ds, "0"), conv(in_channels, out_channels, 1, stride))?,
                BatchNorm::load(params, &child(&ds, "1"), out_channels)?,
            ))
        } else {
            None
        };
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
        let relu = child(&self.path, "relu");
        let out = frontend.conv2d(&self.conv1, &x)?;
        let out = frontend.batch_norm(&self.bn1, &out)?;
        let out = frontend.relu(&relu, &out)?;
        let out = frontend.conv2d(&self.conv2, &out)?;
        let out = frontend.batch_norm(&self.bn2, &out)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => {
                let y = frontend.conv2d(conv, &x)?;
                frontend.batch_norm(bn, &y)?
            }
            None => x,
        };
        let out = frontend.add(&child(&self.path, "add"), &out, &identity)?;
        frontend.relu(&relu, &out)
    }
}

/// torchvision's ResNet18: stem (conv 7x7/2, bn, relu, max-pool 3x3/2), four
/// stages of two [`BasicBlock`]s (64, 128, 256, 512 channels), global average
/// pool, flatten and a 1000-way `fc`. 20 conv → batch_norm pairs in all.
#[derive(Debug, Clone)]
pub struct ResNet {
    /// Stem conv.
    pub conv1: Conv2d,
    /// Stem batch norm.
    pub bn1: BatchNorm,
    /// Stem max pool.
    pub maxpool: MaxPool2d,
    /// `layer1` .. `layer4`, two blocks each.
    pub layers: Vec<Vec<BasicBlock>>,
    /// Classifier.
    pub fc: Linear,
}

impl ResNet {
    /// Loads ResNet18 (`[2, 2, 2, 2]` basic blocks) with `num_classes` outputs.
    pub fn resnet18(params: &mut dyn ParamSource, num_classes: usize) -> Result<Self, ModelError> {
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
        for (stage, out_channels) in [64, 128, 256, 512].into_iter().enumerate() {
            let stride = if stage == 0 { 1 } else { 2 };
            let name = format!("layer{}", stage + 1);
            layers.push(vec![
                BasicBlock::load(params, &child(&name, "0"), in_channels, out_channels, stride)?,
                BasicBlock::load(params, &child(&name, "1"), out_channels, out_channels, 1)?,
            ]);
            in_channels = out_channels;
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
            fc: Linear::load(params, "fc", 512, num_classes)?,
        })
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
        let x = frontend.global_avg_pool2d("avgpool", &x)?;
        let x = frontend.flatten("flatten", &x, 1)?;
        frontend.linear(&self.fc, &x)
    }
}
