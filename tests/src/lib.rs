//! Shared helpers for wick's workspace-level tests: tensor comparison with
//! tolerances relative to output scale, and model loading shortcuts.

pub mod harness;

use candle_core::{DType, Device, Tensor};
use wick_models::{Model, ModelName, WeightSource};

/// Largest absolute difference between two tensors of equal shape (computed in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest absolute value of a tensor (its scale), at least `1e-12`.
pub fn max_abs(a: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-12)
}

/// Asserts `|got - want|_max <= rel * max(1, |want|_max)`, with a readable message.
pub fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
    let diff = max_abs_diff(got, want);
    let scale = max_abs(want).max(1.0);
    assert!(
        diff <= rel * scale,
        "{what}: max abs diff {diff:e} exceeds {rel:e} x scale {scale:e}"
    );
}

/// Model `name` with the seeded random init on the CPU.
pub fn random_model(name: ModelName, seed: u64) -> Model {
    Model::load(name, WeightSource::Random { seed }, &Device::Cpu).unwrap()
}

/// Directory holding the committed fixtures (`fixtures/` at the workspace root).
pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}
