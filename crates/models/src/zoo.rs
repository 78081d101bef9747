//! The models wick ships, by name: loading, default inputs, eager runs and tracing.

use crate::{
    trace, Eager, EfficientNet, MobileNetV2, MobileNetV3, ModelError, Module, ParamSource, RandomParams, ResNet,
    ResNetDepth, Sequential, Toy, Weights, EFFICIENTNET_B0_FEATURES, MOBILENET_V2_FEATURES,
    MOBILENET_V3_LARGE_FEATURES,
};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use wick_ir::{Graph, TensorFact};

/// The names accepted by [`ModelName::from_str`].
pub const MODEL_NAMES: [&str; 8] = [
    "toy",
    "toy-sequential",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet-v2",
    "mobilenet-v3-large",
    "efficientnet-b0",
];

/// A model wick knows how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelName {
    /// The tutorial's model `M` (three conv → batch_norm pairs once flattened).
    Toy,
    /// The tutorial's `Sequential` model (two pairs).
    ToySequential,
    /// torchvision's ResNet18 (twenty pairs).
    Resnet18,
    /// torchvision's ResNet34 (36 pairs).
    Resnet34,
    /// torchvision's ResNet50 (53 pairs, bottleneck blocks).
    Resnet50,
    /// torchvision's MobileNetV2 (52 pairs, depthwise convs, ReLU6).
    MobilenetV2,
    /// torchvision's MobileNetV3-Large (46 pairs, hardswish, squeeze-and-excitation).
    MobilenetV3Large,
    /// torchvision's EfficientNet-B0 (49 pairs, SiLU, squeeze-and-excitation).
    EfficientnetB0,
}

impl ModelName {
    /// All models.
    pub const ALL: [ModelName; 8] = [
        ModelName::Toy,
        ModelName::ToySequential,
        ModelName::Resnet18,
        ModelName::Resnet34,
        ModelName::Resnet50,
        ModelName::MobilenetV2,
        ModelName::MobilenetV3Large,
        ModelName::EfficientnetB0,
    ];

    /// The CLI / graph name.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelName::Toy => "toy",
            ModelName::ToySequential => "toy-sequential",
            ModelName::Resnet18 => "resnet18",
            ModelName::Resnet34 => "resnet34",
            ModelName::Resnet50 => "resnet50",
            ModelName::MobilenetV2 => "mobilenet-v2",
            ModelName::MobilenetV3Large => "mobilenet-v3-large",
            ModelName::EfficientnetB0 => "efficientnet-b0",
        }
    }

    /// The ResNet depth this name builds, if it is a ResNet.
    pub fn resnet_depth(self) -> Option<ResNetDepth> {
        match self {
            ModelName::Resnet18 => Some(ResNetDepth::R18),
            ModelName::Resnet34 => Some(ResNetDepth::R34),
            ModelName::Resnet50 => Some(ResNetDepth::R50),
            _ => None,
        }
    }

    /// The tutorial's input shape for this model, with the batch replaced when given.
    pub fn input_shape(self, batch: Option<usize>) -> Vec<usize> {
        let mut shape = match self {
            ModelName::Toy => vec![5, 1, 1, 1],
            ModelName::ToySequential => vec![1, 3, 28, 28],
            _ => vec![10, 3, 224, 224],
        };
        if let Some(batch) = batch {
            shape[0] = batch;
        }
        shape
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelName {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<Self, ModelError> {
        ModelName::ALL
            .into_iter()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| ModelError::UnknownModel {
                name: name.to_string(),
                known: MODEL_NAMES.to_vec(),
            })
    }
}

/// Where a model's parameters come from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// The seeded random init of [`crate::random`] (f32, non-trivial batch-norm statistics).
    Random {
        /// The seed.
        seed: u64,
    },
    /// A safetensors file with PyTorch parameter names.
    File(PathBuf),
    /// Tensors already in memory, keyed by parameter name.
    Tensors(HashMap<String, Tensor>),
    /// A safetensors file's bytes already in memory (a request body, say).
    Safetensors(Vec<u8>),
}

/// A loaded model of any kind.
#[derive(Debug, Clone)]
pub enum Model {
    /// See [`ModelName::Toy`].
    Toy(Toy),
    /// See [`ModelName::ToySequential`].
    ToySequential(Sequential),
    /// See [`ModelName::Resnet18`].
    Resnet18(ResNet),
    /// See [`ModelName::Resnet34`].
    Resnet34(ResNet),
    /// See [`ModelName::Resnet50`].
    Resnet50(ResNet),
    /// See [`ModelName::MobilenetV2`].
    MobilenetV2(MobileNetV2),
    /// See [`ModelName::MobilenetV3Large`].
    MobilenetV3Large(MobileNetV3),
    /// See [`ModelName::EfficientnetB0`].
    EfficientnetB0(EfficientNet),
}

