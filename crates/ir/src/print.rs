//! The text form of a graph: one line per node, the same in dumps, errors and golden tests.

use crate::{Graph, Node, Op};
use std::fmt::{self, Write};

fn pair(values: [usize; 2]) -> String {
    format!("[{},{}]", values[0], values[1])
}

/// The op with its attributes, as printed before the operand list: `conv2d[stride=[1,1], ...]`.
pub(crate) fn op_text(op: &Op) -> String {
    match op {
        Op::Conv2d(a) => format!(
            "{}[stride={}, padding={}, dilation={}, groups={}]",
            op.name(),
            pair(a.stride),
            pair(a.padding),
            pair(a.dilation),
            a.groups
        ),
        Op::FusedConv2d(a) => format!(
            "{}[stride={}, padding={}, dilation={}, groups={}, {}{}{}]",
            op.name(),
            pair(a.conv.stride),
            pair(a.conv.padding),
            pair(a.conv.dilation),
            a.conv.groups,
            // `relu=0|1` as before the other activations existed.
            match a.activation {
                None => "relu=0".to_string(),
                Some(crate::Activation::Relu) => "relu=1".to_string(),
                Some(other) => format!("activation={}", other.op().name()),
            },
            a.pool.map_or(String::new(), |p| format!(
                ", pool_kernel={}, pool_stride={}, pool_padding={}{}",
                pair(p.kernel),
                pair(p.stride),
                pair(p.padding),
                if p.ceil_mode { ", pool_ceil_mode=1" } else { "" }
            )),
            // Written only when set: text without a scale is as it always was.
            if a.input_scale { ", input_scale=1" } else { "" }
        ),
        Op::BatchNorm(a) => format!("{}[eps={:?}]", op.name(), a.eps),
        Op::MaxPool2d(a) => format!(
            "{}[kernel={}, stride={}, padding={}{}]",
            op.name(),
            pair(a.kernel),
            pair(a.stride),
            pair(a.padding),
            // Written only when set: floor-mode text is as it always was.
            if a.ceil_mode { ", ceil_mode=1" } else { "" }
        ),
        Op::AvgPool2d(a) => format!("{}[kernel={}, stride={}]", op.name(), pair(a.kernel), pair(a.stride)),
        Op::Concat(a) => format!("{}[axis={}]", op.name(), a.axis),
        Op::Pad(a) => {
            let [top, left, bottom, right] = a.pads;
            format!(
                "{}[begin={}, end={}]",
                op.name(),
                pair([top, left]),
                pair([bottom, right])
            )
        }
        Op::Flatten(a) => format!("{}[start_dim={}]", op.name(), a.start_dim),
        Op::Input
        | Op::Constant
        | Op::Relu
        | Op::Relu6
        | Op::HardSwish
        | Op::HardSigmoid
        | Op::Sigmoid
        | Op::Silu
        | Op::Add
        | Op::Mul
        | Op::GlobalAvgPool2d
        | Op::Linear => op.name().to_string(),
    }
}

impl Graph {
    /// `%name` or `@name`, the way operands and definitions are written.
    pub fn value_ref(&self, id: crate::NodeId) -> String {
        sigil_name(self.node(id))
    }

    /// One node as one line of IR text (without indentation).
    pub fn node_text(&self, node: &Node) -> String {
        if node.op == Op::Constant {
            return format!("@{} = {} : {}", node.name, node.op.name(), node.fact);
        }
        let operands: Vec<String> = node.inputs.iter().map(|&i| self.value_ref(i)).collect();
        format!(
            "%{} = {}({}) : {}",
            node.name,
            op_text(&node.op),
            operands.join(", "),
            node.fact
        )
    }
}

fn sigil_name(node: &Node) -> String {
    let sigil = if node.op == Op::Constant { '@' } else { '%' };
    format!("{sigil}{}", node.name)
}

impl fmt::Display for Graph {
    /// Prints the graph in the text form that [`Graph::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut header = String::new();
        for (i, &input) in self.inputs().iter().enumerate() {
            if i > 0 {
                header.push_str(", ");
            }
            let node = self.node(input);
            write!(header, "%{}: {}", node.name, node.fact)?;
        }
        writeln!(f, "graph {}({header}) {{", self.name())?;
        for node in self.nodes() {
            if node.op != Op::Input {
                writeln!(f, "  {}", self.node_text(node))?;
            }
        }
        let outputs: Vec<String> = self.outputs().iter().map(|&o| self.value_ref(o)).collect();
        writeln!(f, "  return {}", outputs.join(", "))?;
        writeln!(f, "}}")
    }
}
