//! The command line as a user meets it: bad inputs exit non-zero with a
//! message naming the problem, and never panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use wick_tests::max_abs_diff;

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Runs a command that must succeed and returns its output.
fn xtask_ok(args: &[&str]) -> Output {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that `output` (a command's stdout or stderr) holds every needle.
fn assert_contains(output: &[u8], needles: &[&str]) {
    let text = String::from_utf8_lossy(output);
    for needle in needles {
        assert!(text.contains(needle), "expected `{needle}` in:\n{text}");
    }
}

/// Asserts failure with `needle` in stderr and no panic.
fn assert_fails(args: &[&str], needle: &str) {
    let out = xtask(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in:\n{stderr}");
}

fn write_input(dir: &Path, name: &str, tensor: Tensor) -> String {
    let path = dir.join(name);
    candle_core::safetensors::save(&HashMap::from([("input".to_string(), tensor)]), &path).unwrap();
    path.display().to_string()
}

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

/// Unknown model names are rejected with the list of known ones.
#[test]
fn unknown_model() {
    assert_fails(
        &["run", "resnet101"],
        "unknown model `resnet101`; expected one of: toy, toy-sequential, resnet18, resnet34, resnet50, mobilenet-v2, mobilenet-v3-large, efficientnet-b0",
    );
    assert_fails(&["graph", "vgg"], "unknown model `vgg`");
}

/// An input of the wrong shape or dtype names the input and what was expected.
#[test]
fn wrong_input_shape_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("toy", [1, 3, 28, 28], DType::F32, "model `toy` expects input [N,1,H,W]"),
        (
            "toy",
            [5, 1, 1, 1],
            DType::F64,
            "input `%x` must be f32[5,1,1,1], got f64[5,1,1,1]",
        ),
        ("toy-sequential", [1, 3, 8, 8], DType::F32, "H, W >= 11"),
    ];
    for (i, (model, shape, dtype, needle)) in cases.into_iter().enumerate() {
        let input = Tensor::zeros(shape.as_slice(), dtype, &Device::Cpu).unwrap();
        let path = write_input(dir.path(), &format!("{i}.safetensors"), input);
        assert_fails(&["run", model, "--input", &path], needle);
    }
}

/// An input file without a tensor called `input` is refused.
#[test]
fn input_file_without_input_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let t = Tensor::zeros((5, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), t)]), &path).unwrap();
    assert_fails(
        &["run", "toy", "--input", path.to_str().unwrap()],
        "must hold exactly the tensors [\"input\"]",
    );
    // An `input` with no values whose strides overflow: a named error,
    // not candle's overflow panic (exit 101 in this debug build).
    let bytes = wick_tests::hostile::dataless_safetensors("input", &[0, 1 << 40, 1 << 40]);
    std::fs::write(&path, bytes).unwrap();
    assert_fails(
        &["run", "toy", "--input", path.to_str().unwrap()],
        "beyond what this machine can address",
    );
}

