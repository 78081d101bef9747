//! `eliminate-dead-code`: removes nodes no output depends on.

use crate::{Pass, PassCounters, PassError};
use wick_ir::{Graph, Op};

/// Removes every node (and constant) that no graph output depends on.
/// Counters: `removed_nodes`, `removed_constants`.
#[derive(Debug, Default, Clone, Copy)]
pub struct EliminateDeadCode;

impl Pass for EliminateDeadCode {
    fn name(&self) -> &str {
        "eliminate-dead-code"
    }

    fn run(&self, graph: &mut Graph, counters: &mut PassCounters<'_>) -> Result<bool, PassError> {
        let live = graph.live();
        let (mut nodes, mut constants) = (0, 0);
        for (node, alive) in graph.nodes().iter().zip(&live) {
            if !alive {
                if node.op == Op::Constant {
                    constants += 1;
                } else {
                    nodes += 1;
                }
            }
        }
        if nodes + constants == 0 {
            return Ok(false);
        }
        graph.compact(|id, _| live[id.index()]);
        counters.add("removed_nodes", nodes);
        counters.add("removed_constants", constants);
        Ok(true)
    }
}
