//! A reusable property-test harness for pass authors: "does my pass preserve
//! semantics on random graphs?"
//!
//! [`arb_graph`] draws small random graphs (chains and branches of conv2d,
//! batch_norm, relu, add and squeeze-and-excitation's per-channel scale;
//! some values with several users; some
//! intermediate values returned as graph outputs) with random weights and
//! inputs. [`check_semantics`] runs a graph through the engine before and
//! after a [`PassManager`] and compares every output.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use wick_engine::Engine;
use wick_ir::{BatchNormAttrs, Conv2dAttrs, Graph, NodeId, Op, TensorFact};
use wick_passes::{PassManager, PassReport};

/// Proptest configuration: `default_cases` cases, or `WICK_PROPTEST_CASES`
/// when set (e.g. `WICK_PROPTEST_CASES=5000 cargo test -p wick-tests`).
/// Failures are not persisted to files: shrunk failures become named
/// regression tests instead.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var("WICK_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A graph with data for every constant, and inputs to run it on.
#[derive(Debug, Clone)]
pub struct GraphCase {
    /// The graph (constants carry data).
    pub graph: Graph,
    /// One tensor per graph input.
    pub inputs: Vec<Tensor>,
}

/// One step of a random graph recipe; `source` indices pick earlier values.
#[derive(Debug, Clone)]
pub enum Step {
    /// `conv2d` with "same" padding (odd kernel, stride 1), optional bias.
    Conv {
        /// Which earlier value feeds it.
        source: prop::sample::Index,
        /// Output channels.
        out_channels: usize,
        /// Kernel size (1 or 3).
        kernel: usize,
        /// Whether it has a bias.
        bias: bool,
    },
    /// Inference batch norm, optionally affine.
    BatchNorm {
        /// Which earlier value feeds it.
        source: prop::sample::Index,
        /// Whether it has weight and bias.
        affine: bool,
        /// Its eps.
        eps: f64,
    },
    /// ReLU.
    Relu {
        /// Which earlier value feeds it.
        source: prop::sample::Index,
    },
    /// Sum of two earlier values of equal shape (a ReLU when none match).
    Add {
        /// First operand.
        a: prop::sample::Index,
        /// Second operand.
        b: prop::sample::Index,
    },
    /// Squeeze-and-excitation's scale of an earlier value `x`:
    /// `mul(x, sigmoid(global_avg_pool2d(x)))`.
    Scale {
        /// Which earlier value feeds it.
        source: prop::sample::Index,
    },
    /// Also return an earlier value as a graph output.
    Output {
        /// Which value.
        source: prop::sample::Index,
    },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1usize..5, prop::sample::select(vec![1usize, 3]), any::<bool>())
            .prop_map(|(source, out_channels, kernel, bias)| Step::Conv { source, out_channels, kernel, bias }),
        4 => (any::<prop::sample::Index>(), any::<bool>(), -5.0f64..-1.0)
            .prop_map(|(source, affine, log_eps)| Step::BatchNorm { source, affine, eps: 10f64.powf(log_eps) }),
        2 => any::<prop::sample::Index>().prop_map(|source| Step::Relu { source }),
        2 => (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(a, b)| Step::Add { a, b }),
        2 => any::<prop::sample::Index>().prop_map(|source| Step::Scale { source }),
        1 => any::<prop::sample::Index>().prop_map(|source| Step::Output { source }),
    ]
}

