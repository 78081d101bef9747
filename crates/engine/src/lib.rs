//! wick's executor: compiles a verified [`wick_ir::Graph`] for a candle
//! [`Device`](candle_core::Device) into a [`CompiledModel`] that can be run
//! from many threads.
//!
//! Compilation moves weights to the device once, chooses a kernel per node
//! (precomputing what depends only on constants), and plans when each
//! intermediate is freed (right after its last use).
//!
//! The crate by concern: `compile` (verify, lower, plan), `plan` (steps,
//! last-use frees, peak bytes), `exec` (run, profile, scheduling, the input
//! check), `kernel` (a step's kernel: candle ops or wick's CPU kernels, with
//! named operands), `candle/` (device-generic ops, the CUDA epilogue),
//! `cpu/` (the conv policy and the packed-weight budget, the epilogue, the
//! pool, the GEMM micro-kernels and their ISA dispatch, the conv
//! algorithms), `machine` (the CPU path a model is compiled for),
//! `caches` (the cache sizes its blocks are derived from), `tiling` (which leading steps run a few images at a time),
//! `batched` and `saved`.
//!
//! Packed conv weights stay within [`WeightBudget`] (2.5× the graph's conv
//! weights + 48 MiB unless [`Engine::with_weight_budget`] or
//! `WICK_WEIGHT_BUDGET` says otherwise): over it, Winograd F(4×4) convs
//! step down to F(2×2).
//!
//! On the CPU the kernels take the best instruction-set path the CPU has;
//! [`Engine::with_cpu_path`] or the `WICK_ISA` environment variable
//! (`avx512`, `avx2`, `scalar`) forces one, a typed error where the CPU
//! lacks it. Block sizes come from the caches Linux sysfs reports;
//! [`Engine::with_caches`] or `WICK_CACHES` (`l1d=32K,l2=512K,l3=32M`)
//! give others ([`CacheSizes`]).
//!
//! A service loads weights, traces, optimises and compiles once, then calls
//! [`CompiledModel::run`] from any number of threads (it is `Send + Sync`;
//! share it with an `Arc`):
//!
//! ```
//! use candle_core::Device;
//! use wick_engine::Engine;
//! use wick_models::{random_input, Model, ModelName, WeightSource};
//! use wick_passes::PassManager;
//!
//! // WeightSource::File(path) for a safetensors checkpoint; `wick_models::hub` for timm's.
//! let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 0 }, &Device::Cpu)?;
//! let mut graph = model.trace(&[1, 3, 64, 64])?;
//! let report = PassManager::default_pipeline().run(&mut graph)?;
//! assert_eq!(report.count("fuse-conv-batch-norm", "matched"), 20);
//! let compiled = Engine::cpu().compile(&graph)?;
//! let x = random_input(1, &[1, 3, 64, 64], &Device::Cpu)?;
//! let logits = compiled.run(&[x])?.remove(0);
//! assert_eq!(logits.dims(), [1, 1000]);
//! // Save the optimised graph with its folded weights; reload without the model code.
//! let dir = tempfile::tempdir()?;
//! wick_engine::saved::save(&graph, dir.path())?;
//! let reloaded = Engine::cpu().compile(&wick_engine::saved::load(dir.path())?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod batched;
mod caches;
mod candle;
mod compile;
// Off x86-64 only the portable paths run: what the SIMD paths alone use
// (their macros, and fields and constants only they read) is unused there,
// and would warn on every such build (21 warnings on aarch64). x86-64
// builds, CI's among them, keep every lint.
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_macros, unused_variables)
)]
mod cpu;
mod device;
mod error;
mod exec;
mod expansion;
mod kernel;
mod machine;
mod plan;
pub mod saved;
mod spin;
mod tiling;

pub use batched::{BatchedModel, CacheStats};
pub use caches::{CacheSizes, CacheSource, CACHES_ENV, L1D_RANGE, L2_RANGE, L3_RANGE};
pub use compile::Engine;
pub use cpu::budget::{WeightBudget, DEFAULT_WEIGHT_ALLOWANCE_MIB, DEFAULT_WEIGHT_BUDGET, WEIGHT_BUDGET_ENV};
pub use device::{parse_device, DeviceSpec};
pub use error::EngineError;
pub use exec::{CompiledModel, StepProfile, IN_POOL_MAX_ACTIVATION_BYTES};
pub use machine::{CpuPath, ISA_ENV};
pub use spin::SPIN_ENV;
pub use tiling::BATCH_TILING_ENV;

/// Helpers shared by the engine's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// A seeded generator of values uniform in [-1, 1) (a 64-bit LCG's top
    /// 24 bits: reproducible from a proptest seed, no extra dependency).
    pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    pub(crate) use wick_tests::max_abs_diff;

    /// `ulps` units in the last place of `t`'s largest magnitude (at least
    /// of 1.0): a tolerance for results that differ only by an
    /// activation's vector form against its scalar one.
    pub(crate) fn ulps_of(t: &candle_core::Tensor, ulps: u32) -> f64 {
        let max = t.abs().and_then(|a| a.max_all()).and_then(|m| m.to_scalar::<f32>());
        f64::from(ulps) * f64::from(f32::EPSILON) * f64::from(max.unwrap_or(f32::INFINITY).max(1.0))
    }

    /// A graph parsed from IR text with seeded random data for its constants.
    pub(crate) fn graph_with_weights(text: &str) -> wick_ir::Graph {
        let mut graph = wick_ir::Graph::parse(text).unwrap();
        wick_models::random::fill_missing_constants(&mut graph, 7, &Default::default()).unwrap();
        graph
    }
}
