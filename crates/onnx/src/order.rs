//! The order nodes are imported in: topological over the values they read
//! and write (an ONNX file is meant to be sorted already; a file that is
//! not still imports), with a missing value, a value written twice and a
//! cycle each a typed error.

use crate::proto::NodeProto;
use crate::OnnxError;
use std::collections::{HashMap, HashSet};

/// The indices of `nodes` in an order where every node comes after the
/// producers of its inputs; `available` holds the values that exist before
/// any node runs (graph inputs, initializers).
pub(crate) fn topological(nodes: &[NodeProto], available: &HashSet<&str>) -> Result<Vec<usize>, OnnxError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (index, node) in nodes.iter().enumerate() {
        for output in node.output.iter().filter(|o| !o.is_empty()) {
            if available.contains(output.as_str()) || producer.insert(output, index).is_some() {
                return Err(OnnxError::DuplicateValue { value: output.clone() });
            }
        }
    }
    // For each node: how many of its inputs' producers are still to come,
    // and which nodes wait on it.
    let mut waiting = vec![0usize; nodes.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (index, node) in nodes.iter().enumerate() {
        let mut seen = HashSet::new();
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            if available.contains(input.as_str()) {
                continue;
            }
            let Some(&from) = producer.get(input.as_str()) else {
                return Err(OnnxError::MissingValue {
                    node: display_name(node),
                    value: input.clone(),
                });
            };
            if seen.insert(from) {
                waiting[index] += 1;
                dependents[from].push(index);
            }
        }
    }
    // Kahn's algorithm, smallest index first among the ready ones, so a
    // sorted file keeps its order.
    let mut ready: std::collections::BTreeSet<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(index) = ready.pop_first() {
        order.push(index);
        for &next in &dependents[index] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.insert(next);
            }
        }
    }
    if order.len() < nodes.len() {
        let nodes = (0..nodes.len())
            .filter(|&i| waiting[i] > 0)
            .map(|i| display_name(&nodes[i]))
            .collect();
        return Err(OnnxError::Cycle { nodes });
    }
    Ok(order)
}

/// A node's name for messages: its own, else its first output's, else its op.
pub(crate) fn display_name(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        return node.name.clone();
    }
    node.output
        .iter()
        .find(|o| !o.is_empty())
        .cloned()
        .unwrap_or_else(|| node.op_type.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: "Relu".into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Out-of-order nodes are sorted; a missing value, a value written
    /// twice and a cycle are the errors that say so.
    #[test]
    fn sorts_and_refuses() {
        let x: HashSet<&str> = ["x"].into();
        let nodes = [node("b", &["a"], &["b"]), node("a", &["x"], &["a"])];
        assert_eq!(topological(&nodes, &x).unwrap(), [1, 0]);
        let missing = [node("a", &["y"], &["a"])];
        assert!(matches!(topological(&missing, &x), Err(OnnxError::MissingValue { value, .. }) if value == "y"));
        let twice = [node("a", &["x"], &["a"]), node("b", &["x"], &["a"])];
        assert!(matches!(topological(&twice, &x), Err(OnnxError::DuplicateValue { value }) if value == "a"));
        let shadow = [node("a", &["x"], &["x"])];
        assert!(matches!(
            topological(&shadow, &x),
            Err(OnnxError::DuplicateValue { .. })
        ));
        let cycle = [
            node("a", &["x", "c"], &["a"]),
            node("b", &["a"], &["b"]),
            node("c", &["b"], &["c"]),
        ];
        match topological(&cycle, &x) {
            Err(OnnxError::Cycle { nodes }) => assert_eq!(nodes, ["a", "b", "c"]),
            other => panic!("{other:?}"),
        }
    }
}
