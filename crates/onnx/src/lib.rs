//! ONNX import: a user's exported CNN as a wick IR [`Graph`], to run
//! through the same pass manager and engine as a model written in Rust.
//!
//! ```no_run
//! let graph = wick_onnx::import_file("resnet18.onnx", &wick_onnx::ImportOptions::default())?;
//! # Ok::<(), wick_onnx::OnnxError>(())
//! ```
//!
//! - Opsets 13 to 21 of the default domain (`torch.onnx.export` writes 17
//!   with the TorchScript exporter, 18 with the dynamo one).
//! - Initializers become IR constants named by their ONNX names (made
//!   valid IR names: `/` -> `.`, other characters -> `_`); nodes keep
//!   their names the same way, so pass counters and profiles read like the
//!   export.
//! - A symbolic first input dimension is the batch: [`ImportOptions::batch`]
//!   (default 1). Other dimensions must be static.
//! - `Constant`, `Identity`, `Dropout` and shape arithmetic (`Shape`,
//!   `Gather`, `Unsqueeze`, `Squeeze`, `Concat`, `Cast` on known values)
//!   are folded at import; `Mul(x, Sigmoid(x))` becomes SiLU; a `MatMul`
//!   by a constant followed by the `Add` of a bias vector becomes one
//!   linear layer.
//! - Operators: those of torchvision's CNN classifiers (ResNet, ResNeXt,
//!   Wide ResNet, VGG-BN, MobileNetV2/V3, EfficientNet, RegNet, MNASNet,
//!   DenseNet, SqueezeNet): `Conv`, `BatchNormalization`, `Relu`, `Clip`,
//!   `Sigmoid`, `HardSigmoid`, `HardSwish`, `Add`, `Mul`, `MaxPool` (ceil
//!   mode too), `AveragePool`, `GlobalAveragePool`, `ReduceMean`, `Concat`,
//!   `Flatten`, `Reshape`, `Gemm`, `MatMul`, with the limits the README's
//!   table lists.
//! - Anything else that cannot be expressed is one
//!   [`OnnxError::Unsupported`] listing every such node (name, operator,
//!   opset, reason), not the first.
//!
//! - Weights may be stored as external data beside the file (as the
//!   dynamo exporter writes them): read from the file's directory only.
//!
//! The protobuf is decoded by `prost` with hand-written message types for
//! the fields the importer reads ([`proto`]): no `protoc` and no generated
//! code at build time (candle-onnx's types need `protoc` to build).
//! Every size read from a file is checked before it is allocated.

#![warn(missing_docs)]

mod attrs;
mod error;
mod fold;
mod import;
mod ops;
mod order;
pub mod proto;
mod tensor;

pub use error::{OnnxError, UnsupportedNode};
use prost::Message;
use std::path::Path;
use wick_ir::Graph;

/// The lowest default-domain opset imported.
pub const OPSET_MIN: i64 = 13;
/// The highest default-domain opset imported (the supported operators'
/// semantics are the same from 13 to 21).
pub const OPSET_MAX: i64 = 21;
/// The largest file read: protobuf's own 2 GiB limit.
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The batch size: fills a symbolic first input dimension and, when
    /// the file fixes another, re-infers the graph for this one. `None`:
    /// the file's, or 1 where it is symbolic.
    pub batch: Option<usize>,
    /// Most elements one constant (or an input) may have.
    pub max_elements: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            batch: None,
            max_elements: wick_ir::DEFAULT_MAX_ELEMENTS,
        }
    }
}

/// Imports the ONNX model in file `path` (at most [`MAX_FILE_BYTES`]).
pub fn import_file(path: impl AsRef<Path>, options: &ImportOptions) -> Result<Graph, OnnxError> {
    let path = path.as_ref();
    let read_error = |source| OnnxError::Read {
        path: path.display().to_string(),
        source,
    };
    let bytes = std::fs::metadata(path).map_err(read_error)?.len();
    if bytes > MAX_FILE_BYTES {
        return Err(OnnxError::TooLarge {
            bytes,
            limit: MAX_FILE_BYTES,
        });
    }
    let data = std::fs::read(path).map_err(read_error)?;
    tracing::debug!(path = %path.display(), bytes, "reading ONNX model");
    let dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    import_model(&data, options, dir)
}

/// Imports an ONNX model from the bytes of a `ModelProto` (whose weights
/// must then be inside it: there is no directory to find external data in).
pub fn import_bytes(bytes: &[u8], options: &ImportOptions) -> Result<Graph, OnnxError> {
    import_model(bytes, options, None)
}

fn import_model(bytes: &[u8], options: &ImportOptions, dir: Option<&Path>) -> Result<Graph, OnnxError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(OnnxError::TooLarge {
            bytes: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let model = proto::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode { message: e.to_string() })?;
    let graph = import::import(&model, options, dir)?;
    tracing::debug!(
        nodes = graph.len(),
        producer = %model.producer_name,
        "imported ONNX model"
    );
    Ok(graph)
}
