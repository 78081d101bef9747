//! `run` and `export`: outputs written, fused equal to PyTorch, saved
//! directories, IR text and ONNX files run like models.

use super::*;

/// `run` with weights, input and output files round-trips through safetensors and prints a summary.
#[test]
fn run_with_files_writes_output() {
    let dir = tempfile::tempdir().unwrap();
    let io = candle_core::safetensors::load(fixtures().join("toy.io.safetensors"), &Device::Cpu).unwrap();
    let input = write_input(dir.path(), "in.safetensors", io["input"].clone());
    let output = dir.path().join("out.safetensors");
    let weights = fixtures().join("toy.weights.safetensors");
    let out = xtask_ok(&[
        "run",
        "toy",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        output.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("toy: input [5, 1, 1, 1] -> output [5, 1, 1, 1] in "),
        "{stdout}"
    );
    let written = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&written["output"], &io["output"]);
    assert!(diff < 1e-5, "output differs from PyTorch by {diff}");
}

/// `run --passes default` gives PyTorch's output on the torch-exported toy model.
#[test]
fn run_fused_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for (model, stem) in [("toy", "toy"), ("toy-sequential", "toy_sequential")] {
        let io =
            candle_core::safetensors::load(fixtures().join(format!("{stem}.io.safetensors")), &Device::Cpu).unwrap();
        let input = write_input(dir.path(), &format!("{stem}.in"), io["input"].clone());
        let output = dir.path().join(format!("{stem}.out"));
        let weights = fixtures().join(format!("{stem}.weights.safetensors"));
        xtask_ok(&[
            "run",
            model,
            "--passes",
            "default",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            &input,
            "--output",
            output.to_str().unwrap(),
        ]);
        let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&got["output"], &io["output"]);
        assert!(diff < 1e-5, "{model}: {diff}");
    }
}

