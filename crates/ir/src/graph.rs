//! The graph itself: nodes in topological order, inputs, outputs and constant data.

use crate::{IrError, Op, OpRole, TensorFact};
use candle_core::Tensor;
use std::collections::HashMap;

/// Index of a node (and of the one value it produces) in its [`Graph`].
///
/// Ids are dense and stay valid until the graph is reordered or compacted
/// ([`Graph::compact`]); passes must not keep them across such a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    /// The position of this node in [`Graph::nodes`].
    pub fn index(self) -> usize {
        self.0 as usize
    }

    fn from_index(index: usize) -> Self {
        NodeId(u32::try_from(index).expect("graphs hold fewer than 2^32 nodes"))
    }
}

/// One SSA node: an op applied to earlier values, producing one value.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Unique value name: the module path it was traced from (`layer1.0.bn1`),
    /// with a `#k` suffix when the same module is called more than once.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// Operands, all defined by earlier nodes.
    pub inputs: Vec<NodeId>,
    /// Dtype and shape of the value this node produces.
    pub fact: TensorFact,
}

impl Node {
    /// The module path this node came from: its name up to any `#k` call suffix.
    pub fn path(&self) -> &str {
        self.name.split('#').next().unwrap_or(&self.name)
    }
}

/// A typed SSA graph. Nodes are stored in topological order.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    name: String,
    nodes: Vec<Node>,
    inputs: Vec<NodeId>,
    outputs: Vec<NodeId>,
    names: HashMap<String, NodeId>,
    constants: HashMap<String, Tensor>,
}

impl PartialEq for Graph {
    /// Structural equality: name, nodes, inputs and outputs (constant data is not compared).
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.nodes == other.nodes
            && self.inputs == other.inputs
            && self.outputs == other.outputs
    }
}

/// Whether `name` is a valid value, constant or graph name.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '#' | '-'))
}

