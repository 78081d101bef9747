//! Hostile inputs through the library: every committed hostile graph
//! (`fixtures/hostile/*.wick`) and hostile saved directories end in a typed
//! error naming the problem, never a panic, abort or out-of-bounds write.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use wick_engine::saved;
use wick_ir::{Graph, Limits};
use wick_tests::hostile::{hostile_cases, run_ir_text, run_saved, Ending};

fn expect_error(ending: Ending, expect: &str, what: &str) {
    match ending {
        Ending::Error(message) => assert!(message.contains(expect), "{what}: expected `{expect}` in `{message}`"),
        Ending::Panic(message) => panic!("{what} panicked: {message}"),
        Ending::Ran(shapes) => panic!("{what} ran (outputs {shapes:?}); expected an error with `{expect}`"),
    }
}

/// Every committed hostile graph ends in its named error.
#[test]
fn hostile_graphs_end_in_named_errors() {
    let cases = hostile_cases();
    assert!(cases.len() >= 15, "the corpus is missing files");
    for case in cases {
        expect_error(
            run_ir_text(&case.text, &Limits::default()),
            &case.expect,
            &case.path.display().to_string(),
        );
    }
}

/// A sound graph passes the same harness (so the errors above are not the
/// harness failing on everything).
#[test]
fn a_sound_graph_runs_through_the_harness() {
    let text = "graph g(%x: f32[1,2,5,5]) {\n  @w = constant : f32[3,2,3,3]\n  @b = constant : f32[3]\n  %c = conv2d[padding=[1,1]](%x, @w, @b) : f32[1,3,5,5]\n  %r = relu(%c) : f32[1,3,5,5]\n  return %r\n}";
    match run_ir_text(text, &Limits::default()) {
        Ending::Ran(shapes) => assert_eq!(shapes, [vec![1, 3, 5, 5]]),
        other => panic!("expected a run, got {other:?}"),
    }
    // The same graph over a lower limit is refused by name.
    expect_error(
        run_ir_text(text, &Limits::default().with_max_elements(64)),
        "more than the limit of 64",
        "low limit",
    );
}

/// Writes a saved directory by hand: `graph.wick` with the format header and
/// `weights.safetensors` holding `weights`.
fn write_saved(dir: &Path, body: &str, weights: &HashMap<String, Tensor>) {
    std::fs::write(
        dir.join(saved::GRAPH_FILE),
        format!("// wick saved graph, format {}\n{body}", saved::FORMAT_VERSION),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.join(saved::WEIGHTS_FILE)).unwrap();
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// The issue's saved directory: a conv whose padding wraps the output
/// length, with a matching declared fact and real weights.
#[test]
fn saved_conv_with_wrapping_padding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = "graph g(%x: f32[1,1,4,4]) {\n  @w = constant : f32[1,1,1,1]\n  %c = conv2d[padding=[9007199254740992,0]](%x, @w) : f32[1,1,18014398509481988,4]\n  return %c\n}\n";
    write_saved(dir.path(), body, &HashMap::from([("w".into(), zeros(&[1, 1, 1, 1]))]));
    expect_error(
        run_saved(dir.path(), &Limits::default()),
        "more than the limit",
        "saved padding",
    );
}

/// Weights that disagree with the graph, or a weights file larger than the
/// graph's constants can use, are refused before any tensor is loaded.
#[test]
fn saved_weights_are_checked_against_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let body = "graph g(%x: f32[1,2,3,3]) {\n  @w = constant : f32[2,2,1,1]\n  %c = conv2d(%x, @w) : f32[1,2,3,3]\n  return %c\n}\n";
    write_saved(dir.path(), body, &HashMap::from([("w".into(), zeros(&[2, 2, 1, 1]))]));
    match run_saved(dir.path(), &Limits::default()) {
        Ending::Ran(shapes) => assert_eq!(shapes, [vec![1, 2, 3, 3]]),
        other => panic!("the sound directory must run: {other:?}"),
    }
    write_saved(dir.path(), body, &HashMap::from([("w".into(), zeros(&[4, 1, 1, 1]))]));
    expect_error(
        run_saved(dir.path(), &Limits::default()),
        "has shape [4, 1, 1, 1], the graph declares f32[2,2,1,1]",
        "misshapen weight",
    );
    // 200 MB of weights for a graph whose constants take 16 bytes.
    write_saved(dir.path(), body, &HashMap::from([("w".into(), zeros(&[2, 2, 1, 1]))]));
    let weights = dir.path().join(saved::WEIGHTS_FILE);
    let file = std::fs::OpenOptions::new().append(true).open(&weights).unwrap();
    file.set_len(200_000_000).unwrap();
    expect_error(
        run_saved(dir.path(), &Limits::default()),
        "more than the graph's constants and a header can take",
        "oversized weights",
    );
    // A header claiming a huge tensor with no data behind it.
    let mut forged = Vec::new();
    let header = br#"{"w":{"dtype":"F32","shape":[2,2,1,1],"data_offsets":[0,17179869184]}}"#;
    forged.extend_from_slice(&(header.len() as u64).to_le_bytes());
    forged.extend_from_slice(header);
    forged.extend_from_slice(&[0u8; 16]);
    std::fs::write(&weights, forged).unwrap();
    expect_error(
        run_saved(dir.path(), &Limits::default()),
        "is not a valid safetensors file",
        "forged header",
    );
}

/// The graph text of a saved directory is bounded before it is read.
#[test]
fn saved_graph_text_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(saved::GRAPH_FILE);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(saved::MAX_GRAPH_TEXT_BYTES + 1).unwrap();
    expect_error(
        run_saved(dir.path(), &Limits::default()),
        "more than the",
        "huge graph.wick",
    );
}

/// A graph built through the API rather than text meets the same limits
/// at compile time.
#[test]
fn the_engine_verifies_against_its_limits() {
    let mut graph = Graph::new("g");
    let x = graph
        .add_input("x", wick_ir::TensorFact::new(DType::F32, [1usize, 1 << 20]))
        .unwrap();
    let r = graph.add_node("r", wick_ir::Op::Relu, &[x]).unwrap();
    graph.set_outputs(vec![r]);
    let engine = wick_engine::Engine::cpu().with_limits(Limits::default().with_max_elements(1 << 10));
    let err = engine.compile(&graph).unwrap_err().to_string();
    assert!(err.contains("more than the limit of 1024"), "{err}");
    assert!(wick_engine::Engine::cpu().compile(&graph).is_ok());
}

/// The element limit is for admission (the engine, loaders, the CLI); the
/// pass manager's verification after each pass checks structure only, so
/// a user who raises the limit can still optimise a graph above the default.
#[test]
fn passes_do_not_apply_the_admission_limit() {
    let mut graph: Graph = "graph g(%x: f32[2,1073741824]) {\n  %r = relu(%x) : f32[2,1073741824]\n  return %r\n}"
        .parse()
        .unwrap();
    assert!(graph.verify().is_err(), "over the default limit");
    wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
    graph.verify_with(&Limits::unbounded()).unwrap();
    let raised = Limits::default().with_max_elements(1 << 31);
    graph.verify_with(&raised).unwrap();
}