/// Missing, misshapen and corrupt weights are reported by name.
#[test]
fn bad_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(fixtures().join("toy.weights.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("wrapped.mod.weight");
    let missing = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).unwrap();
    assert_fails(
        &["run", "toy", "--weights", missing.to_str().unwrap()],
        "weight `wrapped.mod.weight` is missing",
    );

    tensors.insert(
        "wrapped.mod.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let shaped = dir.path().join("shaped.safetensors");
    candle_core::safetensors::save(&tensors, &shaped).unwrap();
    assert_fails(
        &["run", "toy", "--weights", shaped.to_str().unwrap()],
        "weight `wrapped.mod.weight` has shape [2], expected [1]",
    );

    let bytes = std::fs::read(fixtures().join("toy.weights.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        &["run", "toy", "--weights", truncated.to_str().unwrap()],
        "is not a valid safetensors file",
    );
    assert_fails(
        &["graph", "toy", "--weights", "/nonexistent/w.safetensors"],
        "cannot read `/nonexistent/w.safetensors`",
    );
}

/// IR text with a syntax error or an undefined value fails with its position.
#[test]
fn bad_ir_text() {
    let dir = tempfile::tempdir().unwrap();
    let syntax = dir.path().join("syntax.ir");
    std::fs::write(&syntax, "graph g(%x: f32[1]) {\n  %y = relu(%x\n  return %y\n}\n").unwrap();
    assert_fails(
        &["ir", syntax.to_str().unwrap()],
        "line 3, column 3: expected `,` or `)`, found `return`",
    );
    let undefined = dir.path().join("undefined.ir");
    std::fs::write(
        &undefined,
        "graph g(%x: f32[1]) {\n  %y = add(%x, %w) : f32[1]\n  return %y\n}\n",
    )
    .unwrap();
    assert_fails(&["ir", undefined.to_str().unwrap()], "undefined value `%w`");
}

/// CUDA requested from a CPU-only build is a clear error.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_feature() {
    assert_fails(&["run", "toy", "--device", "cuda"], "--features cuda");
    assert_fails(&["run", "toy", "--device", "tpu"], "unknown device `tpu`");
}

/// `graph` prints text that `ir` reads back unchanged.
#[test]
fn graph_output_parses_back() {
    let out = xtask(&["graph", "toy-sequential", "--batch", "3"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.ir");
    std::fs::write(&path, &out.stdout).unwrap();
    let again = xtask_ok(&["ir", path.to_str().unwrap()]);
    assert_eq!(again.stdout, out.stdout);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("graph toy-sequential(%x: f32[3,3,28,28]) {"));
}

/// `graph --passes default --json` reports 3 / 2 / 20 fusions in the documented schema.
#[test]
fn graph_json_reports_fusions() {
    for (model, expected) in [("toy", 3), ("toy-sequential", 2), ("resnet18", 20)] {
        let out = xtask_ok(&["graph", model, "--passes", "default", "--json", "--batch", "1"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["model"], model);
        let fuse = &json["passes"][0];
        assert_eq!(fuse["name"], "fuse-conv-batch-norm");
        assert_eq!(fuse["changed"], true);
        assert_eq!(fuse["counters"]["matched"], expected);
        assert!(fuse["nodes_before"].as_u64().unwrap() < fuse["nodes_after"].as_u64().unwrap());
        let names: Vec<&str> = json["passes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "fuse-conv-batch-norm",
                "fuse-conv-add-relu",
                "fuse-conv-relu",
                "fuse-conv-activation",
                "fuse-conv-add",
                "fuse-conv-max-pool",
                "fuse-conv-input-scale",
                "eliminate-dead-code"
            ]
        );
    }
}

/// `--report` prints the fused IR then the pass table; `--dot` writes Graphviz with fused nodes marked.
#[test]
fn graph_report_and_dot() {
    let dir = tempfile::tempdir().unwrap();
    let dot = dir.path().join("toy.dot");
    let out = xtask(&[
        "graph",
        "toy",
        "--passes",
        "default",
        "--report",
        "--dot",
        dot.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("batch_norm"), "{stdout}");
    assert!(
        stdout.contains("fuse-conv-batch-norm") && stdout.contains("matched=3"),
        "{stdout}"
    );
    let dot = std::fs::read_to_string(dot).unwrap();
    assert_eq!(dot.matches("xlabel=\"fused\"").count(), 3, "{dot}");
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

/// `bench --json` writes the documented schema, consistent with itself.
#[test]
fn bench_json_schema() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = xtask_ok(&[
        "bench",
        "toy-sequential",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["model"], "toy-sequential");
    assert_eq!(json["batch"], 1);
    assert_eq!(json["device"], "cpu");
    let source = json["caches"]["source"].as_str().unwrap();
    assert!(["sysfs", "fallback"].contains(&source), "{source}");
    assert_eq!(json["caches"]["detected"], source == "sysfs");
    // 2 convs: 16x24x24 outputs x 3*5*5 MACs, 32x18x18 x 16*7*7, x2 FLOPs.
    let flops = 2.0 * (16.0 * 576.0 * 75.0 + 32.0 * 324.0 * 784.0);
    assert!((json["gflop_per_forward"].as_f64().unwrap() - flops / 1e9).abs() < 1e-12);
    let modes = json["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["candle-eager", "wick-unfused", "wick"]);
    for mode in modes {
        let (min, median, max) = (
            mode["min_ms"].as_f64().unwrap(),
            mode["median_ms"].as_f64().unwrap(),
            mode["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{mode}");
        assert!(mode["peak_rss_mib"].as_f64().unwrap() > 0.0);
        assert!(mode["compile_ms"].as_f64().unwrap() >= 0.0);
        assert!(mode["max_abs_diff_vs_eager"].as_f64().unwrap() < 1e-4);
    }
    assert_eq!(json["passes"][0]["counters"]["matched"], 2);
    assert_contains(&out.stdout, &["candle-eager", "fuse-conv-batch-norm [matched=2]"]);
}

/// A mode whose output is wrong makes the bench exit non-zero, naming the mode.
#[test]
fn bench_fails_on_wrong_output() {
    assert_fails(
        &[
            "bench",
            "toy",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--inject-fault",
            "wick-unfused",
        ],
        "outputs disagree with the reference",
    );
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

/// `throughput` reports images/s for each number of caller threads.
#[test]
fn throughput_reports_each_thread_count() {
    let out = xtask_ok(&["throughput", "toy", "--seconds", "0.2", "--threads", "1,2"]);
    assert_contains(&out.stdout, &["threads 1: ", "threads 2: "]);
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

/// The CLI run with `args` and environment variable `key` set to `value`.
fn run_with_env(args: &[&str], key: &str, value: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env(key, value)
        .output()
        .unwrap()
}

/// `WICK_ISA` forces the CPU kernels' path: every path this CPU has runs
/// and says so; an unknown name is a typed error, exit 1.
#[test]
fn wick_isa_forces_a_path() {
    for path in wick_engine::CpuPath::available() {
        let out = run_with_env(&["run", "toy-sequential"], wick_engine::ISA_ENV, path.name());
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
        assert_contains(&out.stdout, &[&format!("path: {path})")]);
    }
    let out = run_with_env(&["run", "toy"], wick_engine::ISA_ENV, "sse2");
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&out.stderr, &["unknown CPU path `sse2`"]);
}

/// `WICK_CACHES` sizes the kernels' blocks for other caches (and `bench`
/// says so); text that does not parse or a size out of range is a typed
/// error, exit 1, naming it.
#[test]
fn wick_caches_replace_the_detected_sizes() {
    for given in ["l1d=32K, l2=512K", " "] {
        let out = run_with_env(&["run", "toy"], wick_engine::CACHES_ENV, given);
        assert!(
            out.status.success(),
            "`{given}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_env(
        &["bench", "toy", "--modes", "wick", "--iters", "1", "--warmup", "0"],
        wick_engine::CACHES_ENV,
        "l2=512K,l3=0",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_contains(&out.stdout, &["L2 512 KiB / L3 0 KiB (given)"]);
    for (given, expected) in [
        ("l2=1K", "cache l2 of 1024 bytes is outside"),
        ("l2=lots", "invalid cache sizes `l2=lots`: `lots` is not a size"),
        ("l5=1M", "unknown cache `l5`"),
    ] {
        let out = run_with_env(&["run", "toy"], wick_engine::CACHES_ENV, given);
        assert_eq!(out.status.code(), Some(1), "{given}");
        assert_contains(&out.stderr, &[expected]);
    }
}

/// `WICK_BATCH_TILING` takes `on` or `off`; anything else is a typed
/// error at compile, exit 1, naming what was given.
#[test]
fn wick_batch_tiling_switch() {
    for value in ["on", "off"] {
        let out = run_with_env(&["run", "toy"], wick_engine::BATCH_TILING_ENV, value);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_env(&["run", "toy"], wick_engine::BATCH_TILING_ENV, "sometimes");
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&out.stderr, &["invalid batch tiling `sometimes`"]);
}

/// `peak` measures every path this CPU has and the panel product's rate on
/// each shape asked for (no rate is asserted); a malformed shape is a
/// one-line usage error.
#[test]
fn peak_lists_every_available_path() {
    let out = xtask_ok(&[
        "peak",
        "--seconds",
        "0.01",
        "--threads",
        "1",
        "--read-mib",
        "1",
        "--gemm",
        "16x8x32,6x3x20",
    ]);
    let names: Vec<&str> = wick_engine::CpuPath::available().iter().map(|p| p.name()).collect();
    assert_contains(&out.stdout, &names);
    assert_contains(
        &out.stdout,
        &[
            "GFLOP/s",
            "caches L1d",
            "read GB/s",
            "panel product",
            "16x8x32",
            "6x3x20",
        ],
    );
    for bad in ["16x8", "16x0x32", "16xax32"] {
        let out = xtask(&["peak", "--gemm", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert_contains(&out.stderr, &["ROWSxDEPTHxCOLS"]);
    }
}

/// Every committed hostile graph, run from the command line as a file of IR
/// text, exits with status 1 and one line naming the problem: never 101
/// (panic), 134 (abort) or 139 (segfault).
#[test]
fn hostile_graphs_exit_1_with_one_line() {
    for case in wick_tests::hostile::hostile_cases() {
        let out = xtask(&["run", case.path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", case.path.display());
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{}: {stderr}",
            case.path.display()
        );
        assert!(
            stderr.contains(&case.expect),
            "{}: expected `{}` in {stderr}",
            case.path.display(),
            case.expect
        );
    }
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

/// Files larger than anything they could hold (sparse files: no disk or
/// memory used) are refused by size before they are read.
#[test]
fn oversized_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.safetensors");
    std::fs::File::create(&sparse).unwrap().set_len(16 << 30).unwrap();
    let sparse = sparse.to_str().unwrap();
    assert_fails(&["run", "toy", "--weights", sparse], "a weights file may have");
    assert_fails(&["run", "toy", "--input", sparse], "within the element limit can take");
    let out = xtask(&["run", "toy", "--weights", sparse]);
    assert_eq!(out.status.code(), Some(1));
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

/// `compare` times two engine settings of one model interleaved and names
/// the ratio; a setting it cannot take is a named error.
#[test]
fn compare_reports_the_ratio_and_refuses_bad_settings() {
    let out = xtask_ok(&[
        "compare",
        "toy",
        "--forwards",
        "4",
        "--warmup",
        "1",
        "--b-passes",
        "none",
        "--b-isa",
        "scalar",
    ]);
    assert_contains(
        &out.stdout,
        &[
            "A default, B passes none, isa scalar",
            "B/A: ratio of medians",
            "(4 pairs)",
        ],
    );
    assert_fails(&["compare", "toy", "--b-isa", "neon"], "unknown CPU path `neon`");
    assert_fails(
        &["compare", "toy", "--b-batch-tiling", "maybe"],
        "--b-batch-tiling takes `on` or `off`",
    );
    assert_fails(&["compare", "toy", "--b-spin", "fast"], "--b-spin takes `on` or `off`");
    assert_fails(&["compare", "toy", "--b-weight-budget", "0.5"], "invalid weight budget");
}
