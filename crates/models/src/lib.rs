//! Models written once against a small front end ([`Frontend`]) that either
//! runs them eagerly with plain candle ([`Eager`], the reference) or traces
//! them into wick's IR ([`trace`](fn@trace)), flattening module nesting on the way.
//!
//! Weights come from safetensors files with PyTorch/torchvision/timm names
//! ([`Weights`]), from the Hugging Face cache ([`hub`]), or from a seeded
//! random init that a Python script re-implements for fixtures ([`random`]).

#![warn(missing_docs)]

mod error;
mod frontend;
pub mod hub;
pub use hub::HubOptions;
mod conv_norm;
mod efficientnet;
mod layers;
mod mbconv;
mod mobilenet;
mod mobilenet_v3;
mod params;
pub mod random;
mod resnet;
mod toy;
mod trace;
mod zoo;

pub use conv_norm::{same_conv, ConvNormActivation};
pub use efficientnet::{EfficientNet, EFFICIENTNET_B0_FEATURES};
pub use error::ModelError;
pub use frontend::{Eager, Frontend, Module};
pub use layers::{BatchNorm, Conv2d, Linear, MaxPool2d, Relu, Sequential, SequentialLayer};
pub use mbconv::{make_divisible, MbConv, MbConvSpec, MbLayer, SqueezeExcitation};
pub use mobilenet::{InvertedResidual, MobileNetV2, MOBILENET_V2_FEATURES};
pub use mobilenet_v3::{MobileNetV3, MOBILENET_V3_LARGE_FEATURES};
pub use params::{load_view, ParamKind, ParamSource, RandomParams, Weights, MAX_WEIGHTS_FILE_BYTES};
pub use resnet::{BasicBlock, Bottleneck, ResNet, ResNetDepth, ResidualBlock, BOTTLENECK_EXPANSION};
pub use toy::{Toy, WrappedBatchNorm};
pub use trace::{trace, Tracer};
pub use zoo::{random_input, Model, ModelName, WeightSource, MAX_NUM_CLASSES, MODEL_NAMES};
