//! The import itself: a decoded `ModelProto` walked node by node into a
//! wick IR graph. Values known at import (initializers, `Constant`s and
//! whatever is computed from them and from static shapes) stay constants;
//! the rest become IR nodes. A node that cannot be expressed is recorded
//! and the walk goes on, so the one error lists every such node.

use crate::order::{display_name, topological};
use crate::proto::{data_type, GraphProto, ModelProto, NodeProto};
use crate::tensor::{self, Const};
use crate::{ops, ImportOptions, OnnxError, UnsupportedNode, OPSET_MAX, OPSET_MIN};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use wick_ir::{DType, Graph, NodeId, Op, TensorFact};

/// A value of the ONNX graph during import.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// Computed at run time by an IR node.
    Ir(NodeId),
    /// Known at import.
    Const(Const),
    /// Made by a node that could not be imported (already reported: its
    /// users are not reported again).
    Unknown,
}

/// The state of one import.
pub(crate) struct Importer {
    pub(crate) graph: Graph,
    values: HashMap<String, Value>,
    /// IR constants made from import-time values, by ONNX value name (a
    /// weight read by two nodes is one constant).
    constants: HashMap<String, NodeId>,
    /// Sigmoid nodes and their operand: `Mul(x, Sigmoid(x))` is SiLU.
    pub(crate) sigmoid_of: HashMap<NodeId, NodeId>,
    /// Linear nodes made from a `MatMul` without bias, with their operands:
    /// an `Add` of a constant vector after one becomes its bias.
    pub(crate) bare_linear: HashMap<NodeId, (NodeId, NodeId)>,
    /// Most elements a constant may have.
    pub(crate) max_elements: usize,
    /// The model file's directory (external data), if read from a file.
    dir: Option<PathBuf>,
}

