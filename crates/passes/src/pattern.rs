//! Patterns: small graphs with wildcards, matched shape-agnostically.
//!
//! A pattern matches by op kind and structure only. Shapes, channel counts,
//! kernel sizes and every attribute (stride, padding, dilation, groups, eps)
//! are *captured* — the replacement reads them from the matched nodes — never
//! compared. A structural match is *refused*, with a reason that the pattern
//! pass counts, when an interior value escapes the match (other users, or a
//! graph output), when a wildcard that must be a constant is not, or when
//! dtypes disagree.

use crate::PassError;
use std::collections::{HashMap, HashSet};
use wick_ir::{Graph, NodeId, Op, OpAttrs, OpKind, OpRole};

/// A node of a pattern under construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PatternId(usize);

#[derive(Debug, Clone)]
enum PatternNode {
    /// Any value.
    Value { name: String },
    /// A constant (weight); `optional` ones may be absent as trailing operands.
    Constant { name: String, optional: bool },
    /// An op of kind `kind` (any attributes) applied to `inputs`.
    Op {
        name: String,
        kind: OpKind,
        inputs: Vec<PatternId>,
    },
}

impl PatternNode {
    fn name(&self) -> &str {
        match self {
            PatternNode::Value { name } | PatternNode::Constant { name, .. } | PatternNode::Op { name, .. } => name,
        }
    }

    fn is_optional(&self) -> bool {
        matches!(self, PatternNode::Constant { optional: true, .. })
    }
}

/// Builds a [`Pattern`] with the IR's op vocabulary plus wildcards.
///
/// ```
/// use wick_ir::OpKind;
/// use wick_passes::PatternBuilder;
/// let mut p = PatternBuilder::new();
/// let x = p.value("x");
/// let w = p.constant("weight");
/// let b = p.optional_constant("bias");
/// let conv = p.op("conv", OpKind::Conv2d, &[x, w, b]);
/// let relu = p.op("relu", OpKind::Relu, &[conv]);
/// let pattern = p.build(relu).unwrap();
/// ```
#[derive(Debug, Default)]
pub struct PatternBuilder {
    nodes: Vec<PatternNode>,
}

impl PatternBuilder {
    /// An empty pattern.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, node: PatternNode) -> PatternId {
        self.nodes.push(node);
        PatternId(self.nodes.len() - 1)
    }

    /// A wildcard matching any value. Using it twice requires both uses to be the same value.
    pub fn value(&mut self, name: &str) -> PatternId {
        self.push(PatternNode::Value { name: name.into() })
    }

    /// A wildcard that must be a constant (a weight the replacement can fold).
    pub fn constant(&mut self, name: &str) -> PatternId {
        self.push(PatternNode::Constant {
            name: name.into(),
            optional: false,
        })
    }

    /// Like [`PatternBuilder::constant`], but the operand may be absent (only as a trailing operand).
    pub fn optional_constant(&mut self, name: &str) -> PatternId {
        self.push(PatternNode::Constant {
            name: name.into(),
            optional: true,
        })
    }

    /// An op node: matches graph nodes of `kind` whatever their attributes
    /// (the replacement reads them from the match: [`Match::attrs`]). An
    /// [`Op`] value stands for its kind.
    pub fn op(&mut self, name: &str, kind: impl Into<OpKind>, inputs: &[PatternId]) -> PatternId {
        self.push(PatternNode::Op {
            name: name.into(),
            kind: kind.into(),
            inputs: inputs.to_vec(),
        })
    }

    /// Finishes the pattern rooted at `root` (the value the replacement replaces).
    pub fn build(self, root: PatternId) -> Result<Pattern, PassError> {
        let invalid = |m: String| Err(PassError::InvalidPattern(m));
        let Some(PatternNode::Op { .. }) = self.nodes.get(root.0) else {
            return invalid("the root must be an op node".into());
        };
        let mut names = HashSet::new();
        for node in &self.nodes {
            if !names.insert(node.name()) {
                return invalid(format!("name `{}` used twice", node.name()));
            }
            if let PatternNode::Op { name, inputs, .. } = node {
                if inputs.iter().any(|i| i.0 >= self.nodes.len()) {
                    return invalid(format!("`{name}` refers to a node of another pattern"));
                }
                let first_optional = inputs.iter().position(|i| self.nodes[i.0].is_optional());
                if let Some(first) = first_optional {
                    if inputs[first..].iter().any(|i| !self.nodes[i.0].is_optional()) {
                        return invalid(format!("`{name}`: optional operands must all come last"));
                    }
                }
            }
        }
        Ok(Pattern {
            nodes: self.nodes,
            root,
        })
    }
}

/// A compiled pattern: see the module docs for what matching compares and captures.
#[derive(Debug, Clone)]
pub struct Pattern {
    nodes: Vec<PatternNode>,
    root: PatternId,
}

/// A successful match: graph nodes bound to the pattern's names.
#[derive(Debug, Clone)]
pub struct Match {
    root: NodeId,
    bound: HashMap<String, NodeId>,
    interior: Vec<NodeId>,
}

impl Match {
    /// The graph node matched by the pattern's root (the value to replace).
    pub fn root(&self) -> NodeId {
        self.root
    }

    /// The graph node bound to pattern name `name`; `None` for an absent
    /// optional operand (or a name the pattern does not have).
    pub fn get(&self, name: &str) -> Option<NodeId> {
        self.bound.get(name).copied()
    }

