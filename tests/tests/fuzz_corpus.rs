//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, the inputs
//! cargo-fuzz found interesting, minimised) and every crash the fuzzers
//! found (`fuzz/regressions/<target>/`, each fixed) through the same
//! pipelines the fuzz targets run, on stable: none may panic, and the
//! differential targets' inputs (`graph_diff`, `graph_diff_wide`) must
//! agree with their f64 reference. The image target's corpus is replayed
//! by wick-serve's tests.

use std::path::{Path, PathBuf};
use wick_ir::Limits;
use wick_tests::fuzz_graph::{check_bytes, Scale};
use wick_tests::hostile::{
    guarded, ir_text_pipeline, onnx_bytes_pipeline, saved_bytes_pipeline, weights_pipeline, Ending,
};

/// Every file of `fuzz/{corpus,regressions}/<target>/`, in name order.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flatten()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `pipeline` on every input of `target`; panics name the file.
fn replay(target: &str, pipeline: impl Fn(&[u8]) -> Ending) -> usize {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed corpus for `{target}`");
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if let Ending::Panic(message) = pipeline(&data) {
            panic!("{}: panicked: {message}", path.display());
        }
    }
    files.len()
}

/// The fuzz targets' limit: small tensors, quick runs.
fn limits() -> Limits {
    Limits::default().with_max_elements(1 << 12)
}

#[test]
fn ir_pipeline_corpus_replays_without_panics() {
    replay("ir_pipeline", |data| {
        guarded(|| match std::str::from_utf8(data) {
            Ok(text) => ir_text_pipeline(text, &limits()),
            Err(_) => Ok(Vec::new()),
        })
    });
}

#[test]
fn onnx_import_corpus_replays_without_panics() {
    replay("onnx_import", |data| guarded(|| onnx_bytes_pipeline(data, &limits())));
}

#[test]
fn saved_load_corpus_replays_without_panics() {
    replay("saved_load", |data| guarded(|| saved_bytes_pipeline(data, &limits())));
}

#[test]
fn weights_corpus_replays_without_panics() {
    replay("weights", |data| guarded(|| weights_pipeline(data)));
}

/// Every input of a differential target's corpus agrees with the f64
/// reference at `scale`; a failure names the file.
fn replay_differential(target: &str, scale: Scale) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed corpus for `{target}`");
    for path in &files {
        let data = std::fs::read(path).unwrap();
        match guarded(|| check_bytes(&data, scale).map(|_| Vec::new())) {
            Ending::Ran(_) => {}
            Ending::Error(message) => panic!("{}: {message}", path.display()),
            Ending::Panic(message) => panic!("{}: panicked: {message}", path.display()),
        }
    }
}

#[test]
fn graph_diff_corpus_agrees_with_the_reference() {
    replay_differential("graph_diff", Scale::Small);
}

#[test]
fn graph_diff_wide_corpus_agrees_with_the_reference() {
    replay_differential("graph_diff_wide", Scale::Model);
}
