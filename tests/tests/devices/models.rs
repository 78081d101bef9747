//! The default pipeline on the shipped models: every conv → batch_norm
//! pair fused, activations and residual adds into conv epilogues, no
//! batch_norm left, outputs unchanged — on every device
//! (`device_test!`: `_cpu`, and `_cuda` with the `cuda` feature, which also
//! checks the GPU's fused output against the CPU's).

use candle_core::{Device, Tensor};
use wick_engine::Engine;
use wick_ir::Op;
use wick_models::{random_input, Model, ModelName, WeightSource};
use wick_passes::PassManager;
use wick_tests::{assert_close, device_test};

/// Expected `matched` counts: conv-bn, conv-add-relu, conv-relu,
/// conv-activation, conv-add, conv-max-pool, conv-input-scale.
fn check(name: ModelName, batch: Option<usize>, expected: [u64; 7], device: &Device) {
    let model = Model::load(name, WeightSource::Random { seed: 5 }, device).unwrap();
    let shape = name.input_shape(batch);
    let x = random_input(9, &shape, device).unwrap();
    let graph = model.trace(&shape).unwrap();
    let mut fused = graph.clone();
    let report = PassManager::default_pipeline().run(&mut fused).unwrap();
    println!("{report}");
    let counts = [
        "fuse-conv-batch-norm",
        "fuse-conv-add-relu",
        "fuse-conv-relu",
        "fuse-conv-activation",
        "fuse-conv-add",
        "fuse-conv-max-pool",
        "fuse-conv-input-scale",
    ]
    .map(|p| report.count(p, "matched"));
    assert_eq!(counts, expected, "{report}");
    // Every activation follows a conv but the toy's and MobileNetV3's
    // classifier hardswish (after a linear layer).
    let left: Vec<&str> = fused
        .nodes()
        .iter()
        .filter(|n| wick_ir::Activation::of(&n.op).is_some())
        .map(|n| n.name.as_str())
        .collect();
    let allowed: &[&str] = match name {
        ModelName::Toy => &["relu"],
        ModelName::MobilenetV3Large => &["classifier.1"],
        _ => &[],
    };
    assert!(
        left.iter().all(|n| allowed.contains(n)),
        "activations left in {name}: {left:?}"
    );
    assert!(
        fused.nodes().iter().all(|n| !matches!(n.op, Op::BatchNorm(_))),
        "batch_norm left in {name}:\n{fused}"
    );
    assert!(
        fused.nodes().iter().all(|n| !matches!(n.op, Op::MaxPool2d(_))),
        "max_pool2d left in {name}:\n{fused}"
    );
    // Every squeeze-and-excitation scale went into its projection conv.
    assert!(
        fused.nodes().iter().all(|n| !matches!(n.op, Op::Mul)),
        "mul left in {name}:\n{fused}"
    );
    let run = |engine: &Engine, graph, x: &Tensor| {
        engine
            .compile(graph)
            .unwrap()
            .run(std::slice::from_ref(x))
            .unwrap()
            .remove(0)
    };
    let engine = Engine::new(device.clone());
    let want = run(&engine, &graph, &x);
    let got = run(&engine, &fused, &x);
    assert_eq!(got.device().location(), device.location());
    assert_close(&got, &want, 1e-5, &format!("{name} fused vs unfused on {device:?}"));
    let eager = model.forward_eager(&x).unwrap();
    assert_close(&got, &eager, 1e-5, &format!("{name} fused vs eager on {device:?}"));
    if !device.is_cpu() {
        // Same graph, same weights on the CPU (Winograd / direct kernels) vs
        // the device (candle's kernels + wick's epilogue): both f32 with
        // different summation orders; 1e-4 of the output scale is the bound
        // the PyTorch comparisons use (observed ~1e-6 on the CPU side).
        let cpu = run(&Engine::cpu(), &fused, &x.to_device(&Device::Cpu).unwrap());
        assert_close(
            &got.to_device(&Device::Cpu).unwrap(),
            &cpu,
            1e-4,
            &format!("{name} {device:?} vs CPU"),
        );
    }
}

device_test! {
    /// Three pairs in the tutorial's toy model, across Sequential and wrapper boundaries.
    fn toy_fuses_three(device) {
        check(ModelName::Toy, None, [3, 0, 0, 0, 0, 0, 0], &device);
    }
}

device_test! {
    /// Two pairs in the tutorial's Sequential model with different shapes from the pattern's example.
    fn toy_sequential_fuses_two(device) {
        check(ModelName::ToySequential, None, [2, 0, 1, 0, 0, 0, 0], &device);
    }
}

device_test! {
    /// All twenty pairs of ResNet18 (strided, padded, 1x1 downsample convs
    /// included); then 8 block tails (conv + residual add + relu), 9
    /// conv + relu epilogues and the stem's max pool, leaving no separate
    /// relu or max_pool2d.
    fn resnet18_fuses_twenty(device) {
        check(ModelName::Resnet18, Some(1), [20, 8, 9, 0, 0, 1, 0], &device);
    }
}

device_test! {
    /// All 36 pairs of ResNet34; 16 block tails, 16 + 1 conv + relu
    /// epilogues and the stem's max pool.
    fn resnet34_fuses_thirty_six(device) {
        check(ModelName::Resnet34, Some(1), [36, 16, 17, 0, 0, 1, 0], &device);
    }
}

device_test! {
    /// All 53 pairs of ResNet50 (1x1 reductions and expansions, strided 3x3,
    /// downsamples); 16 bottleneck tails (conv3 + residual add + relu), two
    /// conv + relu epilogues per bottleneck and the stem's, and its max pool.
    fn resnet50_fuses_fifty_three(device) {
        check(ModelName::Resnet50, Some(1), [53, 16, 33, 0, 0, 1, 0], &device);
    }
}

device_test! {
    /// All 52 conv → batch_norm pairs of MobileNetV2 (17 depthwise convs
    /// among them), its 35 ReLU6s and 10 residual adds as conv epilogues.
    fn mobilenet_v2_fuses_fifty_two(device) {
        check(ModelName::MobilenetV2, Some(1), [52, 0, 0, 35, 10, 0, 0], &device);
    }
}

device_test! {
    /// All 46 conv → batch_norm pairs of MobileNetV3-Large; its ReLUs (after
    /// the first six blocks' convs and every squeeze-and-excitation's `fc1`),
    /// 20 hardswishes and 8 hardsigmoids (each `fc2`) and 10 residual adds
    /// become conv epilogues; the 8 squeeze-and-excitation scales go into
    /// their projection convs.
    fn mobilenet_v3_large_fuses_forty_six(device) {
        check(ModelName::MobilenetV3Large, Some(1), [46, 0, 19, 28, 10, 0, 8], &device);
    }
}

device_test! {
    /// All 49 conv → batch_norm pairs of EfficientNet-B0 (3x3 and 5x5
    /// depthwise); 49 SiLUs and 16 sigmoids (each `fc2`), 9 residual adds
    /// as conv epilogues; the 16 squeeze-and-excitation scales into their
    /// projection convs.
    fn efficientnet_b0_fuses_forty_nine(device) {
        check(ModelName::EfficientnetB0, Some(1), [49, 0, 0, 65, 9, 0, 16], &device);
    }
}
