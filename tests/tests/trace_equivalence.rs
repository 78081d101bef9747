//! engine(trace(model)) equals the eager candle model for every shipped model.

use candle_core::Device;
use wick_engine::Engine;
use wick_models::{random_input, ModelName};
use wick_tests::{assert_close, max_abs, random_model};

fn check(name: ModelName, batch: Option<usize>) {
    let model = random_model(name, 7);
    let shape = name.input_shape(batch);
    let x = random_input(11, &shape, &Device::Cpu).unwrap();
    let eager = model.forward_eager(&x).unwrap();
    let graph = model.trace(&shape).unwrap();
    let compiled = Engine::cpu().compile(&graph).unwrap();
    let out = compiled.run(&[x]).unwrap().remove(0);
    println!("{name}: output {:?}, scale {:e}", out.dims(), max_abs(&eager));
    assert_close(&out, &eager, 1e-5, name.as_str());
}

/// The tutorial's toy model, input [5,1,1,1].
#[test]
fn toy_engine_matches_eager() {
    check(ModelName::Toy, None);
}

/// The tutorial's Sequential model, input [1,3,28,28].
#[test]
fn toy_sequential_engine_matches_eager() {
    check(ModelName::ToySequential, None);
}

/// ResNet18 at batch 2, 224x224.
#[test]
fn resnet18_engine_matches_eager() {
    check(ModelName::Resnet18, Some(2));
}

/// Tracing flattens module nesting: node names are full module paths.
#[test]
fn toy_trace_flattens_nesting() {
    let graph = random_model(ModelName::Toy, 1).trace(&[5, 1, 1, 1]).unwrap();
    let ops: Vec<String> = graph
        .nodes()
        .iter()
        .filter(|n| !matches!(n.op, wick_ir::Op::Input | wick_ir::Op::Constant))
        .map(|n| format!("{}={}", n.name, n.op.name()))
        .collect();
    assert_eq!(
        ops,
        [
            "conv1=conv2d",
            "bn1=batch_norm",
            "conv2=conv2d",
            "nested.0=batch_norm",
            "nested.1=conv2d",
            "wrapped.mod=batch_norm"
        ]
    );
}
