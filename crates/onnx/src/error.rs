//! The importer's typed errors: every way a file can fail to import names
//! the thing at fault and what was expected.

use std::fmt;

/// One node the importer cannot express in wick's IR, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedNode {
    /// The node's name (its first output's when the node has none).
    pub name: String,
    /// Its operator.
    pub op_type: String,
    /// Its domain (`""` for ONNX's own).
    pub domain: String,
    /// The version of the node's operator set in the file.
    pub opset: i64,
    /// What is not supported: the operator, an attribute value, an operand
    /// that is not a constant where wick needs one.
    pub reason: String,
}

impl fmt::Display for UnsupportedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let domain = match self.domain.as_str() {
            "" | "ai.onnx" => String::new(),
            other => format!("{other}::"),
        };
        write!(
            f,
            "`{}` ({domain}{}, opset {}): {}",
            self.name, self.op_type, self.opset, self.reason
        )
    }
}

/// Why an ONNX model could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file could not be read.
    #[error("cannot read ONNX file `{path}`: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than the importer reads.
    #[error("ONNX file of {bytes} bytes exceeds the {limit}-byte limit (protobuf's own is 2 GiB; external data is not supported)")]
    TooLarge {
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes are not an ONNX `ModelProto`.
    #[error("not a valid ONNX model (protobuf decoding failed: {message})")]
    Decode {
        /// The decoder's message.
        message: String,
    },
    /// The model has no graph.
    #[error("the ONNX model has no graph")]
    NoGraph,
    /// The model's default operator set is one the importer does not read.
    #[error("ONNX opset {version} is not supported: expected {min}..={max}")]
    Opset {
        /// The file's default-domain opset.
        version: i64,
        /// The lowest supported.
        min: i64,
        /// The highest supported.
        max: i64,
    },
    /// A graph input wick cannot take.
    #[error("graph input `{name}`: {message}")]
    Input {
        /// The input's ONNX name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A constant tensor (initializer or `Constant` value) wick cannot read.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A node reads a value that no node, initializer or input produces.
    #[error("node `{node}` reads `{value}`, which no node, initializer or graph input produces")]
    MissingValue {
        /// The reading node.
        node: String,
        /// The missing value's name.
        value: String,
    },
    /// Two producers for one value name.
    #[error("value `{value}` is produced more than once")]
    DuplicateValue {
        /// The value's name.
        value: String,
    },
    /// The nodes form a cycle (an ONNX graph is acyclic).
    #[error("the graph has a cycle through {}", .nodes.join(", "))]
    Cycle {
        /// The nodes on or behind the cycle (never ordered).
        nodes: Vec<String>,
    },
    /// Nodes wick cannot express: every one of them, not just the first.
    #[error("{} unsupported node(s):\n  {}", .nodes.len(), .nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Unsupported {
        /// Each node with its reason.
        nodes: Vec<UnsupportedNode>,
    },
    /// A graph output wick cannot return.
    #[error("graph output `{name}`: {message}")]
    Output {
        /// The output's ONNX name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Building the IR graph failed (a shape the op cannot take).
    #[error("building wick IR: {0}")]
    Ir(#[from] wick_ir::IrError),
}
