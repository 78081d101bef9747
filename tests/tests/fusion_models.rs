//! The default pipeline on the shipped models: 3 / 2 / 20 conv → batch_norm
//! fusions, no batch_norm left, outputs unchanged.

use candle_core::Device;
use wick_engine::Engine;
use wick_ir::Op;
use wick_models::{random_input, ModelName};
use wick_passes::PassManager;
use wick_tests::{assert_close, random_model};

/// Expected `matched` counts: conv-bn, conv-add-relu, conv-relu.
fn check(name: ModelName, batch: Option<usize>, expected: [u64; 3]) {
    let model = random_model(name, 5);
    let shape = name.input_shape(batch);
    let x = random_input(9, &shape, &Device::Cpu).unwrap();
    let graph = model.trace(&shape).unwrap();
    let mut fused = graph.clone();
    let report = PassManager::default_pipeline().run(&mut fused).unwrap();
    println!("{report}");
    let counts = ["fuse-conv-batch-norm", "fuse-conv-add-relu", "fuse-conv-relu"].map(|p| report.count(p, "matched"));
    assert_eq!(counts, expected, "{report}");
    assert!(
        fused.nodes().iter().all(|n| n.op != Op::Relu || name == ModelName::Toy),
        "relu left in {name}:\n{fused}"
    );
    assert!(
        fused.nodes().iter().all(|n| !matches!(n.op, Op::BatchNorm(_))),
        "batch_norm left in {name}:\n{fused}"
    );
    let engine = Engine::cpu();
    let want = engine
        .compile(&graph)
        .unwrap()
        .run(std::slice::from_ref(&x))
        .unwrap()
        .remove(0);
    let got = engine
        .compile(&fused)
        .unwrap()
        .run(std::slice::from_ref(&x))
        .unwrap()
        .remove(0);
    assert_close(&got, &want, 1e-5, &format!("{name} fused vs unfused"));
    let eager = model.forward_eager(&x).unwrap();
    assert_close(&got, &eager, 1e-5, &format!("{name} fused vs eager"));
}

/// Three pairs in the tutorial's toy model, across Sequential and wrapper boundaries.
#[test]
fn toy_fuses_three() {
    check(ModelName::Toy, None, [3, 0, 0]);
}

/// Two pairs in the tutorial's Sequential model with different shapes from the pattern's example.
#[test]
fn toy_sequential_fuses_two() {
    check(ModelName::ToySequential, None, [2, 0, 1]);
}

/// All twenty pairs of ResNet18 (strided, padded, 1x1 downsample convs
/// included); then 8 block tails (conv + residual add + relu) and 9
/// conv + relu epilogues, leaving no separate relu.
#[test]
fn resnet18_fuses_twenty() {
    check(ModelName::Resnet18, Some(1), [20, 8, 9]);
}
