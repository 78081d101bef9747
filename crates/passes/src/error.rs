//! Typed errors of passes and the pass manager.

use std::path::PathBuf;

/// Errors raised while running passes.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A pass left the graph in a state the verifier rejects.
    #[error("after pass `{pass}`: {source}")]
    VerifyAfter {
        /// The pass that ran last.
        pass: String,
        /// The verifier's report.
        #[source]
        source: wick_ir::IrError,
    },
    /// A graph edit failed.
    #[error("in pass `{pass}`: {source}")]
    Ir {
        /// The pass.
        pass: String,
        /// The IR error.
        #[source]
        source: wick_ir::IrError,
    },
    /// Tensor arithmetic (a weight fold) failed.
    #[error("in pass `{pass}` at `%{node}`: {source}")]
    Candle {
        /// The pass.
        pass: String,
        /// The node being rewritten.
        node: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A constant a rewrite needs has no data.
    #[error("in pass `{pass}`: constant `@{name}` has no data")]
    MissingConstant {
        /// The pass.
        pass: String,
        /// The constant.
        name: String,
    },
    /// A pattern was built wrongly (a programming error in the pattern, reported, not panicked).
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
    /// A replacement asked a match for a name its pattern does not bind.
    #[error("the match binds no node named `{0}`")]
    UnboundName(String),
    /// A replacement asked a matched node for another op kind's attributes.
    #[error("the matched node `{name}` is {got}, not {expected}")]
    UnexpectedOp {
        /// The pattern name.
        name: String,
        /// The kind asked for.
        expected: &'static str,
        /// The kind matched.
        got: &'static str,
    },
    /// A user pass was registered at an extension point the pipeline lacks.
    #[error("pipeline has no extension point `{0}`")]
    NoSuchPoint(String),
    /// Writing an IR dump failed.
    #[error("cannot write IR dump `{path}`: {source}")]
    Dump {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
