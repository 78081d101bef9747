//! Bad inputs, hostile files and missing features: each exits non-zero
//! with one message naming the problem, and never panics.

use super::*;

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
