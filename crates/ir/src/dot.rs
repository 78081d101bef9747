//! Graphviz DOT export, with fused nodes (names joined by `+`) marked.

use crate::print::op_text;
use crate::{Graph, Op, OpRole};
use std::fmt::Write;

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Graph {
    /// The graph as Graphviz DOT. Constants are folded into their user's
    /// label (weights are not data flow); fused nodes, whose names join their
    /// sources with `+`, are filled orange and say `fused`.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "digraph \"{}\" {{", escape(self.name()));
        let _ = writeln!(
            out,
            "  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];"
        );
        for (index, node) in self.nodes().iter().enumerate() {
            let id = format!("n{index}");
            match node.op.role() {
                OpRole::Constant => continue,
                OpRole::Input => {
                    let _ = writeln!(
                        out,
                        "  {id} [label=\"%{}\\n{}\", shape=ellipse];",
                        escape(&node.name),
                        node.fact
                    );
                }
                OpRole::Computed => {
                    let fused = node.name.contains('+');
                    let constants: Vec<String> = node
                        .inputs
                        .iter()
                        .map(|&i| self.node(i))
                        .filter(|n| n.op == Op::Constant)
                        .map(|n| format!("@{}", n.name))
                        .collect();
                    let mut label = format!("%{}\\n{}", escape(&node.name), escape(&op_text(&node.op)));
                    if !constants.is_empty() {
                        let _ = write!(label, "\\n{}", escape(&constants.join(" ")));
                    }
                    let _ = write!(label, "\\n{}", node.fact);
                    let style = if fused {
                        ", style=filled, fillcolor=\"#ffb347\", xlabel=\"fused\""
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "  {id} [label=\"{label}\"{style}];");
                }
            }
            for &input in &node.inputs {
                if self.node(input).op != Op::Constant {
                    let _ = writeln!(out, "  n{} -> {id};", input.index());
                }
            }
        }
        for (k, output) in self.outputs().iter().enumerate() {
            let _ = writeln!(
                out,
                "  out{k} [label=\"output {k}\", shape=ellipse];\n  n{} -> out{k};",
                output.index()
            );
        }
        out.push_str("}\n");
        out
    }
}
