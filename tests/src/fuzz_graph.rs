//! Graphs from fuzz bytes, checked differentially: every byte string
//! becomes a small valid graph (convolutions with any groups, kernel,
//! stride, dilation and padding per axis, batch norms, every activation,
//! adds, squeeze-and-excitation's broadcast multiply, channel concats,
//! zero padding, average pools, max pools in floor and ceil mode, a global
//! pool → flatten → linear head), which runs through the
//! default passes on wick's f32 CPU kernels and, as the reference, unfused
//! in f64 on candle's ops. The `graph_diff` fuzz target and its corpus
//! replay call [`check_bytes`].

use candle_core::{DType, Device, Tensor};
use wick_engine::{Engine, EngineError};
use wick_ir::{
    Activation, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, Graph, MaxPool2dAttrs, NodeId,
    Op, PadAttrs, TensorFact,
};
use wick_passes::PassManager;

/// Reads small numbers from the fuzz bytes; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    /// A value in `0..n` (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first as usize % n
    }

    fn flag(&mut self) -> bool {
        self.below(2) == 1
    }
}

/// A graph and its input, built from `data` (always valid: a step whose
/// attributes do not fit its input is skipped).
pub fn graph_from_bytes(data: &[u8]) -> (Graph, Tensor) {
    let mut b = Bytes(data);
    let seed = b.below(256) as u64;
    let dims = [1 + b.below(2), 1 + b.below(6), 1 + b.below(12), 1 + b.below(12)];
    let mut graph = Graph::new("fuzz");
    let x = graph
        .add_input("x", TensorFact::new(DType::F32, dims))
        .expect("fresh name");
    let mut values: Vec<NodeId> = vec![x];
    let constant = |graph: &mut Graph, name: String, shape: &[usize], lo: f64, hi: f64| {
        let data = wick_models::random::uniform(seed, &name, shape, lo, hi, &Device::Cpu).expect("cpu tensor");
        graph.add_constant(name, data).expect("fresh name")
    };
    for step in 0..2 + b.below(8) {
        let source = values[b.below(values.len())];
        let fact = graph.node(source).fact.clone();
        let channels = fact.shape[1];
        let name = format!("s{step}");
        let added = match b.below(9) {
            0 => {
                let divisors: Vec<usize> = (1..=channels).filter(|g| channels.is_multiple_of(*g)).collect();
                let groups = divisors[b.below(divisors.len())];
                let out = groups * (1 + b.below(3));
                let kernel = [1 + b.below(4), 1 + b.below(4)];
                let attrs = Conv2dAttrs {
                    stride: [1 + b.below(3), 1 + b.below(3)],
                    padding: [b.below(3), b.below(3)],
                    dilation: [1 + b.below(2), 1 + b.below(2)],
                    groups,
                };
                let shape = [out, channels / groups, kernel[0], kernel[1]];
                let w = constant(&mut graph, format!("{name}.w"), &shape, -1.0, 1.0);
                let mut operands = vec![source, w];
                if b.flag() {
                    operands.push(constant(&mut graph, format!("{name}.b"), &[out], -0.5, 0.5));
                }
                graph.add_node(name, Op::Conv2d(attrs), &operands)
            }
            1 => {
                let mean = constant(&mut graph, format!("{name}.mean"), &[channels], -0.5, 0.5);
                let var = constant(&mut graph, format!("{name}.var"), &[channels], 0.5, 1.5);
                let mut operands = vec![source, mean, var];
                if b.flag() {
                    operands.push(constant(&mut graph, format!("{name}.weight"), &[channels], -1.5, 1.5));
                    operands.push(constant(&mut graph, format!("{name}.bias"), &[channels], -0.5, 0.5));
                }
                graph.add_node(name, Op::BatchNorm(BatchNormAttrs { eps: 1e-5 }), &operands)
            }
            2 => {
                let activation = Activation::ALL[b.below(Activation::ALL.len())];
                graph.add_node(name, activation.op(), &[source])
            }
            5 => {
                // Squeeze-and-excitation's scale: x · act(mean over H, W).
                let pooled = graph.add_node(format!("{name}.pool"), Op::GlobalAvgPool2d, &[source]);
                match pooled {
                    Ok(pooled) => graph.add_node(name, Op::Mul, &[source, pooled]),
                    Err(e) => Err(e),
                }
            }
            3 => {
                let same: Vec<NodeId> = values.iter().copied().filter(|v| graph.node(*v).fact == fact).collect();
                graph.add_node(name, Op::Add, &[source, same[b.below(same.len())]])
            }
            6 => {
                // DenseNet's join: the source and a value of the same N, H, W.
                let joinable: Vec<NodeId> = values
                    .iter()
                    .copied()
                    .filter(|v| {
                        let shape = &graph.node(*v).fact.shape;
                        shape[0] == fact.shape[0] && shape[2..] == fact.shape[2..]
                    })
                    .collect();
                let other = joinable[b.below(joinable.len())];
                graph.add_node(name, Op::Concat(ConcatAttrs { axis: 1 }), &[source, other])
            }
            4 => {
                // Zeros around the plane (ONNX exports' explicit `Pad`).
                let pads = [b.below(3), b.below(3), b.below(3), b.below(3)];
                graph.add_node(name, Op::Pad(PadAttrs { pads }), &[source])
            }
            7 => {
                let kernel = [1 + b.below(3), 1 + b.below(3)];
                let stride = [1 + b.below(3), 1 + b.below(3)];
                graph.add_node(name, Op::AvgPool2d(AvgPool2dAttrs { kernel, stride }), &[source])
            }
            _ => {
                let kernel = [1 + b.below(3), 1 + b.below(3)];
                let attrs = MaxPool2dAttrs {
                    kernel,
                    stride: [1 + b.below(3), 1 + b.below(3)],
                    padding: [b.below(kernel[0] / 2 + 1), b.below(kernel[1] / 2 + 1)],
                    ceil_mode: b.flag(),
                };
                graph.add_node(name, Op::MaxPool2d(attrs), &[source])
            }
        };
        if let Ok(id) = added {
            values.push(id);
        }
    }
    let last = *values.last().expect("the input at least");
    let mut outputs = vec![last];
    if b.flag() {
        // A classifier head on the last value.
        let channels = graph.node(last).fact.shape[1];
        let classes = 1 + b.below(5);
        let pooled = graph
            .add_node("head.pool", Op::GlobalAvgPool2d, &[last])
            .expect("rank 4");
        let flat = graph
            .add_node("head.flatten", Op::Flatten(FlattenAttrs { start_dim: 1 }), &[pooled])
            .expect("rank 4");
        let w = constant(&mut graph, "head.w".into(), &[classes, channels], -1.0, 1.0);
        let bias = constant(&mut graph, "head.b".into(), &[classes], -1.0, 1.0);
        outputs = vec![graph
            .add_node("head.fc", Op::Linear, &[flat, w, bias])
            .expect("shapes agree")];
    }
    if b.flag() && values.len() > 2 {
        let extra = values[1 + b.below(values.len() - 1)];
        if !outputs.contains(&extra) {
            outputs.push(extra);
        }
    }
    graph.set_outputs(outputs);
    let input = wick_models::random::uniform(seed, "input", &dims, -1.0, 1.0, &Device::Cpu).expect("cpu tensor");
    (graph, input)
}