/// Builds the graph a recipe describes, with weights drawn from `seed`.
pub fn build_graph(batch: usize, channels: usize, size: usize, steps: &[Step], seed: u64) -> GraphCase {
    let mut graph = Graph::new("random");
    let mut values: Vec<NodeId> = vec![graph
        .add_input("x", TensorFact::new(DType::F32, [batch, channels, size, size]))
        .expect("fresh graph")];
    let mut outputs = Vec::new();
    let mut counter = 0u64;
    let mut data = |graph: &mut Graph, name: String, shape: &[usize], lo: f64, hi: f64| {
        counter += 1;
        let t = wick_models::random::uniform(seed.wrapping_add(counter), &name, shape, lo, hi, &Device::Cpu)
            .expect("cpu tensor");
        graph.add_constant(name, t).expect("unique constant name")
    };
    for (i, step) in steps.iter().enumerate() {
        let name = format!("v{i}");
        let next = match step {
            Step::Conv {
                source,
                out_channels,
                kernel,
                bias,
            } => {
                let x = *source.get(&values);
                let c = graph.node(x).fact.shape[1];
                let bound = 1.0 / ((c * kernel * kernel) as f64).sqrt();
                let mut inputs = vec![
                    x,
                    data(
                        &mut graph,
                        format!("{name}.weight"),
                        &[*out_channels, c, *kernel, *kernel],
                        -bound,
                        bound,
                    ),
                ];
                if *bias {
                    inputs.push(data(&mut graph, format!("{name}.bias"), &[*out_channels], -0.5, 0.5));
                }
                let attrs = Conv2dAttrs {
                    padding: [kernel / 2; 2],
                    ..Default::default()
                };
                graph.add_node(name, Op::Conv2d(attrs), &inputs)
            }
            Step::BatchNorm { source, affine, eps } => {
                let x = *source.get(&values);
                let c = graph.node(x).fact.shape[1];
                let mut inputs = vec![
                    x,
                    data(&mut graph, format!("{name}.running_mean"), &[c], -1.0, 1.0),
                    data(&mut graph, format!("{name}.running_var"), &[c], 0.2, 2.0),
                ];
                if *affine {
                    inputs.push(data(&mut graph, format!("{name}.weight"), &[c], -1.5, 1.5));
                    inputs.push(data(&mut graph, format!("{name}.bias"), &[c], -0.5, 0.5));
                }
                graph.add_node(name, Op::BatchNorm(BatchNormAttrs { eps: *eps }), &inputs)
            }
            Step::Relu { source } => graph.add_node(name, Op::Relu, &[*source.get(&values)]),
            Step::Add { a, b } => {
                let a = *a.get(&values);
                let same: Vec<NodeId> = values
                    .iter()
                    .copied()
                    .filter(|v| graph.node(*v).fact == graph.node(a).fact)
                    .collect();
                graph.add_node(name, Op::Add, &[a, *b.get(&same)])
            }
            Step::Scale { source } => {
                let x = *source.get(&values);
                let pooled = graph
                    .add_node(format!("{name}.pool"), Op::GlobalAvgPool2d, &[x])
                    .expect("a pool of an NCHW value");
                let s = graph
                    .add_node(format!("{name}.sigmoid"), Op::Sigmoid, &[pooled])
                    .expect("a sigmoid");
                graph.add_node(name, Op::Mul, &[x, s])
            }
            Step::Output { source } => {
                outputs.push(*source.get(&values));
                continue;
            }
        };
        values.push(next.expect("recipe steps build valid nodes"));
    }
    let last = *values.last().expect("input exists");
    if !outputs.contains(&last) {
        outputs.push(last);
    }
    outputs.dedup();
    graph.set_outputs(outputs);
    let x = wick_models::random::uniform(seed, "input", &[batch, channels, size, size], -1.0, 1.0, &Device::Cpu)
        .expect("cpu tensor");
    GraphCase { graph, inputs: vec![x] }
}

/// Random graphs of 1..=12 steps on inputs `[1..3, 1..4, 2..7, same]`.
pub fn arb_graph() -> impl Strategy<Value = GraphCase> {
    (
        1usize..3,
        1usize..4,
        2usize..7,
        prop::collection::vec(arb_step(), 1..12),
        any::<u64>(),
    )
        .prop_map(|(batch, channels, size, steps, seed)| build_graph(batch, channels, size, &steps, seed))
}

/// Largest absolute difference between two tensors.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    crate::max_abs_diff(a, b)
}

/// Runs `case` unoptimised and after `pipeline`; every output must agree
/// within `rel_tol * max(1, |reference|_max)`, and the optimised graph must
/// verify. Returns the pass report for further assertions.
pub fn check_semantics(pipeline: &PassManager, case: &GraphCase, rel_tol: f64) -> Result<PassReport, TestCaseError> {
    check_semantics_on(&Device::Cpu, pipeline, case, rel_tol)
}

/// [`check_semantics`] with both graphs compiled for and run on `device`
/// (inputs moved there).
pub fn check_semantics_on(
    device: &Device,
    pipeline: &PassManager,
    case: &GraphCase,
    rel_tol: f64,
) -> Result<PassReport, TestCaseError> {
    let engine = Engine::new(device.clone());
    let fail = |what: &str, e: &dyn std::fmt::Display| TestCaseError::fail(format!("{what}: {e}"));
    let inputs: Vec<Tensor> = case
        .inputs
        .iter()
        .map(|t| t.to_device(device))
        .collect::<Result<_, _>>()
        .map_err(|e| fail("moving inputs", &e))?;
    let want = engine
        .compile(&case.graph)
        .and_then(|m| m.run(&inputs))
        .map_err(|e| fail("unoptimised graph", &e))?;
    let mut optimised = case.graph.clone();
    let report = pipeline.run(&mut optimised).map_err(|e| fail("pass pipeline", &e))?;
    optimised.verify().map_err(|e| fail("verifier", &e))?;
    let got = engine
        .compile(&optimised)
        .and_then(|m| m.run(&inputs))
        .map_err(|e| fail("optimised graph", &e))?;
    prop_assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        prop_assert_eq!(g.dims(), w.dims());
        let diff = max_abs_diff(g, w);
        let tol = rel_tol * crate::max_abs(w).max(1.0);
        prop_assert!(
            diff <= tol,
            "output {} differs by {:e} > {:e}\nbefore:\n{}\nafter:\n{}",
            k,
            diff,
            tol,
            case.graph,
            optimised
        );
    }
    Ok(report)
}
