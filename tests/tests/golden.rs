//! Golden text IR before and after the default pipeline. Rewrite the
//! expected files with `WICK_BLESS=1 cargo test -p wick-tests --test golden`
//! and review the diff.

use std::path::{Path, PathBuf};
use wick_ir::Graph;
use wick_models::random::fill_missing_constants;
use wick_models::ModelName;
use wick_passes::PassManager;
use wick_tests::random_model;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// Compares `actual` with the golden file, or rewrites it under `WICK_BLESS=1`.
fn assert_golden(file: &str, actual: &str) {
    let path = golden_dir().join(file);
    if std::env::var("WICK_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden file {}; run with WICK_BLESS=1", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(e, a)| e != a);
        panic!(
            "{} differs from the output (first differing line: {:?}); rerun with WICK_BLESS=1 if intended.\n--- actual ---\n{actual}",
            path.display(),
            first.map(|l| l + 1)
        );
    }
}

/// The graph after the default pipeline, followed by its counters as comments.
fn after_text(mut graph: Graph) -> String {
    let report = PassManager::default_pipeline().run(&mut graph).unwrap();
    let mut text = graph.to_string();
    for (pass, name, n) in report.counters.iter() {
        text.push_str(&format!("// {pass}.{name} = {n}\n"));
    }
    text
}

fn check_model(name: ModelName, stem: &str) {
    let graph = random_model(name, 0).trace(&name.input_shape(None)).unwrap();
    assert_golden(&format!("{stem}.before.ir"), &graph.to_string());
    assert_golden(&format!("{stem}.after.ir"), &after_text(graph));
}

fn check_text(stem: &str) {
    let text = std::fs::read_to_string(golden_dir().join(format!("{stem}.ir"))).unwrap();
    let mut graph = Graph::parse(&text).unwrap();
    fill_missing_constants(&mut graph, 0, &Default::default()).unwrap();
    assert_golden(&format!("{stem}.after.ir"), &after_text(graph));
}

/// The tutorial's toy model as traced and after fusion (three fused convs, no batch_norm).
#[test]
fn golden_toy() {
    check_model(ModelName::Toy, "toy");
}

/// The tutorial's Sequential model as traced and after fusion (two fused convs).
#[test]
fn golden_toy_sequential() {
    check_model(ModelName::ToySequential, "toy-sequential");
}

/// A conv whose output has a second user: nothing fuses, one refusal counted.
#[test]
fn golden_conv_second_user() {
    check_text("conv_second_user");
}

/// A batch norm with eps = 1e-3 after a strided grouped conv: fuses.
#[test]
fn golden_bn_eps_1e_3() {
    check_text("bn_eps_1e-3");
}

/// A bias-free conv with an affine-free batch norm: fuses.
#[test]
fn golden_conv_no_bias_bn_no_affine() {
    check_text("conv_no_bias_bn_no_affine");
}

/// ResNet50's bottleneck block with a strided downsample (8 → 4 → 16
/// channels, stride 2, on 8×8) as traced and after fusion: four conv → bn
/// pairs, two conv + relu epilogues, the tail's conv + add + relu.
#[test]
fn golden_bottleneck() {
    let mut params = wick_models::RandomParams {
        seed: 0,
        device: candle_core::Device::Cpu,
    };
    let block = wick_models::Bottleneck::load(&mut params, "layer2.0", 8, 4, 2).unwrap();
    let fact = wick_ir::TensorFact::new(candle_core::DType::F32, [1, 8, 8, 8]);
    let graph = wick_models::trace("bottleneck", &block, fact).unwrap();
    assert_golden("bottleneck.before.ir", &graph.to_string());
    assert_golden("bottleneck.after.ir", &after_text(graph));
}

/// MobileNetV2's inverted residual block with its residual (16 → 96 → 16
/// channels, stride 1, on 8×8): 1x1 expansion + ReLU6, 3x3 depthwise +
/// ReLU6, linear 1x1 projection, add; three conv → bn pairs fused.
#[test]
fn golden_inverted_residual() {
    let mut params = wick_models::RandomParams {
        seed: 0,
        device: candle_core::Device::Cpu,
    };
    let block = wick_models::InvertedResidual::load(&mut params, "features.2", 16, 16, 1, 6).unwrap();
    let fact = wick_ir::TensorFact::new(candle_core::DType::F32, [1, 16, 8, 8]);
    let graph = wick_models::trace("inverted_residual", &block, fact).unwrap();
    assert_golden("inverted_residual.before.ir", &graph.to_string());
    assert_golden("inverted_residual.after.ir", &after_text(graph));
}

/// EfficientNet's MBConv block with squeeze-and-excitation and its
/// residual (16 → 64 → 16 channels, 3x3 depthwise, stride 1, on 8×8):
/// three conv → bn pairs and the SE convs' SiLU and sigmoid fused, the
/// residual add into the projection, and the SE scale into it too
/// (`input_scale=1`, the sigmoid as its last operand).
#[test]
fn golden_mbconv_squeeze_excitation() {
    let mut params = wick_models::RandomParams {
        seed: 0,
        device: candle_core::Device::Cpu,
    };
    let silu = wick_ir::Activation::Silu;
    let spec = wick_models::MbConvSpec {
        in_channels: 16,
        kernel: 3,
        expanded: 64,
        out_channels: 16,
        stride: 1,
        squeeze: Some(4),
        activation: silu,
        se_activations: (silu, wick_ir::Activation::Sigmoid),
        eps: 1e-3,
    };
    let block = wick_models::MbConv::load(&mut params, "features.2.1", spec).unwrap();
    let fact = wick_ir::TensorFact::new(candle_core::DType::F32, [1, 16, 8, 8]);
    let graph = wick_models::trace("mbconv_se", &block, fact).unwrap();
    assert_golden("mbconv_se.before.ir", &graph.to_string());
    assert_golden("mbconv_se.after.ir", &after_text(graph));
}