impl Model {
    /// Builds model `name` with parameters from `source` on `device`; a
    /// classifier's class count is the weights' (1000 for a random init).
    pub fn load(name: ModelName, source: WeightSource, device: &Device) -> Result<Self, ModelError> {
        Self::load_with_classes(name, source, device, None)
    }

    /// [`Model::load`] with `num_classes` outputs when given (weights of
    /// another count are then refused by shape). At most
    /// [`MAX_NUM_CLASSES`]; the toy models have no classifier and take none.
    pub fn load_with_classes(
        name: ModelName,
        source: WeightSource,
        device: &Device,
        num_classes: Option<usize>,
    ) -> Result<Self, ModelError> {
        if let Some(classes) = num_classes {
            let problem = match name {
                ModelName::Toy | ModelName::ToySequential => Some("the model has no classifier".to_string()),
                _ if !(1..=MAX_NUM_CLASSES).contains(&classes) => {
                    Some(format!("expected 1 to {MAX_NUM_CLASSES}, got {classes}"))
                }
                _ => None,
            };
            if let Some(message) = problem {
                return Err(ModelError::NumClasses {
                    model: name.as_str().to_string(),
                    message,
                });
            }
        }
        let mut params: Box<dyn ParamSource> = match source {
            WeightSource::Random { seed } => Box::new(RandomParams {
                seed,
                device: device.clone(),
            }),
            WeightSource::File(path) => Box::new(Weights::from_file(&path, device)?),
            WeightSource::Safetensors(bytes) => {
                Box::new(Weights::from_bytes(&bytes, std::path::Path::new("<bytes>"), device)?)
            }
            WeightSource::Tensors(tensors) => Box::new(Weights::from_tensors(tensors, "the given tensors", device)),
        };
        let model = Self::build(name, params.as_mut(), num_classes).map_err(|e| match e {
            ModelError::MissingWeight {
                name: weight,
                source_name,
                ..
            } => ModelError::MissingWeight {
                name: weight,
                model: name.as_str().to_string(),
                source_name,
            },
            other => other,
        })?;
        params.finish(name.as_str())?;
        Ok(model)
    }

    fn build(name: ModelName, params: &mut dyn ParamSource, num_classes: Option<usize>) -> Result<Self, ModelError> {
        let classes = |params: &dyn ParamSource, weight: &str, features: usize| {
            num_classes.unwrap_or_else(|| classes_of(params, weight, features))
        };
        Ok(match name {
            ModelName::Toy => Model::Toy(Toy::load(params)?),
            ModelName::ToySequential => Model::ToySequential(crate::toy::toy_sequential(params)?),
            ModelName::Resnet18 | ModelName::Resnet34 | ModelName::Resnet50 => {
                let depth = name.resnet_depth().expect("a ResNet");
                let classes = classes(params, "fc.weight", depth.features());
                let net = ResNet::load(params, depth, classes)?;
                match depth {
                    ResNetDepth::R18 => Model::Resnet18(net),
                    ResNetDepth::R34 => Model::Resnet34(net),
                    ResNetDepth::R50 => Model::Resnet50(net),
                }
            }
            ModelName::MobilenetV2 => {
                let classes = classes(params, "classifier.1.weight", MOBILENET_V2_FEATURES);
                Model::MobilenetV2(MobileNetV2::load(params, classes)?)
            }
            ModelName::MobilenetV3Large => {
                let classes = classes(params, "classifier.3.weight", MOBILENET_V3_LARGE_FEATURES);
                Model::MobilenetV3Large(MobileNetV3::large(params, classes)?)
            }
            ModelName::EfficientnetB0 => {
                let classes = classes(params, "classifier.1.weight", EFFICIENTNET_B0_FEATURES);
                Model::EfficientnetB0(EfficientNet::b0(params, classes)?)
            }
        })
    }

    /// Which model this is.
    pub fn name(&self) -> ModelName {
        match self {
            Model::Toy(_) => ModelName::Toy,
            Model::ToySequential(_) => ModelName::ToySequential,
            Model::Resnet18(_) => ModelName::Resnet18,
            Model::Resnet34(_) => ModelName::Resnet34,
            Model::Resnet50(_) => ModelName::Resnet50,
            Model::MobilenetV2(_) => ModelName::MobilenetV2,
            Model::MobilenetV3Large(_) => ModelName::MobilenetV3Large,
            Model::EfficientnetB0(_) => ModelName::EfficientnetB0,
        }
    }