impl Graph {
    /// An empty graph called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The graph's name (the model it was traced from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All nodes in topological order; a node's id is its index here.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Ids of all nodes, in order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        (0..self.nodes.len()).map(NodeId::from_index)
    }

    /// One node.
    ///
    /// # Panics
    /// If `id` does not belong to this graph (ids come only from this graph's methods).
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// One node, mutably. Changing a node can break the graph's invariants;
    /// run [`Graph::verify`] afterwards.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.index()]
    }

    /// The graph inputs, in signature order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// The graph outputs, in return order.
    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }

    /// Looks a value up by name.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).copied()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `name` if it is free, otherwise `name#1`, `name#2`, ...: the name of
    /// the k-th further call of one module.
    pub fn unique_name(&self, name: &str) -> String {
        if !self.names.contains_key(name) {
            return name.to_string();
        }
        (1..)
            .map(|k| format!("{name}#{k}"))
            .find(|candidate| !self.names.contains_key(candidate))
            .expect("an unused suffix exists")
    }

    fn push(&mut self, node: Node) -> Result<NodeId, IrError> {
        if !is_valid_name(&node.name) {
            return Err(IrError::InvalidName { name: node.name });
        }
        if self.names.contains_key(&node.name) {
            return Err(IrError::DuplicateName { name: node.name });
        }
        let id = NodeId::from_index(self.nodes.len());
        self.names.insert(node.name.clone(), id);
        self.nodes.push(node);
        Ok(id)
    }

    /// Appends a graph input with a declared fact.
    pub fn add_input(&mut self, name: impl Into<String>, fact: TensorFact) -> Result<NodeId, IrError> {
        let id = self.push(Node {
            name: name.into(),
            op: Op::Input,
            inputs: vec![],
            fact,
        })?;
        self.inputs.push(id);
        Ok(id)
    }

    /// Appends a constant holding `data`, named by its safetensors key.
    pub fn add_constant(&mut self, name: impl Into<String>, data: Tensor) -> Result<NodeId, IrError> {
        let name = name.into();
        let id = self.add_constant_decl(name.clone(), TensorFact::of(&data))?;
        self.constants.insert(name, data);
        Ok(id)
    }

    /// Appends a constant whose data is not known yet (as parsed from text);
    /// supply it later with [`Graph::set_constant_data`].
    pub fn add_constant_decl(&mut self, name: impl Into<String>, fact: TensorFact) -> Result<NodeId, IrError> {
        self.push(Node {
            name: name.into(),
            op: Op::Constant,
            inputs: vec![],
            fact,
        })
    }

    /// Appends `op(inputs)`, inferring its fact. The name must be unused.
    pub fn add_node(&mut self, name: impl Into<String>, op: Op, inputs: &[NodeId]) -> Result<NodeId, IrError> {
        let name = name.into();
        let fact = self.infer(&name, &op, inputs)?;
        self.push(Node {
            name,
            op,
            inputs: inputs.to_vec(),
            fact,
        })
    }

    /// The fact `op(inputs)` would have, or why it cannot be built.
    pub fn infer(&self, name: &str, op: &Op, inputs: &[NodeId]) -> Result<TensorFact, IrError> {
        if matches!(op, Op::Input | Op::Constant) {
            return Err(IrError::InvalidNode {
                node: name.to_string(),
                op: op.name(),
                message: "inputs and constants are added with add_input / add_constant".into(),
            });
        }
        let mut facts = Vec::with_capacity(inputs.len());
        for input in inputs {
            let node = self.nodes.get(input.index()).ok_or(IrError::UnknownValue {
                node: name.to_string(),
                input: input.index(),
            })?;
            facts.push(&node.fact);
        }
        op.infer(&facts).map_err(|message| IrError::InvalidNode {
            node: name.to_string(),
            op: op.name(),
            message,
        })
    }

    /// Sets the graph outputs.
    pub fn set_outputs(&mut self, outputs: Vec<NodeId>) {
        self.outputs = outputs;
    }

    /// The data of a constant, if supplied.
    pub fn constant_data(&self, name: &str) -> Option<&Tensor> {
        self.constants.get(name)
    }

    /// Removes and returns the data of constant `@name` (the node stays, a
    /// declaration without data): how a consumer that owns the graph hands
    /// each weight on and frees it as it goes.
    pub fn take_constant_data(&mut self, name: &str) -> Option<Tensor> {
        self.constants.remove(name)
    }

    /// Supplies (or replaces) the data of constant `@name`; its dtype and shape
    /// must equal the declared fact.
    pub fn set_constant_data(&mut self, name: &str, data: Tensor) -> Result<(), IrError> {
        let id = self
            .find(name)
            .filter(|id| self.node(*id).op == Op::Constant)
            .ok_or_else(|| IrError::NotAConstant { name: name.into() })?;
        let got = TensorFact::of(&data);
        let expected = &self.node(id).fact;
        if &got != expected {
            return Err(IrError::ConstantMismatch {
                name: name.into(),
                expected: expected.clone(),
                got,
            });
        }
        self.constants.insert(name.to_string(), data);
        Ok(())
    }

    /// For every node, the nodes that use its value (each user once per use).
    pub fn users(&self) -> Vec<Vec<NodeId>> {
        let mut users = vec![Vec::new(); self.nodes.len()];
        for (index, node) in self.nodes.iter().enumerate() {
            for input in &node.inputs {
                users[input.index()].push(NodeId::from_index(index));
            }
        }
        users
    }

    /// For every node, whether an output depends on it (graph inputs always count as live).
    pub fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.nodes.len()];
        for input in &self.inputs {
            live[input.index()] = true;
        }
        let mut reached = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = self.outputs.clone();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut reached[id.index()], true) {
                continue;
            }
            live[id.index()] = true;
            stack.extend(self.nodes[id.index()].inputs.iter().copied());
        }
        live
    }

    /// Redirects every use of `old` (including graph outputs) to `new`.
    /// The graph may then be out of topological order: call [`Graph::compact`].
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        for node in &mut self.nodes {
            for input in &mut node.inputs {
                if *input == old {
                    *input = new;
                }
            }
        }
        for output in &mut self.outputs {
            if *output == old {
                *output = new;
            }
        }
    }

    /// Restores topological order and drops the nodes `keep` rejects.
    ///
    /// The order is stable: each node keeps its place unless one of its inputs
    /// comes later, in which case that input is moved just before its first
    /// user. Graph inputs are always kept. Node ids change: ids held before
    /// this call are invalid after it. Returns the number of nodes dropped.
    pub fn compact(&mut self, keep: impl Fn(NodeId, &Node) -> bool) -> usize {
        let count = self.nodes.len();
        let kept: Vec<bool> = self
            .node_ids()
            .map(|id| self.node(id).op == Op::Input || keep(id, self.node(id)))
            .collect();
        // Depth-first post-order, visiting nodes in their current order.
        let mut order = Vec::with_capacity(count);
        let mut state = vec![0u8; count]; // 0 = new, 1 = on stack, 2 = emitted
        for root in 0..count {
            if !kept[root] || state[root] != 0 {
                continue;
            }
            let mut stack = vec![(root, 0usize)];
            state[root] = 1;
            while let Some((index, next_input)) = stack.pop() {
                match self.nodes[index].inputs.get(next_input) {
                    Some(input) => {
                        stack.push((index, next_input + 1));
                        let input = input.index();
                        if state[input] == 0 {
                            state[input] = 1;
                            stack.push((input, 0));
                        }
                    }
                    None => {
                        state[index] = 2;
                        order.push(index);
                    }
                }
            }
        }
        let mut new_index = vec![usize::MAX; count];
        for (position, &old) in order.iter().enumerate() {
            new_index[old] = position;
        }
        let remap = |id: NodeId| NodeId::from_index(new_index[id.index()]);
        let mut old_nodes: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order
            .iter()
            .map(|&old| {
                let mut node = old_nodes[old].take().expect("each node emitted once");
                node.inputs = node.inputs.iter().map(|&i| remap(i)).collect();
                node
            })
            .collect();
        self.inputs = self.inputs.iter().map(|&i| remap(i)).collect();
        self.outputs = self.outputs.iter().map(|&i| remap(i)).collect();
        self.names = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), NodeId::from_index(i)))
            .collect();
        let live: std::collections::HashSet<&str> = self
            .nodes
            .iter()
            .filter(|n| n.op == Op::Constant)
            .map(|n| n.name.as_str())
            .collect();
        self.constants.retain(|name, _| live.contains(name.as_str()));
        count - self.nodes.len()
    }

    /// Renames a node. The new name must be valid and unused.
    pub fn rename(&mut self, id: NodeId, name: impl Into<String>) -> Result<(), IrError> {
        let name = name.into();
        if !is_valid_name(&name) {
            return Err(IrError::InvalidName { name });
        }
        if self.names.contains_key(&name) {
            return Err(IrError::DuplicateName { name });
        }
        let old = std::mem::replace(&mut self.nodes[id.index()].name, name.clone());
        self.names.remove(&old);
        if let Some(data) = self.constants.remove(&old) {
            self.constants.insert(name.clone(), data);
        }
        self.names.insert(name, id);
        Ok(())
    }
}

impl Graph {
    /// The same graph for a different batch size: every input's first
    /// dimension becomes `batch` and every fact is re-inferred (weights are
    /// shared, not copied). Fails if an op cannot take the new shapes.
    pub fn with_batch(&self, batch: usize) -> Result<Graph, IrError> {
        let mut graph = self.clone();
        for index in 0..graph.nodes.len() {
            let node = &graph.nodes[index];
            let fact = match node.op.role() {
                OpRole::Constant => continue,
                OpRole::Input => {
                    let mut fact = node.fact.clone();
                    match fact.shape.first_mut() {
                        Some(first) => *first = batch,
                        None => {
                            return Err(IrError::InvalidNode {
                                node: node.name.clone(),
                                op: node.op.name(),
                                message: "a scalar input has no batch dimension".into(),
                            })
                        }
                    }
                    fact
                }
                OpRole::Computed => graph.infer(&node.name, &node.op, &node.inputs)?,
            };
            graph.nodes[index].fact = fact;
        }
        Ok(graph)
    }
}
