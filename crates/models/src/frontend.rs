//! The front end models are written against, and its eager (plain candle) interpretation.

use crate::error::CandleContext;
use crate::{BatchNorm, Conv2d, Linear, MaxPool2d, ModelError};
use candle_core::{Tensor, D};
use candle_nn::{Module as _, ModuleT as _};
use wick_ir::Activation;

/// The layer vocabulary a model's `forward` may use. [`Eager`] computes with
/// candle; [`crate::Tracer`] appends IR nodes. A model written against this
/// trait is therefore run and traced by the same code.
pub trait Frontend {
    /// A tensor (eager) or a graph value (tracing).
    type Value: Clone;
    /// A convolution layer.
    fn conv2d(&mut self, layer: &Conv2d, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// An inference-mode batch norm layer.
    fn batch_norm(&mut self, layer: &BatchNorm, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// An elementwise activation; `path` is the module path of the activation module.
    fn activation(&mut self, path: &str, activation: Activation, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// ReLU; `path` is the module path of the activation module.
    fn relu(&mut self, path: &str, x: &Self::Value) -> Result<Self::Value, ModelError> {
        self.activation(path, Activation::Relu, x)
    }
    /// Elementwise sum of two values of equal shape.
    fn add(&mut self, path: &str, a: &Self::Value, b: &Self::Value) -> Result<Self::Value, ModelError>;
    /// Elementwise product, `b` broadcast to `a` (`[N,C,H,W] · [N,C,1,1]`).
    fn mul(&mut self, path: &str, a: &Self::Value, b: &Self::Value) -> Result<Self::Value, ModelError>;
    /// A max-pool layer.
    fn max_pool2d(&mut self, layer: &MaxPool2d, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// Adaptive average pool to 1x1.
    fn global_avg_pool2d(&mut self, path: &str, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// `torch.flatten(x, start_dim)`.
    fn flatten(&mut self, path: &str, x: &Self::Value, start_dim: usize) -> Result<Self::Value, ModelError>;
    /// A fully connected layer.
    fn linear(&mut self, layer: &Linear, x: &Self::Value) -> Result<Self::Value, ModelError>;
    /// The classifiers' neck: global average pool (`avgpool`), then
    /// `flatten(x, 1)` (`flatten`): `[N, C, H, W]` to `[N, C]`.
    fn pooled_features(&mut self, x: &Self::Value) -> Result<Self::Value, ModelError> {
        let x = self.global_avg_pool2d("avgpool", x)?;
        self.flatten("flatten", &x, 1)
    }
}

/// A module: something with a `forward` over any [`Frontend`].
pub trait Module {
    /// Applies the module to `x`.
    fn forward<F: Frontend>(&self, frontend: &mut F, x: F::Value) -> Result<F::Value, ModelError>;
}

/// Runs models eagerly with plain candle and candle-nn layers: the reference
/// every traced and optimised graph is compared against.
#[derive(Debug, Default, Clone, Copy)]
pub struct Eager;

impl Frontend for Eager {
    type Value = Tensor;

    fn conv2d(&mut self, layer: &Conv2d, x: &Tensor) -> Result<Tensor, ModelError> {
        layer.inner.forward(x).context(&layer.path)
    }

    fn batch_norm(&mut self, layer: &BatchNorm, x: &Tensor) -> Result<Tensor, ModelError> {
        layer.inner.forward_t(x, false).context(&layer.path)
    }

    fn activation(&mut self, path: &str, activation: Activation, x: &Tensor) -> Result<Tensor, ModelError> {
        activation.apply(x).context(path)
    }

    fn add(&mut self, path: &str, a: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
        (a + b).context(path)
    }

    fn mul(&mut self, path: &str, a: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
        a.broadcast_mul(b).context(path)
    }

    fn max_pool2d(&mut self, layer: &MaxPool2d, x: &Tensor) -> Result<Tensor, ModelError> {
        let [ph, pw] = layer.padding;
        let mut padded = x.clone();
        // Pad with -inf (never selected by max), height then width.
        for (dim, pad) in [(2, ph), (3, pw)] {
            if pad > 0 {
                let mut edge_shape = padded.dims().to_vec();
                edge_shape[dim] = pad;
                let edge = Tensor::full(f32::NEG_INFINITY, edge_shape, x.device())
                    .and_then(|t| t.to_dtype(x.dtype()))
                    .context(&layer.path)?;
                padded = Tensor::cat(&[&edge, &padded, &edge], dim).context(&layer.path)?;
            }
        }
        padded
            .max_pool2d_with_stride((layer.kernel[0], layer.kernel[1]), (layer.stride[0], layer.stride[1]))
            .context(&layer.path)
    }

    fn global_avg_pool2d(&mut self, path: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        x.mean_keepdim(D::Minus1)
            .and_then(|t| t.mean_keepdim(D::Minus2))
            .context(path)
    }

    fn flatten(&mut self, path: &str, x: &Tensor, start_dim: usize) -> Result<Tensor, ModelError> {
        x.flatten_from(start_dim).context(path)
    }

    fn linear(&mut self, layer: &Linear, x: &Tensor) -> Result<Tensor, ModelError> {
        layer.inner.forward(x).context(&layer.path)
    }
}
