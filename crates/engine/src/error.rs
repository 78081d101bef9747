//! Typed errors of compiling and running graphs.

use wick_ir::TensorFact;

/// Everything that can go wrong compiling or running a graph.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The graph failed verification or is otherwise malformed.
    #[error("invalid graph: {0}")]
    Graph(#[from] wick_ir::IrError),
    /// A constant has no data (e.g. a graph parsed from text without weights).
    #[error("constant `@{name}` has no data; supply it with Graph::set_constant_data")]
    MissingConstant {
        /// The constant's name.
        name: String,
    },
    /// An op with attributes this device's kernels cannot execute.
    #[error("node `%{node}` ({op}) is not supported on {device}: {reason}")]
    Unsupported {
        /// The node.
        node: String,
        /// The op name.
        op: &'static str,
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
    /// A kernel would need more memory than the engine's limits allow.
    #[error("node `%{node}`: {what} would exceed the limit of {limit} elements (wick_ir::Limits, WICK_MAX_ELEMENTS)")]
    TooLarge {
        /// The node.
        node: String,
        /// What would be too large.
        what: String,
        /// The element limit in force.
        limit: usize,
    },
    /// A batch size outside a [`crate::BatchedModel`]'s allow-list.
    #[error("batch size {batch} is not served; the allowed sizes are {allowed:?}")]
    BatchNotAllowed {
        /// The batch size asked for.
        batch: usize,
        /// The sizes served.
        allowed: Vec<usize>,
    },
    /// Wrong number of inputs.
    #[error("graph `{graph}` takes {expected} input(s), got {got}")]
    InputCount {
        /// Graph name.
        graph: String,
        /// Inputs declared.
        expected: usize,
        /// Inputs given.
        got: usize,
    },
    /// An input whose shape or dtype differs from the graph's input fact.
    #[error("input `%{input}` must be {expected}, got {got}")]
    InputMismatch {
        /// The input's name.
        input: String,
        /// The graph's fact for it.
        expected: TensorFact,
        /// What was given.
        got: TensorFact,
    },
    /// A device string that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{given}`; expected `cpu`, `cuda` or `cuda:N`")]
    UnknownDevice {
        /// The string given.
        given: String,
    },
    /// CUDA was requested from a build without the `cuda` feature.
    #[error("device `{given}` needs CUDA support: rebuild with `--features cuda` (see README, 'CUDA')")]
    CudaNotCompiled {
        /// The device string.
        given: String,
    },
    /// The device could not be opened (no GPU, no driver, bad ordinal).
    #[error("cannot open device `{given}`: {source}")]
    DeviceUnavailable {
        /// The device string.
        given: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// `WICK_ISA` or [`crate::Engine::with_cpu_path`] named no path wick has.
    #[error("unknown CPU path `{given}`; expected one of avx512, avx2, scalar (WICK_ISA)")]
    UnknownCpuPath {
        /// The name given.
        given: String,
    },
    /// A CPU path was asked for that this CPU does not support.
    #[error("this CPU has no {path} path; it supports {}", available.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "))]
    CpuPathUnavailable {
        /// The path asked for.
        path: crate::CpuPath,
        /// The paths this CPU supports.
        available: Vec<crate::CpuPath>,
    },
    /// `WICK_WEIGHT_BUDGET` or a parsed [`crate::WeightBudget`] was not a
    /// factor of at least 1 or `unlimited`.
    #[error("invalid weight budget `{given}`; expected a factor of at least 1 (e.g. 2.5) or `unlimited` (WICK_WEIGHT_BUDGET)")]
    InvalidWeightBudget {
        /// The text given.
        given: String,
    },
    /// `WICK_CACHES` (or [`crate::CacheSizes::overridden`]'s text) did not parse.
    #[error("invalid cache sizes `{given}`: {reason}; expected e.g. `l1d=32K,l2=512K,l3=32M` (WICK_CACHES)")]
    InvalidCacheSizes {
        /// The text given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A cache size given to wick (`WICK_CACHES`, [`crate::Engine::with_caches`])
    /// is outside the range it accepts.
    #[error("cache {level} of {size} bytes is outside {min}..={max} bytes (WICK_CACHES, Engine::with_caches)")]
    InvalidCacheSize {
        /// `l1d`, `l2` or `l3`.
        level: &'static str,
        /// The size given, in bytes.
        size: usize,
        /// The least size accepted.
        min: usize,
        /// The largest size accepted.
        max: usize,
    },
    /// `WICK_BATCH_TILING` was set to something else than `on` or `off`.
    #[error("invalid batch tiling `{given}`; expected `on` or `off` (WICK_BATCH_TILING)")]
    InvalidBatchTiling {
        /// The text given.
        given: String,
    },
    /// `WICK_SPIN` was set to something else than `on` or `off`.
    #[error("invalid spinning switch `{given}`; expected `on` or `off` (WICK_SPIN)")]
    InvalidSpin {
        /// The text given.
        given: String,
    },
    /// A probe ([`crate::CpuPath::read_rate`]'s buffer,
    /// [`crate::CpuPath::panel_rate`]'s operands) could not allocate its
    /// memory.
    #[error("cannot allocate {bytes} bytes a thread for the probe")]
    ProbeAllocation {
        /// The memory asked for, per thread.
        bytes: usize,
    },
    /// A candle operation failed while executing a node.
    #[error("candle error in node `%{node}`: {source}")]
    Candle {
        /// The node (or constant) being processed.
        node: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// Attaches the node name to candle errors.
pub(crate) trait AtNode<T> {
    fn at(self, node: &str) -> Result<T, EngineError>;
}

impl<T> AtNode<T> for candle_core::Result<T> {
    fn at(self, node: &str) -> Result<T, EngineError> {
        self.map_err(|source| EngineError::Candle {
            node: node.to_string(),
            source: Box::new(wick_ir::plain_candle_error(source)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{AtNode, EngineError};

    /// A node's candle error is one line even where candle attached a
    /// backtrace (it does whenever `RUST_BACKTRACE` is set).
    #[test]
    fn node_errors_drop_candle_backtraces() {
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch in matmul".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let error: EngineError = Err::<(), _>(traced).at("fc").unwrap_err();
        assert_eq!(
            error.to_string(),
            "candle error in node `%fc`: shape mismatch in matmul"
        );
    }
}
