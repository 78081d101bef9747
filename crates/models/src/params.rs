//! Where parameters come from: a safetensors file (strictly checked) or the seeded random init.

use crate::error::CandleContext;
use crate::{random, ModelError};
use candle_core::{safetensors::Load, DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

/// What a parameter is, so the random init can give it a sensible distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Conv kernel with `fan_in = in_channels / groups * kh * kw`.
    ConvWeight {
        /// Inputs feeding one output.
        fan_in: usize,
    },
    /// Conv bias.
    ConvBias {
        /// Inputs feeding one output.
        fan_in: usize,
    },
    /// Batch-norm running mean.
    RunningMean,
    /// Batch-norm running variance.
    RunningVar,
    /// Batch-norm scale (gamma).
    BatchNormWeight,
    /// Batch-norm shift (beta).
    BatchNormBias,
    /// Linear weight `[out, in]` with `fan_in = in`.
    LinearWeight {
        /// Input features.
        fan_in: usize,
    },
    /// Linear bias.
    LinearBias {
        /// Input features.
        fan_in: usize,
    },
}

impl ParamKind {
    /// The interval `[lo, hi)` the random init draws this parameter from.
    ///
    /// Conv kernels use He-uniform (`±sqrt(6/fan_in)`) so activations keep
    /// their scale through deep nets; batch-norm statistics are deliberately
    /// far from the identity (mean ±0.2, var 0.5..1.5, gamma 0.4..0.9,
    /// beta ±0.2) so that a wrong fold shows.
    pub fn init_range(self) -> (f64, f64) {
        match self {
            ParamKind::ConvWeight { fan_in } => {
                let bound = (6.0 / fan_in as f64).sqrt();
                (-bound, bound)
            }
            ParamKind::ConvBias { fan_in } | ParamKind::LinearWeight { fan_in } | ParamKind::LinearBias { fan_in } => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                (-bound, bound)
            }
            ParamKind::RunningMean | ParamKind::BatchNormBias => (-0.2, 0.2),
            ParamKind::RunningVar => (0.5, 1.5),
            ParamKind::BatchNormWeight => (0.4, 0.9),
        }
    }
}

/// A supplier of named parameters for model construction.
pub trait ParamSource {
    /// The tensor for parameter `name` (a safetensors key) of `shape`.
    fn param(&mut self, name: &str, shape: &[usize], kind: ParamKind) -> Result<Tensor, ModelError>;
    /// Called once the model is built: reports leftover tensors, if the source is strict.
    fn finish(&mut self, model: &str) -> Result<(), ModelError>;

    /// The shape parameter `name` has in this source, if the source fixes
    /// one (a file does; a random init takes any): how a model reads
    /// sizes the weights decide, such as its class count.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let _ = name;
        None
    }
}

/// Parameters drawn from [`random`], f32, deterministic in the seed.
#[derive(Debug, Clone)]
pub struct RandomParams {
    /// The seed.
    pub seed: u64,
    /// Where the tensors are created.
    pub device: Device,
}

impl ParamSource for RandomParams {
    fn param(&mut self, name: &str, shape: &[usize], kind: ParamKind) -> Result<Tensor, ModelError> {
        let (lo, hi) = kind.init_range();
        random::uniform(self.seed, name, shape, lo, hi, &self.device).context(name)
    }

    fn finish(&mut self, _model: &str) -> Result<(), ModelError> {
        Ok(())
    }
}

/// Named tensors from a safetensors file (or built in memory), checked
/// strictly: a missing key, a wrong shape, a non-float or mixed dtype, and any
/// unused key except PyTorch's `num_batches_tracked` are errors.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    used: HashSet<String>,
    dtype: Option<DType>,
    source_name: String,
    device: Device,
}

/// The largest weights file [`Weights::from_file`] reads: 4 GiB, a billion
/// f32 parameters (ResNet50 has 25 million). A larger file (a sparse one,
/// say) is refused before it is read rather than read into memory.
pub const MAX_WEIGHTS_FILE_BYTES: u64 = 4 << 30;

impl Weights {
    /// Reads a safetensors file. A truncated or corrupt file is a
    /// [`ModelError::Safetensors`] naming it.
    pub fn from_file(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_WEIGHTS_FILE_BYTES {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!("{size} bytes, more than the {MAX_WEIGHTS_FILE_BYTES} a weights file may have"),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Reads a safetensors file's bytes already in memory (a request body,
    /// say); `path` names them in errors. Every tensor is bounded by the
    /// bytes given: the reader checks each one's offsets against them.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self, ModelError> {
        let corrupt = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let tensor = load_view(&view, &Device::Cpu).map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, tensor);
        }
        Ok(Self::from_tensors(tensors, format!("`{}`", path.display()), device))
    }

    /// Wraps tensors already in memory; `source_name` is used in error messages.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, source_name: impl Into<String>, device: &Device) -> Self {
        Self {
            tensors,
            used: HashSet::new(),
            dtype: None,
            source_name: source_name.into(),
            device: device.clone(),
        }
    }

    /// The names of all tensors held.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// One tensor of a safetensors file from outside, on `device`. The reader
/// checked its bytes against the file; the strides of a shape with no
/// values (`[0, 2^40, 2^40]`) are checked here, before candle multiplies
/// them out ([`wick_ir::shape_extent`]). Errors come without candle's
/// backtrace ([`wick_ir::plain_candle_error`]).
pub fn load_view(view: &safetensors::tensor::TensorView<'_>, device: &Device) -> candle_core::Result<Tensor> {
    if wick_ir::shape_extent(view.shape()).is_none() {
        return Err(candle_core::Error::Msg(format!(
            "shape {:?} is beyond what this machine can address",
            view.shape()
        )));
    }
    view.load(device).map_err(wick_ir::plain_candle_error)
}

impl ParamSource for Weights {
    fn param(&mut self, name: &str, shape: &[usize], _kind: ParamKind) -> Result<Tensor, ModelError> {
        let tensor = self.tensors.get(name).ok_or_else(|| ModelError::MissingWeight {
            name: name.to_string(),
            model: String::new(),
            source_name: self.source_name.clone(),
        })?;
        if tensor.dims() != shape {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: tensor.dims().to_vec(),
            });
        }
        let expected = *self.dtype.get_or_insert(if tensor.dtype().is_float() {
            tensor.dtype()
        } else {
            DType::F32
        });
        if tensor.dtype() != expected {
            return Err(ModelError::WeightDtype {
                name: name.to_string(),
                expected,
                got: tensor.dtype(),
            });
        }
        self.used.insert(name.to_string());
        tensor.to_device(&self.device).context(name)
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    fn finish(&mut self, model: &str) -> Result<(), ModelError> {
        let unused: BTreeSet<String> = self
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k) && !k.ends_with("num_batches_tracked"))
            .cloned()
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(ModelError::UnexpectedWeights {
                model: model.to_string(),
                source_name: self.source_name.clone(),
                names: unused.into_iter().collect(),
            })
        }
    }
}