/// The same graph in f64 (facts and constants converted).
fn to_f64(graph: &Graph) -> Graph {
    let mut wide = graph.clone();
    for id in graph.node_ids() {
        wide.node_mut(id).fact.dtype = DType::F64;
        let node = graph.node(id);
        if let Some(data) = graph.constant_data(&node.name) {
            let data = data.to_dtype(DType::F64).expect("cpu conversion");
            wide.set_constant_data(&node.name, data).expect("fact converted above");
        }
    }
    wide
}

/// Builds the graph of `data`, runs it optimised in f32 on wick's kernels
/// and unoptimised in f64 on candle's ops, and compares every output
/// within `1e-3 · max(1, |reference|)`. `Ok(false)` when there is no
/// reference (candle's conv takes equal stride and dilation on both axes
/// only); an `Err` names the disagreement or the failure.
pub fn check_bytes(data: &[u8]) -> Result<bool, String> {
    let (graph, input) = graph_from_bytes(data);
    graph.verify().map_err(|e| format!("built graph: {e}"))?;
    let mut optimised = graph.clone();
    PassManager::default_pipeline()
        .run(&mut optimised)
        .map_err(|e| format!("passes: {e}"))?;
    let got = Engine::cpu()
        .compile(&optimised)
        .and_then(|m| m.run(std::slice::from_ref(&input)))
        .map_err(|e| format!("wick f32: {e}\n{graph}"))?;
    let wide = to_f64(&graph);
    let reference = match Engine::cpu().compile(&wide) {
        Err(EngineError::Unsupported { .. }) => return Ok(false),
        other => other.map_err(|e| format!("reference: {e}"))?,
    };
    let want = reference
        .run(&[input.to_dtype(DType::F64).map_err(|e| e.to_string())?])
        .map_err(|e| format!("reference: {e}"))?;
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let g = g.to_dtype(DType::F64).map_err(|e| e.to_string())?;
        let diff = crate::max_abs_diff(&g, w);
        let scale = crate::max_abs(w).max(1.0);
        if diff.is_nan() || diff > 1e-3 * scale {
            return Err(format!(
                "output {k}: wick f32 differs from the f64 reference by {diff:e} (scale {scale:e})\n{graph}"
            ));
        }
    }
    Ok(true)
}

/// The op kinds of the graph `data` builds (to check the generator's reach).
pub fn op_kinds(data: &[u8]) -> Vec<&'static str> {
    let (graph, _) = graph_from_bytes(data);
    graph.nodes().iter().map(|n| n.op.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte string gives a valid graph; over a few thousand seeded
    /// strings every op kind appears and wick agrees with the reference.
    #[test]
    fn generated_graphs_are_valid_and_agree() {
        let mut seen = std::collections::BTreeSet::new();
        let mut compared = 0;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let data: Vec<u8> = (0..48)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            seen.extend(op_kinds(&data));
            compared += check_bytes(&data).unwrap() as usize;
        }
        for kind in [
            "conv2d",
            "batch_norm",
            "relu",
            "add",
            "max_pool2d",
            "concat",
            "avg_pool2d",
            "global_avg_pool2d",
            "mul",
            "pad",
            "flatten",
            "linear",
        ] {
            assert!(seen.contains(kind), "{kind} never generated: {seen:?}");
        }
        assert!(compared > 100, "only {compared} of 300 graphs had a reference");
    }
}