    /// The graph node bound to `name`, which the pattern always binds (an
    /// op or a required operand); a typed error naming it otherwise.
    pub fn node(&self, name: &str) -> Result<NodeId, PassError> {
        self.get(name).ok_or_else(|| PassError::UnboundName(name.to_string()))
    }

    /// The attributes of the op node bound to `name`, of the kind `A` goes
    /// with (which the pattern guarantees); a typed error otherwise.
    pub fn attrs<A: OpAttrs>(&self, graph: &Graph, name: &str) -> Result<A, PassError> {
        let op = &graph.node(self.node(name)?).op;
        A::of(op).ok_or_else(|| PassError::UnexpectedOp {
            name: name.to_string(),
            expected: A::KIND.name(),
            got: op.name(),
        })
    }

    /// All graph nodes matched by op nodes of the pattern (root included).
    pub fn op_nodes(&self) -> &[NodeId] {
        &self.interior
    }
}

/// The outcome of trying a pattern at one node.
#[derive(Debug, Clone)]
pub enum MatchOutcome {
    /// The structure differs.
    NoMatch,
    /// The structure matches but a condition fails; the reason is a counter name.
    Refused(&'static str),
    /// A match.
    Matched(Match),
}

struct State {
    bound: HashMap<String, NodeId>,
    op_nodes: Vec<NodeId>,
    refusal: Option<&'static str>,
}

impl Pattern {
    /// A pattern from an example graph, the way torch's `register_replacement`
    /// traces a function on example inputs: graph inputs become value
    /// wildcards, constants become constant wildcards, the single output is
    /// the root, and node names become the match's names. Shapes and
    /// attributes of the example are ignored.
    pub fn from_graph(graph: &Graph) -> Result<Pattern, PassError> {
        let [output] = graph.outputs() else {
            return Err(PassError::InvalidPattern(format!(
                "example graph `{}` must have exactly one output",
                graph.name()
            )));
        };
        let mut builder = PatternBuilder::new();
        let mut ids = Vec::with_capacity(graph.len());
        for node in graph.nodes() {
            let id = match node.op.role() {
                OpRole::Input => builder.value(&node.name),
                OpRole::Constant => builder.constant(&node.name),
                OpRole::Computed => {
                    let inputs: Vec<PatternId> = node.inputs.iter().map(|i| ids[i.index()]).collect();
                    builder.op(&node.name, node.op.kind(), &inputs)
                }
            };
            ids.push(id);
        }
        builder.build(ids[output.index()])
    }

    /// Tries the pattern with its root at `node`. `users` is [`Graph::users`] of the current graph.
    pub fn match_at(&self, graph: &Graph, users: &[Vec<NodeId>], node: NodeId) -> MatchOutcome {
        let mut state = State {
            bound: HashMap::new(),
            op_nodes: Vec::new(),
            refusal: None,
        };
        if !self.bind(graph, self.root, node, &mut state) {
            return MatchOutcome::NoMatch;
        }
        if let Some(reason) = state.refusal {
            return MatchOutcome::Refused(reason);
        }
        let inside: HashSet<NodeId> = state.op_nodes.iter().copied().collect();
        for &interior in state.op_nodes.iter().filter(|&&n| n != node) {
            if graph.outputs().contains(&interior) {
                return MatchOutcome::Refused("interior_value_is_graph_output");
            }
            if users[interior.index()].iter().any(|u| !inside.contains(u)) {
                return MatchOutcome::Refused("interior_value_has_external_users");
            }
        }
        let dtype = graph.node(node).fact.dtype;
        let bound_constants = self.nodes.iter().filter_map(|p| match p {
            PatternNode::Constant { name, .. } => state.bound.get(name),
            _ => None,
        });
        if state
            .op_nodes
            .iter()
            .chain(bound_constants)
            .any(|&n| graph.node(n).fact.dtype != dtype)
        {
            return MatchOutcome::Refused("dtype_mismatch");
        }
        MatchOutcome::Matched(Match {
            root: node,
            bound: state.bound,
            interior: state.op_nodes,
        })
    }

    /// Structural match of pattern node `pid` against graph node `gid`;
    /// conditions that fail on a structural match are recorded as a refusal.
    fn bind(&self, graph: &Graph, pid: PatternId, gid: NodeId, state: &mut State) -> bool {
        let pattern = &self.nodes[pid.0];
        if let Some(&previous) = state.bound.get(pattern.name()) {
            return previous == gid;
        }
        let node = graph.node(gid);
        match pattern {
            PatternNode::Value { .. } => {}
            PatternNode::Constant { .. } => {
                if node.op != Op::Constant {
                    state.refusal.get_or_insert("parameter_not_constant");
                }
            }
            PatternNode::Op { kind, inputs, .. } => {
                if node.op.kind() != *kind {
                    return false;
                }
                let required = inputs.iter().filter(|i| !self.nodes[i.0].is_optional()).count();
                if node.inputs.len() < required || node.inputs.len() > inputs.len() {
                    return false;
                }
                state.op_nodes.push(gid);
                for (&child, &operand) in inputs.iter().zip(&node.inputs) {
                    if !self.bind(graph, child, operand, state) {
                        return false;
                    }
                }
            }
        }
        state.bound.insert(pattern.name().to_string(), gid);
        true
    }
}
