//! Replays the committed corpora of the service's fuzz targets
//! (`fuzz/corpus/<target>/`, plus any crash found and fixed in
//! `fuzz/regressions/<target>/`) on stable: `image_preprocess` through the
//! service's preprocessing, `oip_request` through the protocol's decoding
//! and encoding. Each input ends in a result or a typed refusal, never a
//! panic.

use std::path::{Path, PathBuf};

/// The committed inputs of fuzz target `target`, sorted; at least one.
fn corpus(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files: Vec<_> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flatten()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no committed corpus for {target}");
    files
}

#[test]
fn image_corpus_replays_without_panics() {
    for path in corpus("image_preprocess") {
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| wick_serve::preprocess(&data).map(|t| t.dims().to_vec()));
        match outcome {
            Ok(Ok(dims)) => assert_eq!(dims, [1, 3, 224, 224], "{}", path.display()),
            Ok(Err(_)) => {}
            Err(_) => panic!("{}: preprocessing panicked", path.display()),
        }
    }
}

/// Every request decodes and round-trips or gets a 400 (a request's fault
/// is never a 500 here: the model's outputs are well formed), and the
/// seeds written by hand as valid requests decode.
#[test]
fn oip_request_corpus_replays_without_panics() {
    let mut decoded = 0;
    for path in corpus("oip_request") {
        let data = std::fs::read(&path).unwrap();
        match std::panic::catch_unwind(|| wick_serve::fuzzing::request_round_trip(&data)) {
            Ok(Ok(_)) => decoded += 1,
            Ok(Err(error)) => assert_eq!(error.status, 400, "{}: {}", path.display(), error.message),
            Err(_) => panic!("{}: decoding panicked", path.display()),
        }
    }
    assert!(decoded >= 5, "only {decoded} requests of the corpus decoded");
}
