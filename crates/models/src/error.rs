//! Typed errors of model loading, eager execution and tracing.

use candle_core::DType;
use std::path::PathBuf;

/// Everything that can go wrong loading, running or tracing a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is truncated, corrupt or not safetensors at all.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the safetensors reader reported.
        message: String,
    },
    /// A parameter the model needs is not in the weights.
    #[error("weight `{name}` is missing from {source_name} (model `{model}` needs it)")]
    MissingWeight {
        /// The parameter's safetensors key.
        name: String,
        /// The model being loaded.
        model: String,
        /// Where weights were looked up (a file path).
        source_name: String,
    },
    /// A parameter has the wrong shape.
    #[error("weight `{name}` has shape {got:?}, expected {expected:?}")]
    WeightShape {
        /// The parameter's safetensors key.
        name: String,
        /// The shape the model's architecture requires.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// A parameter has the wrong dtype.
    #[error("weight `{name}` has dtype {}, expected {}", got.as_str(), expected.as_str())]
    WeightDtype {
        /// The parameter's safetensors key.
        name: String,
        /// The dtype required (a float type, the same for every parameter).
        expected: DType,
        /// The dtype found.
        got: DType,
    },
    /// The weights contain tensors the model does not use (a different model's file?).
    #[error("{source_name} has {} tensor(s) that model `{model}` does not use, e.g. {}", names.len(), names.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))]
    UnexpectedWeights {
        /// The model being loaded.
        model: String,
        /// Where the weights came from.
        source_name: String,
        /// The unused keys, sorted.
        names: Vec<String>,
    },
    /// A model name that wick does not know.
    #[error("unknown model `{name}`; expected one of: {}", known.join(", "))]
    UnknownModel {
        /// The name given.
        name: String,
        /// The names wick knows.
        known: Vec<&'static str>,
    },
    /// A file is not in the Hugging Face cache and the hub may not be contacted.
    #[error("`{file}` of `{repo}` is not in the Hugging Face cache at `{cache}` and offline mode is on")]
    NotInCache {
        /// Repository id.
        repo: String,
        /// File within the repository.
        file: String,
        /// Cache directory searched.
        cache: PathBuf,
    },
    /// A class count the model cannot take.
    #[error("--num-classes for `{model}`: {message}")]
    NumClasses {
        /// The model.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// A model with no weights on the hub that wick knows of.
    #[error("no hub weights for `{model}`; --hub takes one of: {}", known.join(", "))]
    NoHubWeights {
        /// The model asked for.
        model: String,
        /// The models with hub weights.
        known: Vec<&'static str>,
    },
    /// The hub could not deliver a file.
    #[error("cannot fetch `{file}` of `{repo}` from the Hugging Face hub: {message}")]
    Hub {
        /// Repository id.
        repo: String,
        /// File within the repository.
        file: String,
        /// The hub client's error.
        message: String,
    },
    /// An input that the model cannot take.
    #[error("model `{model}` expects input {expected}, got {got:?}")]
    BadInput {
        /// The model.
        model: String,
        /// A description of the expected input.
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A candle operation failed while running a layer.
    #[error("candle error in `{context}`: {source}")]
    Candle {
        /// The layer path or operation.
        context: String,
        /// The candle error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// Building the traced graph failed.
    #[error(transparent)]
    Ir(#[from] wick_ir::IrError),
}

/// Attaches a context (layer path) to candle errors.
pub(crate) trait CandleContext<T> {
    fn context(self, context: &str) -> Result<T, ModelError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn context(self, context: &str) -> Result<T, ModelError> {
        self.map_err(|source| ModelError::Candle {
            context: context.to_string(),
            source: Box::new(wick_ir::plain_candle_error(source)),
        })
    }
}
