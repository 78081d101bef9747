//! Shared helpers for wick's workspace-level tests: tensor comparison with
//! tolerances relative to output scale, and model loading shortcuts.

pub mod conv_case;
pub mod fuzz_graph;
pub mod harness;
pub mod hostile;

use candle_core::{DType, Device, Tensor};
use wick_models::{Model, ModelName, WeightSource};

/// Largest absolute difference between two tensors of equal shape (computed in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    abs_max(&(wide(a) - wide(b)).unwrap())
}

/// Largest absolute value of a tensor (its scale), at least `1e-12`.
pub fn max_abs(a: &Tensor) -> f64 {
    abs_max(&a.to_dtype(DType::F64).unwrap()).max(1e-12)
}

/// Largest |x| over an f64 tensor.
fn abs_max(a: &Tensor) -> f64 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
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

/// Directory holding the committed fixtures: `$WICK_FIXTURES_DIR` when set
/// (test binaries carried to another machine), else `fixtures/` at the
/// workspace root this crate was built from.
pub fn fixtures_dir() -> std::path::PathBuf {
    match std::env::var_os("WICK_FIXTURES_DIR") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"),
    }
}

#[doc(hidden)]
pub use paste;

/// The GPU the `_cuda` test variants run on: `cuda:$WICK_CUDA_DEVICE`
/// (default 0). Panics, failing the test, when there is none: a `_cuda`
/// test only exists when the `cuda` feature was asked for.
pub fn cuda_device() -> Device {
    let ordinal = std::env::var("WICK_CUDA_DEVICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Device::new_cuda(ordinal).unwrap_or_else(|e| panic!("cuda:{ordinal} is not usable: {e}"))
}

/// Writes a test once for every device: `NAME_cpu` always, and `NAME_cuda`
/// when the `cuda` feature of this crate is on (`cargo test -p wick-tests
/// --features cuda`). The body sees the device as `$device: Device`.
///
/// ```
/// wick_tests::device_test! {
///     /// Doc for both variants.
///     fn engine_matches_eager(device) {
///         assert!(device.is_cpu() || device.is_cuda());
///     }
/// }
/// // Outside `cargo test` the generated functions are not compiled in.
/// ```
#[macro_export]
macro_rules! device_test {
    ($(#[$meta:meta])* fn $name:ident($device:ident) $body:block) => {
        $crate::paste::paste! {
            $(#[$meta])*
            #[test]
            fn [<$name _cpu>]() {
                #[allow(unused_variables)]
                let $device = ::candle_core::Device::Cpu;
                $body
            }

            $(#[$meta])*
            #[cfg(feature = "cuda")]
            #[test]
            fn [<$name _cuda>]() {
                #[allow(unused_variables)]
                let $device = $crate::cuda_device();
                $body
            }
        }
    };
}
