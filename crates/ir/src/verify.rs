//! The verifier: re-derives every fact and checks every invariant, reporting all violations at once.

use crate::graph::is_valid_name;
use crate::{Graph, IrError, Limits, Op, OpRole, TensorFact, Violation};
use std::collections::HashSet;

impl Graph {
    /// Checks the whole graph and returns every violation found:
    /// names valid and unique, operands defined earlier (topological order),
    /// arity, each node's fact equal to the one its op infers, inputs listed
    /// in the signature, at least one output, and constant data (where
    /// supplied) agreeing with its declaration, and every fact within
    /// [`Limits::default`] (no zero-sized dimension, at most
    /// [`crate::DEFAULT_MAX_ELEMENTS`] elements).
    pub fn verify(&self) -> Result<(), IrError> {
        self.verify_with(&Limits::default())
    }

    /// [`Graph::verify`] with the given size limits.
    pub fn verify_with(&self, limits: &Limits) -> Result<(), IrError> {
        let violations = self.violations_with(limits);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(IrError::Verify {
                graph: self.name().to_string(),
                violations,
            })
        }
    }

    /// Every violation of the graph's invariants under [`Limits::default`];
    /// empty when the graph is sound.
    pub fn violations(&self) -> Vec<Violation> {
        self.violations_with(&Limits::default())
    }

    /// Every violation of the graph's invariants under `limits`.
    pub fn violations_with(&self, limits: &Limits) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut report = |node: &str, message: String| {
            out.push(Violation {
                node: node.to_string(),
                message,
            })
        };
        let mut seen = HashSet::new();
        let declared_inputs: HashSet<usize> = self.inputs().iter().map(|i| i.index()).collect();
        for (index, node) in self.nodes().iter().enumerate() {
            if !is_valid_name(&node.name) {
                report(&node.name, "invalid name".into());
            }
            if !seen.insert(node.name.as_str()) {
                report(&node.name, "name defined more than once".into());
            }
            if let Err(message) = limits.check(&node.fact) {
                report(&node.name, message);
            }
            let mut operands_ok = true;
            for input in &node.inputs {
                if input.index() >= index {
                    operands_ok = false;
                    let what = self
                        .nodes()
                        .get(input.index())
                        .map(|n| format!("`{}`", n.name))
                        .unwrap_or_else(|| format!("#{}", input.index()));
                    report(&node.name, format!("operand {what} is not defined before this node"));
                }
            }
            match node.op.role() {
                OpRole::Input if !declared_inputs.contains(&index) => {
                    report(&node.name, "input node missing from the graph signature".into());
                }
                OpRole::Input => {}
                OpRole::Constant => {
                    if let Some(data) = self.constant_data(&node.name) {
                        let got = TensorFact::of(data);
                        if got != node.fact {
                            report(&node.name, format!("constant data is {got}, declared {}", node.fact));
                        }
                    }
                }
                OpRole::Computed if operands_ok => {
                    let facts: Vec<&TensorFact> = node.inputs.iter().map(|i| &self.node(*i).fact).collect();
                    match node.op.infer(&facts) {
                        Ok(inferred) if inferred != node.fact => report(
                            &node.name,
                            format!("fact is {} but {} infers {inferred}", node.fact, node.op.name()),
                        ),
                        Ok(_) => {}
                        Err(message) => report(&node.name, format!("{}: {message}", node.op.name())),
                    }
                }
                OpRole::Computed => {}
            }
            if !node.inputs.is_empty() && node.op.role() != OpRole::Computed {
                report(&node.name, format!("{} takes no operands", node.op.name()));
            }
        }
        for input in self.inputs() {
            match self.nodes().get(input.index()) {
                Some(node) if node.op == Op::Input => {}
                _ => report(
                    self.name(),
                    format!("signature input #{} is not an input node", input.index()),
                ),
            }
        }
        if self.outputs().is_empty() {
            report(self.name(), "graph has no outputs".into());
        }
        for output in self.outputs() {
            if output.index() >= self.len() {
                report(self.name(), format!("output #{} does not exist", output.index()));
            }
        }
        out
    }
}
