//! wick (eager and traced through the engine) against PyTorch outputs
//! produced by `scripts/make_fixtures.py` and committed under `fixtures/`,
//! on every device (`_cpu`; `_cuda` with the `cuda` feature).

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use wick_engine::Engine;
use wick_models::{random_input, Model, ModelName, WeightSource};
use wick_tests::{assert_close, device_test, fixtures_dir, max_abs_diff};

fn load(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join(file), &Device::Cpu).unwrap()
}

/// The engine's output on the traced graph, after wick's default pipeline
/// when `fused`, on `x`'s device, brought back to the CPU.
fn engine_output(model: &Model, x: &Tensor, fused: bool) -> Tensor {
    let mut graph = model.trace(x.dims()).unwrap();
    if fused {
        wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
    }
    Engine::new(x.device().clone())
        .compile(&graph)
        .unwrap()
        .run(std::slice::from_ref(x))
        .unwrap()
        .remove(0)
        .to_device(&Device::Cpu)
        .unwrap()
}

fn check_torch_state_dict(name: ModelName, stem: &str, device: &Device) {
    let model = Model::load(
        name,
        WeightSource::File(fixtures_dir().join(format!("{stem}.weights.safetensors"))),
        device,
    )
    .unwrap();
    let io = load(&format!("{stem}.io.safetensors"));
    let (x, want) = (&io["input"].to_device(device).unwrap(), &io["output"]);
    assert_close(
        &model.forward_eager(x).unwrap().to_device(&Device::Cpu).unwrap(),
        want,
        1e-5,
        &format!("{name} eager vs PyTorch"),
    );
    for fused in [false, true] {
        assert_close(
            &engine_output(&model, x, fused),
            want,
            1e-5,
            &format!("{name} engine (fused: {fused}) vs PyTorch"),
        );
    }
}

device_test! {
    /// The tutorial's toy model with a torch state dict (`nested.0.*`, `wrapped.mod.*`) matches PyTorch within 1e-5.
    fn toy_matches_pytorch(device) {
        check_torch_state_dict(ModelName::Toy, "toy", &device);
    }
}

device_test! {
    /// The tutorial's Sequential model (`0.weight`, ...) matches PyTorch within 1e-5.
    fn toy_sequential_matches_pytorch(device) {
        check_torch_state_dict(ModelName::ToySequential, "toy_sequential", &device);
    }
}

device_test! {
    /// ResNet18 with wick's seeded init (re-implemented in Python) matches
    /// torchvision's logits within 1e-4 at logit scale ~2.
    fn resnet18_matches_torchvision(device) {
        check_classifier(ModelName::Resnet18, &device);
    }
}

device_test! {
    /// ResNet34 (seeded init) matches torchvision's logits within 1e-4 of
    /// their scale (~6).
    fn resnet34_matches_torchvision(device) {
        check_classifier(ModelName::Resnet34, &device);
    }
}

device_test! {
    /// ResNet50 (bottleneck blocks, seeded init) matches torchvision's
    /// logits within 1e-4 of their scale (~2).
    fn resnet50_matches_torchvision(device) {
        check_classifier(ModelName::Resnet50, &device);
    }
}

fn check_classifier(name: ModelName, device: &Device) {
    let io = load(&format!("{}_random.io.safetensors", name.as_str().replace('-', "_")));
    let seeds: Vec<i64> = io["meta.seeds"].to_vec1().unwrap();
    let model = Model::load(name, WeightSource::Random { seed: seeds[0] as u64 }, device).unwrap();
    let want = &io["output"];
    let x = random_input(seeds[1] as u64, &[want.dims()[0], 3, 224, 224], &Device::Cpu).unwrap();
    // If these fail, the Rust and Python generators diverged (not the model).
    let probe_input = x.flatten_all().unwrap().narrow(0, 0, 16).unwrap();
    assert_eq!(
        max_abs_diff(&probe_input, &io["probe.input"]),
        0.0,
        "input generator diverged"
    );
    let graph = model.trace(x.dims()).unwrap();
    let first_conv = graph
        .nodes()
        .iter()
        .find(|n| matches!(n.op, wick_ir::Op::Conv2d(_)))
        .expect("a conv");
    let probe_weight = graph
        .constant_data(&graph.node(first_conv.inputs[1]).name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .narrow(0, 0, 16)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    assert_eq!(
        max_abs_diff(&probe_weight, &io["probe.first_conv.weight"]),
        0.0,
        "weight generator diverged"
    );

    let x = x.to_device(device).unwrap();
    assert_close(
        &model.forward_eager(&x).unwrap().to_device(&Device::Cpu).unwrap(),
        want,
        1e-4,
        &format!("{name} eager vs torchvision"),
    );
    // The engine runs its own kernels (Winograd, direct, lane GEMM); the
    // fused graph also folds every batch norm into its conv.
    for fused in [false, true] {
        let got = engine_output(&model, &x, fused);
        println!(
            "{name} engine (fused: {fused}): max |diff| vs torchvision {:e}",
            max_abs_diff(&got, want)
        );
        assert_close(
            &got,
            want,
            1e-4,
            &format!("{name} engine (fused: {fused}) vs torchvision"),
        );
    }
}

device_test! {
    /// MobileNetV2 (depthwise convs, ReLU6, linear bottlenecks; seeded
    /// init) matches torchvision's logits within 1e-4 of their scale.
    fn mobilenet_v2_matches_torchvision(device) {
        check_classifier(ModelName::MobilenetV2, &device);
    }
}

device_test! {
    /// MobileNetV3-Large (hardswish, squeeze-and-excitation with
    /// hardsigmoid, batch-norm eps 1e-3; seeded init) matches torchvision.
    fn mobilenet_v3_large_matches_torchvision(device) {
        check_classifier(ModelName::MobilenetV3Large, &device);
    }
}

device_test! {
    /// EfficientNet-B0 (SiLU, squeeze-and-excitation with sigmoid, 5x5
    /// depthwise convs; seeded init) matches torchvision.
    fn efficientnet_b0_matches_torchvision(device) {
        check_classifier(ModelName::EfficientnetB0, &device);
    }
}
