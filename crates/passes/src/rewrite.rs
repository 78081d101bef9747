//! `PatternPass`: a pass made of (pattern, replacement) rules — the Rust
//! shape of torch.compile's `register_replacement` — and the `Rewriter` that
//! replacements build new nodes with.

use crate::pattern::MatchOutcome;
use crate::{Match, Pass, PassCounters, PassError, Pattern};
use candle_core::Tensor;
use wick_ir::{Graph, NodeId, Op};

/// What a replacement decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// Replace every use of the match's root with this new node.
    With(NodeId),
    /// Leave the graph as it is; the reason is counted as `skipped.{reason}`.
    Refuse(&'static str),
}

/// Graph surgery available to a replacement: read the graph, add constants
/// and nodes (names are made unique). The pattern pass redirects the root's
/// uses and restores order; dead-code elimination removes what is left over.
#[derive(Debug)]
pub struct Rewriter<'g> {
    graph: &'g mut Graph,
    pass: &'g str,
    created: usize,
}

impl Rewriter<'_> {
    /// The graph as it is now.
    pub fn graph(&self) -> &Graph {
        self.graph
    }

    /// The pass this rewrite belongs to (for error messages).
    pub fn pass(&self) -> &str {
        self.pass
    }

    /// The data of constant `id`.
    pub fn constant_data(&self, id: NodeId) -> Result<&Tensor, PassError> {
        let name = &self.graph.node(id).name;
        self.graph
            .constant_data(name)
            .ok_or_else(|| PassError::MissingConstant {
                pass: self.pass.to_string(),
                name: name.clone(),
            })
    }

    /// Adds a constant named `name` (or `name#k` if taken).
    pub fn add_constant(&mut self, name: &str, data: Tensor) -> Result<NodeId, PassError> {
        let name = self.graph.unique_name(name);
        self.created += 1;
        self.graph
            .add_constant(name, data)
            .map_err(|source| self.ir_error(source))
    }

    /// Adds `op(inputs)` named `name` (or `name#k` if taken), inferring its fact.
    pub fn add_node(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, PassError> {
        let name = self.graph.unique_name(name);
        self.created += 1;
        self.graph
            .add_node(name, op, inputs)
            .map_err(|source| self.ir_error(source))
    }

    /// Wraps a candle error from tensor arithmetic at `node`.
    pub fn candle_error(&self, node: NodeId, source: candle_core::Error) -> PassError {
        PassError::Candle {
            pass: self.pass.to_string(),
            node: self.graph.node(node).name.clone(),
            source: Box::new(wick_ir::plain_candle_error(source)),
        }
    }

    fn ir_error(&self, source: wick_ir::IrError) -> PassError {
        PassError::Ir {
            pass: self.pass.to_string(),
            source,
        }
    }
}

/// Which nodes are live, and each node's live users.
fn live_users(graph: &Graph) -> (Vec<bool>, Vec<Vec<NodeId>>) {
    let live = graph.live();
    let mut users = graph.users();
    for list in &mut users {
        list.retain(|user| live[user.index()]);
    }
    (live, users)
}

type ReplaceFn = dyn Fn(&Match, &mut Rewriter<'_>) -> Result<Replacement, PassError> + Send + Sync;

struct Rule {
    pattern: Pattern,
    replace: Box<ReplaceFn>,
}

/// A pass built from `(pattern, replacement)` rules. wick's own fusions and
/// user rewrites are written with exactly this API.
///
/// Counters: `matched` per replacement applied, `skipped.{reason}` per refusal.
pub struct PatternPass {
    name: String,
    rules: Vec<Rule>,
}

impl std::fmt::Debug for PatternPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatternPass")
            .field("name", &self.name)
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl PatternPass {
    /// An empty pattern pass named `name` (kebab-case).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            rules: Vec::new(),
        }
    }

    /// Registers a rule: wherever `pattern` matches (and is not refused),
    /// `replace` builds the replacement value.
    pub fn register_replacement(
        mut self,
        pattern: Pattern,
        replace: impl Fn(&Match, &mut Rewriter<'_>) -> Result<Replacement, PassError> + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule {
            pattern,
            replace: Box::new(replace),
        });
        self
    }
}

impl Pass for PatternPass {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, graph: &mut Graph, counters: &mut PassCounters<'_>) -> Result<bool, PassError> {
        let mut changed = false;
        for rule in &self.rules {
            let candidates: Vec<NodeId> = graph.node_ids().collect();
            let mut consumed = vec![false; candidates.len()];
            let (mut live, mut users) = live_users(graph);
            for &node in &candidates {
                // Nodes left dead by earlier rewrites are not candidates, nor
                // do they count as users: they are only waiting for DCE.
                if consumed[node.index()] || !live[node.index()] {
                    continue;
                }
                let found = match rule.pattern.match_at(graph, &users, node) {
                    MatchOutcome::NoMatch => continue,
                    MatchOutcome::Refused(reason) => {
                        tracing::debug!(pass = %self.name, node = %graph.node(node).name, reason, "match refused");
                        counters.bump(&format!("skipped.{reason}"));
                        continue;
                    }
                    MatchOutcome::Matched(found) => found,
                };
                let mut rewriter = Rewriter {
                    graph,
                    pass: &self.name,
                    created: 0,
                };
                let decision = (rule.replace)(&found, &mut rewriter)?;
                changed |= rewriter.created > 0;
                match decision {
                    Replacement::With(new) => {
                        tracing::debug!(
                            pass = %self.name,
                            root = %graph.node(found.root()).name,
                            replacement = %graph.node(new).name,
                            "replaced"
                        );
                        graph.replace_all_uses(found.root(), new);
                        consumed.resize(graph.len(), false);
                        for &n in found.op_nodes() {
                            consumed[n.index()] = true;
                        }
                        counters.bump("matched");
                        changed = true;
                        (live, users) = live_users(graph);
                    }
                    Replacement::Refuse(reason) => {
                        tracing::debug!(pass = %self.name, node = %graph.node(node).name, reason, "replacement refused");
                        counters.bump(&format!("skipped.{reason}"));
                    }
                }
            }
            if changed {
                graph.compact(|_, _| true);
            }
        }
        Ok(changed)
    }
}