/// `export` saves the optimised graph; reloading it without the model code
/// gives outputs identical to a freshly traced and optimised graph.
#[test]
fn export_then_load_matches_fresh() {
    let dir = tempfile::tempdir().unwrap();
    xtask_ok(&[
        "export",
        "toy-sequential",
        "--passes",
        "default",
        "--batch",
        "2",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let loaded = wick_engine::saved::load(dir.path()).unwrap();
    assert!(loaded.to_string().contains("fused_conv2d"));
    let model = wick_models::Model::load(
        wick_models::ModelName::ToySequential,
        wick_models::WeightSource::Random { seed: 0 },
        &Device::Cpu,
    )
    .unwrap();
    let mut fresh = model.trace(&[2, 3, 28, 28]).unwrap();
    wick_passes::PassManager::default_pipeline().run(&mut fresh).unwrap();
    let x = wick_models::random_input(4, &[2, 3, 28, 28], &Device::Cpu).unwrap();
    let engine = wick_engine::Engine::cpu();
    let a = engine.compile(&loaded).unwrap().run(std::slice::from_ref(&x)).unwrap();
    let b = engine.compile(&fresh).unwrap().run(&[x]).unwrap();
    assert_eq!(max_abs_diff(&a[0], &b[0]), 0.0);
    assert_fails(
        &["export", "resnet101", "--out", dir.path().to_str().unwrap()],
        "unknown model",
    );
}

/// `run DIR` runs what `export` wrote; `run FILE.wick` runs IR text with
/// seeded constants or with `--weights`, and misuse is a one-line error.
#[test]
fn run_takes_saved_directories_and_ir_text() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("toy");
    xtask_ok(&["export", "toy", "--out", saved.to_str().unwrap()]);
    let out = xtask_ok(&["run", saved.to_str().unwrap()]);
    assert_contains(&out.stdout, &["graph toy: input [[5, 1, 1, 1]] -> output [5, 1, 1, 1]"]);
    let text = saved.join("graph.wick");
    let out = xtask_ok(&["run", text.to_str().unwrap(), "--batch", "3"]);
    assert_contains(&out.stdout, &["input [[3, 1, 1, 1]] -> output [3, 1, 1, 1]"]);
    let weights = saved.join("weights.safetensors");
    let from_text = dir.path().join("text.safetensors");
    let from_dir = dir.path().join("dir.safetensors");
    xtask_ok(&[
        "run",
        text.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--output",
        from_text.to_str().unwrap(),
    ]);
    xtask_ok(&["run", saved.to_str().unwrap(), "--output", from_dir.to_str().unwrap()]);
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap()["output"].clone();
    assert_eq!(max_abs_diff(&load(&from_text), &load(&from_dir)), 0.0);
    assert_fails(
        &["run", saved.to_str().unwrap(), "--weights", weights.to_str().unwrap()],
        "carries its weights",
    );
    assert_fails(&["run", "no/such/graph.wick"], "cannot read `no/such/graph.wick`");
}

/// `--num-classes` sizes the classifier of a seeded model; a model without
/// one, or a count out of range, is a one-line error.
#[test]
fn num_classes_sizes_the_classifier() {
    let out = xtask_ok(&["run", "mobilenet-v2", "--num-classes", "10", "--batch", "1"]);
    assert_contains(&out.stdout, &["-> output [1, 10]"]);
    assert_fails(&["run", "toy", "--num-classes", "3"], "the model has no classifier");
    assert_fails(&["run", "resnet18", "--num-classes", "0"], "expected 1 to 65536, got 0");
}

/// An ONNX file runs wherever a model name does: `run` with an input of
/// another batch than the export's matches PyTorch; `graph --json` reports
/// the fusions; flags that pick weights are refused; a broken file is a
/// typed error, not a panic.
#[test]
fn onnx_files_run_like_models() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = fixtures().join("onnx");
    let io = candle_core::safetensors::load(onnx.join("tiny.io.safetensors"), &Device::Cpu).unwrap();
    let input = write_input(dir.path(), "in.safetensors", io["input"].clone());
    let want = io["output"].to_dtype(DType::F32).unwrap();
    for file in ["tiny_torchscript.onnx", "tiny_dynamo.onnx"] {
        let model = onnx.join(file);
        let output = dir.path().join("out.safetensors");
        let args = [
            "run",
            model.to_str().unwrap(),
            "--input",
            &input,
            "--output",
            output.to_str().unwrap(),
        ];
        let out = xtask_ok(&[&args[..], &["--passes", "default"]].concat());
        assert_contains(&out.stdout, &["input [[2, 3, 32, 32]] -> output [2, 5]"]);
        let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&got["output"], &want);
        assert!(diff < 1e-5, "{file}: {diff}");
        let json = xtask_ok(&["graph", model.to_str().unwrap(), "--passes", "default", "--json"]);
        assert_contains(&json.stdout, &["\"fuse-conv-activation\"", "\"matched\""]);
        assert_fails(
            &["run", model.to_str().unwrap(), "--weights", input.as_str()],
            "carries its weights",
        );
    }
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"\x0a\xff\xff\xff\xff\x0f").unwrap();
    assert_fails(&["run", broken.to_str().unwrap()], "not a valid ONNX model");
    assert_fails(
        &["graph", dir.path().join("absent.onnx").to_str().unwrap()],
        "cannot read ONNX file",
    );
}

/// Commands that execute or save a model optimise by default (`--passes
/// none` opts out); `graph` prints the graph as traced unless asked.
#[test]
fn optimisation_is_on_by_default_where_models_run() {
    let stdout = |args: &[&str]| String::from_utf8_lossy(&xtask_ok(args).stdout).into_owned();
    assert!(stdout(&["run", "toy"]).contains("(passes: default,"));
    assert!(stdout(&["run", "toy", "--passes", "none"]).contains("(passes: none,"));
    assert!(stdout(&["profile", "toy", "--iters", "1"]).contains("passes default"));
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("toy");
    assert!(stdout(&["export", "toy", "--out", saved.to_str().unwrap()]).contains("(passes: default)"));
    let graph = std::fs::read_to_string(saved.join("graph.wick")).unwrap();
    assert!(!graph.contains("batch_norm"), "{graph}");
    assert!(stdout(&["graph", "toy"]).contains("batch_norm"));
}
