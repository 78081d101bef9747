//! Typed errors of the IR crate: building, verifying and parsing graphs.

use crate::TensorFact;
use std::fmt;

/// One thing wrong with one node, as found by the verifier or by fact inference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Name of the node at fault (without sigil), or the graph name for graph-level problems.
    pub node: String,
    /// What is wrong, naming what was expected and what was found.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}: {}", self.node, self.message)
    }
}

/// A syntax or name error in IR text, with its 1-based position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column of the offending token.
    pub column: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

/// Errors raised while building, verifying or parsing a [`crate::Graph`].
#[derive(Debug, thiserror::Error)]
pub enum IrError {
    /// A node name is used twice.
    #[error("duplicate value name `{name}`")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A name is not a valid value name.
    #[error("invalid value name `{name}`: expected one or more of [A-Za-z0-9_.+#-]")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A node refers to a value id that does not exist in this graph.
    #[error("node `{node}` refers to value #{input} which is not defined before it")]
    UnknownValue {
        /// The node being built.
        node: String,
        /// The raw index of the missing value.
        input: usize,
    },
    /// An op cannot accept its inputs (wrong arity, shapes or dtypes).
    #[error("node `{node}` ({op}): {message}")]
    InvalidNode {
        /// The node being built.
        node: String,
        /// The op's text name.
        op: &'static str,
        /// What was expected and what was found.
        message: String,
    },
    /// Constant data does not agree with the constant node's fact.
    #[error("constant `@{name}`: expected {expected}, got data of {got}")]
    ConstantMismatch {
        /// Constant name (its safetensors key).
        name: String,
        /// The fact declared in the graph.
        expected: TensorFact,
        /// The fact of the supplied data.
        got: TensorFact,
    },
    /// A name was looked up that is not a constant of this graph.
    #[error("`@{name}` is not a constant of this graph")]
    NotAConstant {
        /// The name looked up.
        name: String,
    },
    /// The verifier found one or more violations; all are listed.
    #[error("graph `{graph}` failed verification with {} violation(s):\n{}", violations.len(), violations.iter().map(|v| format!("  {v}")).collect::<Vec<_>>().join("\n"))]
    Verify {
        /// Graph name.
        graph: String,
        /// Every violation found.
        violations: Vec<Violation>,
    },
    /// IR text could not be parsed.
    #[error("IR parse error at {0}")]
    Parse(ParseError),
}
