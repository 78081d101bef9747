//! Replays the committed corpus of the `image_preprocess` fuzz target
//! (`fuzz/corpus/image_preprocess/`, plus any crash found and fixed in
//! `fuzz/regressions/image_preprocess/`) through the service's
//! preprocessing on stable: each input is an image or a typed refusal,
//! never a panic.

use std::path::Path;

#[test]
fn image_corpus_replays_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files: Vec<_> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join("image_preprocess")).ok())
        .flatten()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no committed image corpus");
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| wick_serve::preprocess(&data).map(|t| t.dims().to_vec()));
        match outcome {
            Ok(Ok(dims)) => assert_eq!(dims, [1, 3, 224, 224], "{}", path.display()),
            Ok(Err(_)) => {}
            Err(_) => panic!("{}: preprocessing panicked", path.display()),
        }
    }
}