    /// The dtype of the model's parameters.
    pub fn dtype(&self) -> DType {
        match self {
            Model::Toy(m) => m.conv1.inner.weight().dtype(),
            Model::ToySequential(m) => match m.layers.first() {
                Some(crate::SequentialLayer::Conv2d(c)) => c.inner.weight().dtype(),
                _ => DType::F32,
            },
            Model::Resnet18(m) | Model::Resnet34(m) | Model::Resnet50(m) => m.conv1.inner.weight().dtype(),
            Model::MobilenetV2(m) => m.stem.conv.inner.weight().dtype(),
            Model::MobilenetV3Large(m) => m.stem.conv.inner.weight().dtype(),
            Model::EfficientnetB0(m) => m.stem.conv.inner.weight().dtype(),
        }
    }

    /// Checks that `dims` is an input this model accepts: rank 4 NCHW with the
    /// model's channel count and a spatial size its layers can take.
    pub fn check_input(&self, dims: &[usize]) -> Result<(), ModelError> {
        let (channels, min_size) = match self.name() {
            ModelName::Toy => (1, 1),
            ModelName::ToySequential => (3, 11),
            _ => (3, 1),
        };
        let ok = dims.len() == 4 && dims[0] > 0 && dims[1] == channels && dims[2] >= min_size && dims[3] >= min_size;
        if ok {
            Ok(())
        } else {
            Err(ModelError::BadInput {
                model: self.name().as_str().into(),
                expected: format!("[N,{channels},H,W] with N >= 1 and H, W >= {min_size}"),
                got: dims.to_vec(),
            })
        }
    }

    /// Runs the model eagerly with plain candle (the reference).
    pub fn forward_eager(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        self.check_input(x.dims())?;
        let mut eager = Eager;
        match self {
            Model::Toy(m) => m.forward(&mut eager, x.clone()),
            Model::ToySequential(m) => m.forward(&mut eager, x.clone()),
            Model::Resnet18(m) | Model::Resnet34(m) | Model::Resnet50(m) => m.forward(&mut eager, x.clone()),
            Model::MobilenetV2(m) => m.forward(&mut eager, x.clone()),
            Model::MobilenetV3Large(m) => m.forward(&mut eager, x.clone()),
            Model::EfficientnetB0(m) => m.forward(&mut eager, x.clone()),
        }
    }

    /// Traces the model at input shape `input_shape` (dtype = the model's).
    pub fn trace(&self, input_shape: &[usize]) -> Result<Graph, ModelError> {
        self.check_input(input_shape)?;
        let fact = TensorFact::new(self.dtype(), input_shape);
        let name = self.name().as_str();
        match self {
            Model::Toy(m) => trace(name, m, fact),
            Model::ToySequential(m) => trace(name, m, fact),
            Model::Resnet18(m) | Model::Resnet34(m) | Model::Resnet50(m) => trace(name, m, fact),
            Model::MobilenetV2(m) => trace(name, m, fact),
            Model::MobilenetV3Large(m) => trace(name, m, fact),
            Model::EfficientnetB0(m) => trace(name, m, fact),
        }
    }
}

/// The most classes `--num-classes` may ask for: three times ImageNet-21k's
/// 21,843; a classifier of that many rows over ResNet50's 2048 features is
/// 512 MiB of f32, allocated for a random init.
pub const MAX_NUM_CLASSES: usize = 1 << 16;

/// The class count the weights give a classifier whose weight is `weight`
/// (`[classes >= 1, features]`), or ImageNet's 1000 when the source fixes
/// none (a random init) or its shape is another (then refused by shape).
fn classes_of(params: &dyn ParamSource, weight: &str, features: usize) -> usize {
    match params.shape_of(weight).as_deref() {
        Some(&[classes, f]) if classes >= 1 && f == features => classes,
        _ => 1000,
    }
}

/// A seeded random input (uniform in [-1, 1)) of `shape`, named `input` in the random stream.
pub fn random_input(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor, ModelError> {
    crate::random::uniform(seed, "input", shape, -1.0, 1.0, device).map_err(|source| ModelError::Candle {
        context: "random input".into(),
        source: Box::new(wick_ir::plain_candle_error(source)),
    })
}
