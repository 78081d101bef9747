//! The `Pass` trait every graph rewrite implements.

use crate::{PassCounters, PassError};
use wick_ir::Graph;

/// A graph rewrite. It names itself in kebab-case, edits the graph in place,
/// records what it did in the counters it is handed, and says whether it
/// changed anything. The [`crate::PassManager`] verifies the graph after it.
pub trait Pass: Send + Sync {
    /// Kebab-case name, e.g. `fuse-conv-batch-norm`; also the counters' key.
    fn name(&self) -> &str;

    /// Rewrites `graph`; returns whether it changed.
    fn run(&self, graph: &mut Graph, counters: &mut PassCounters<'_>) -> Result<bool, PassError>;
}
