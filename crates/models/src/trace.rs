//! The tracing interpretation of the front end: each layer call appends IR nodes.
//!
//! Module nesting disappears here: a layer inside a `Sequential` or a wrapper
//! module becomes a node named by its full path (`nested.0`, `wrapped.mod`),
//! next to its neighbours, so passes see through module boundaries.

use crate::{BatchNorm, Conv2d, Frontend, Linear, MaxPool2d, ModelError, Module};
use candle_core::Tensor;
use std::collections::HashMap;
use wick_ir::{Activation, BatchNormAttrs, FlattenAttrs, Graph, MaxPool2dAttrs, NodeId, Op, TensorFact};

/// Builds a [`Graph`] from front-end calls. Weights become constants named by
/// their safetensors keys and share storage with the model (no copy).
#[derive(Debug)]
pub struct Tracer {
    graph: Graph,
    constants: HashMap<String, NodeId>,
}

impl Tracer {
    /// A tracer producing a graph called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            graph: Graph::new(name),
            constants: HashMap::new(),
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, fact: TensorFact) -> Result<NodeId, ModelError> {
        Ok(self.graph.add_input(name, fact)?)
    }

    /// The constant node for weight `key`, created on first use.
    pub fn constant(&mut self, key: &str, data: &Tensor) -> Result<NodeId, ModelError> {
        if let Some(&id) = self.constants.get(key) {
            return Ok(id);
        }
        // Detached so graph constants never carry candle's backprop tracking
        // (candle-nn stores batch-norm statistics as `Var`s).
        let id = self.graph.add_constant(key, data.detach())?;
        self.constants.insert(key.to_string(), id);
        Ok(id)
    }

    fn node(&mut self, path: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, ModelError> {
        let name = self.graph.unique_name(path);
        Ok(self.graph.add_node(name, op, inputs)?)
    }

    /// Sets the outputs, verifies and returns the graph.
    pub fn finish(mut self, outputs: Vec<NodeId>) -> Result<Graph, ModelError> {
        self.graph.set_outputs(outputs);
        self.graph.verify_with(&wick_ir::Limits::unbounded())?;
        Ok(self.graph)
    }
}

impl Frontend for Tracer {
    type Value = NodeId;

    fn conv2d(&mut self, layer: &Conv2d, x: &NodeId) -> Result<NodeId, ModelError> {
        let mut inputs = vec![
            *x,
            self.constant(&format!("{}.weight", layer.path), layer.inner.weight())?,
        ];
        if let Some(bias) = layer.inner.bias() {
            inputs.push(self.constant(&format!("{}.bias", layer.path), bias)?);
        }
        self.node(&layer.path, Op::Conv2d(layer.attrs()), &inputs)
    }

    fn batch_norm(&mut self, layer: &BatchNorm, x: &NodeId) -> Result<NodeId, ModelError> {
        let bn = &layer.inner;
        let mut inputs = vec![
            *x,
            self.constant(&format!("{}.running_mean", layer.path), bn.running_mean())?,
            self.constant(&format!("{}.running_var", layer.path), bn.running_var())?,
        ];
        if let Some((weight, bias)) = bn.weight_and_bias() {
            inputs.push(self.constant(&format!("{}.weight", layer.path), weight)?);
            inputs.push(self.constant(&format!("{}.bias", layer.path), bias)?);
        }
        self.node(&layer.path, Op::BatchNorm(BatchNormAttrs { eps: bn.eps() }), &inputs)
    }

    fn activation(&mut self, path: &str, activation: Activation, x: &NodeId) -> Result<NodeId, ModelError> {
        self.node(path, activation.op(), &[*x])
    }

    fn add(&mut self, path: &str, a: &NodeId, b: &NodeId) -> Result<NodeId, ModelError> {
        self.node(path, Op::Add, &[*a, *b])
    }

    fn mul(&mut self, path: &str, a: &NodeId, b: &NodeId) -> Result<NodeId, ModelError> {
        self.node(path, Op::Mul, &[*a, *b])
    }

    fn max_pool2d(&mut self, layer: &MaxPool2d, x: &NodeId) -> Result<NodeId, ModelError> {
        let attrs = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: layer.kernel,
            stride: layer.stride,
            padding: layer.padding,
        };
        self.node(&layer.path, Op::MaxPool2d(attrs), &[*x])
    }

    fn global_avg_pool2d(&mut self, path: &str, x: &NodeId) -> Result<NodeId, ModelError> {
        self.node(path, Op::GlobalAvgPool2d, &[*x])
    }

    fn flatten(&mut self, path: &str, x: &NodeId, start_dim: usize) -> Result<NodeId, ModelError> {
        self.node(path, Op::Flatten(FlattenAttrs { start_dim }), &[*x])
    }

    fn linear(&mut self, layer: &Linear, x: &NodeId) -> Result<NodeId, ModelError> {
        let mut inputs = vec![
            *x,
            self.constant(&format!("{}.weight", layer.path), layer.inner.weight())?,
        ];
        if let Some(bias) = layer.inner.bias() {
            inputs.push(self.constant(&format!("{}.bias", layer.path), bias)?);
        }
        self.node(&layer.path, Op::Linear, &inputs)
    }
}

/// Traces `module` on an input of fact `input` into a verified graph called
/// `name`, with one input `%x` and one output.
pub fn trace<M: Module>(name: &str, module: &M, input: TensorFact) -> Result<Graph, ModelError> {
    let mut tracer = Tracer::new(name);
    let x = tracer.input("x", input)?;
    let y = module.forward(&mut tracer, x)?;
    tracer.finish(vec![y])
}