/// Imports `model` (see [`crate::import_bytes`]); external data is read
/// from `dir`, the model file's directory.
pub(crate) fn import(model: &ModelProto, options: &ImportOptions, dir: Option<&Path>) -> Result<Graph, OnnxError> {
    let graph = model.graph.as_ref().ok_or(OnnxError::NoGraph)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    if !(OPSET_MIN..=OPSET_MAX).contains(&opset) {
        return Err(OnnxError::Opset {
            version: opset,
            min: OPSET_MIN,
            max: OPSET_MAX,
        });
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(OnnxError::Tensor {
            name: "(sparse initializers)".into(),
            message: format!(
                "{} sparse initializer(s): not supported",
                graph.sparse_initializer.len()
            ),
        });
    }
    let name = match sanitize(&graph.name) {
        n if n == "node" => "onnx".to_string(),
        n => n,
    };
    let mut importer = Importer {
        graph: Graph::new(name),
        values: HashMap::new(),
        constants: HashMap::new(),
        sigmoid_of: HashMap::new(),
        bare_linear: HashMap::new(),
        max_elements: options.max_elements,
        dir: dir.map(Path::to_path_buf),
    };
    importer.read_initializers(graph)?;
    importer.add_inputs(graph, options)?;
    let available: HashSet<&str> = importer.values.keys().map(String::as_str).collect();
    let order = topological(&graph.node, &available)?;
    let mut unsupported = Vec::new();
    for index in order {
        let node = &graph.node[index];
        let after_unsupported = node
            .input
            .iter()
            .any(|i| matches!(importer.values.get(i), Some(Value::Unknown)));
        let lowered = match after_unsupported {
            // Behind an unsupported node only the operator can be checked.
            true if ops::OPERATORS.contains(&node.op_type.as_str()) => Ok(vec![Value::Unknown; node.output.len()]),
            true => Err(format!("operator {} is not supported", node.op_type)),
            false => ops::lower(&mut importer, node),
        };
        let outputs = {
            match lowered {
                Ok(outputs) => outputs,
                Err(reason) => {
                    unsupported.push(UnsupportedNode {
                        name: display_name(node),
                        op_type: node.op_type.clone(),
                        domain: node.domain.clone(),
                        opset,
                        reason,
                    });
                    vec![Value::Unknown; node.output.len()]
                }
            }
        };
        for (name, value) in node.output.iter().zip(outputs) {
            if !name.is_empty() {
                importer.values.insert(name.clone(), value);
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(OnnxError::Unsupported { nodes: unsupported });
    }
    importer.set_outputs(graph)?;
    let mut result = importer.graph;
    // Nodes the peepholes bypassed (a SiLU's sigmoid, a bias-less linear)
    // and constants only shapes were computed from.
    let live = result.live();
    result.compact(|id, _| live[id.index()]);
    if let Some(batch) = options.batch {
        if result
            .inputs()
            .iter()
            .any(|&i| result.node(i).fact.shape.first() != Some(&batch))
        {
            result = result.with_batch(batch)?;
        }
    }
    Ok(result)
}

#[cfg(test)]
impl Importer {
    /// For tests: an importer with no values, as for an empty ONNX graph.
    pub(crate) fn empty() -> Self {
        Importer {
            graph: Graph::new("test"),
            values: HashMap::new(),
            constants: HashMap::new(),
            sigmoid_of: HashMap::new(),
            bare_linear: HashMap::new(),
            max_elements: usize::MAX,
            dir: None,
        }
    }
}

impl Importer {
    fn read_initializers(&mut self, graph: &GraphProto) -> Result<(), OnnxError> {
        for t in &graph.initializer {
            let value = tensor::read(t, &t.name, self.max_elements, self.external())?;
            if self.values.insert(t.name.clone(), Value::Const(value)).is_some() {
                return Err(OnnxError::DuplicateValue { value: t.name.clone() });
            }
        }
        Ok(())
    }

    /// The graph inputs that are not initializers, as IR inputs: f32, a
    /// static shape except the first dimension, which may be symbolic (the
    /// batch: `options.batch`, else 1).
    fn add_inputs(&mut self, graph: &GraphProto, options: &ImportOptions) -> Result<(), OnnxError> {
        for input in &graph.input {
            if self.values.contains_key(&input.name) {
                continue;
            }
            let error = |message: String| OnnxError::Input {
                name: input.name.clone(),
                message,
            };
            let Some(tensor) = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()) else {
                return Err(error("not a tensor (wick takes f32 tensors)".into()));
            };
            if tensor.elem_type != data_type::FLOAT {
                return Err(error(format!(
                    "element type {} (wick takes FLOAT inputs)",
                    data_type::name(tensor.elem_type)
                )));
            }
            let Some(shape) = &tensor.shape else {
                return Err(error("no shape (wick needs static shapes)".into()));
            };
            let mut dims = Vec::with_capacity(shape.dim.len());
            for (axis, dim) in shape.dim.iter().enumerate() {
                let size = match (dim.dim_value, axis) {
                    (Some(v), _) if v >= 0 && (v > 0 || axis == 0) => v as usize,
                    (Some(v), _) => return Err(error(format!("dimension {axis} is {v}"))),
                    (None, 0) => options.batch.unwrap_or(1),
                    (None, _) => {
                        let symbol = dim.dim_param.as_deref().unwrap_or("?");
                        return Err(error(format!(
                            "dimension {axis} is symbolic (`{symbol}`): only the first (the batch) may be; export with a fixed input size"
                        )));
                    }
                };
                dims.push(size);
            }
            tensor::element_count(
                &input.name,
                &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                self.max_elements,
            )
            .map_err(|e| error(e.to_string()))?;
            let name = self.graph.unique_name(&sanitize(&input.name));
            let id = self.graph.add_input(name, TensorFact::new(DType::F32, dims))?;
            self.values.insert(input.name.clone(), Value::Ir(id));
        }
        if self.graph.inputs().is_empty() {
            return Err(OnnxError::Input {
                name: "(none)".into(),
                message: "the graph has no input besides its initializers".into(),
            });
        }
        Ok(())
    }

    fn set_outputs(&mut self, graph: &GraphProto) -> Result<(), OnnxError> {
        let mut outputs = Vec::new();
        for output in &graph.output {
            let error = |message: &str| OnnxError::Output {
                name: output.name.clone(),
                message: message.into(),
            };
            match self.values.get(&output.name) {
                Some(Value::Ir(id)) => outputs.push(*id),
                Some(Value::Const(_)) => return Err(error("a constant (wick returns computed values)")),
                Some(Value::Unknown) | None => return Err(error("no node produces it")),
            }
        }
        if outputs.is_empty() {
            return Err(OnnxError::Output {
                name: "(none)".into(),
                message: "the graph has no output".into(),
            });
        }
        self.graph.set_outputs(outputs);
        Ok(())
    }

    /// Where external data is read from.
    pub(crate) fn external(&self) -> tensor::External<'_> {
        tensor::External {
            dir: self.dir.as_deref(),
        }
    }

    /// Operand `index` of `node`, if given.
    pub(crate) fn operand(&self, node: &NodeProto, index: usize) -> Option<&Value> {
        let name = node.input.get(index).filter(|n| !n.is_empty())?;
        self.values.get(name)
    }

    /// Operand `index` of `node` as an IR value: a computed one, or an
    /// import-time float tensor made an IR constant named by its ONNX name.
    pub(crate) fn ir(&mut self, node: &NodeProto, index: usize) -> Result<NodeId, String> {
        match self.operand(node, index).cloned() {
            Some(Value::Ir(id)) => Ok(id),
            Some(Value::Const(Const::F32(data))) => {
                let name = &node.input[index];
                self.constant(name, data).map_err(|e| e.to_string())
            }
            Some(Value::Const(Const::I64 { .. })) => {
                Err(format!("input {index} is an integer tensor (wick computes in f32)"))
            }
            Some(Value::Unknown) | None => Err(format!("input {index} is missing")),
        }
    }

    /// An IR constant holding `data` for ONNX value `name` (one per name).
    pub(crate) fn constant(&mut self, name: &str, data: candle_core::Tensor) -> Result<NodeId, OnnxError> {
        if let Some(&id) = self.constants.get(name) {
            return Ok(id);
        }
        let ir_name = self.graph.unique_name(&sanitize(name));
        let id = self.graph.add_constant(ir_name, data)?;
        self.constants.insert(name.to_string(), id);
        Ok(id)
    }

    /// Operand `index` of `node`, which must be known at import.
    pub(crate) fn known(&self, node: &NodeProto, index: usize) -> Result<&Const, String> {
        match self.operand(node, index) {
            Some(Value::Const(c)) => Ok(c),
            Some(_) => Err(format!(
                "input {index} must be a constant (an initializer or computed from one)"
            )),
            None => Err(format!("input {index} is missing")),
        }
    }

    /// Adds `op(inputs)` named after `node` (and `suffix`, for a second node).
    pub(crate) fn add(&mut self, node: &NodeProto, suffix: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, String> {
        let base = sanitize(&display_name(node));
        let name = self.graph.unique_name(&format!("{base}{suffix}"));
        self.graph.add_node(name, op, inputs).map_err(|e| e.to_string())
    }

    /// The shape of an IR value.
    pub(crate) fn shape(&self, id: NodeId) -> &[usize] {
        &self.graph.node(id).fact.shape
    }
}

/// An ONNX name as an IR name (`[A-Za-z0-9_.+#-]+`): `/` becomes `.` (the
/// exporters' module paths, `/layer1/layer1.0/conv1/Conv` ->
/// `layer1.layer1.0.conv1.Conv`), any other character `_`; leading and
/// trailing dots go; an empty result is `node`.
pub(crate) fn sanitize(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '#' | '-') => c,
            _ => '_',
        })
        .collect();
    match mapped.trim_matches('.') {
        "" => "node".to_string(),
        trimmed => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    /// Exporters' names become IR names that read like them.
    #[test]
    fn names() {
        assert_eq!(sanitize("/layer1/layer1.0/conv1/Conv"), "layer1.layer1.0.conv1.Conv");
        assert_eq!(sanitize("onnx::Conv_193"), "onnx__Conv_193");
        assert_eq!(sanitize("input.1"), "input.1");
        assert_eq!(sanitize("/"), "node");
        assert_eq!(sanitize(""), "node");
        assert_eq!(sanitize("x y"), "x_y");
    }
}
