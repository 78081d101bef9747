//! The `graph_diff` target's graphs: planes up to 12×12 and up to six input
//! channels, every attribute drawn (any groups, kernel, stride, dilation
//! and padding per axis), so a run takes milliseconds and millions of runs
//! reach the corner cases of the kernels' edges.

use super::{Bytes, Case};
use candle_core::{DType, Device};
use wick_engine::Engine;
use wick_ir::{
    Activation, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, Graph, MaxPool2dAttrs, NodeId,
    Op, PadAttrs, TensorFact,
};

/// A graph and its input, built from `data` (always valid: a step whose
/// attributes do not fit its input is skipped), on the default engine.
pub fn case_from_bytes(data: &[u8]) -> Case {
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
    b.extra_output(&values, &mut outputs);
    graph.set_outputs(outputs);
    let input = wick_models::random::uniform(seed, "input", &dims, -1.0, 1.0, &Device::Cpu).expect("cpu tensor");
    Case {
        graph,
        input,
        engine: Engine::cpu(),
        batched: false,
    }
}
