//! Tests written once for every device with `wick_tests::device_test!`:
//! each yields `NAME_cpu`, and `NAME_cuda` when wick-tests' `cuda` feature
//! is on. One test binary, so the GPU check carries a single executable
//! (`scripts/build-cuda.sh`, `scripts/gpu-check.sh`).
//!
//! - `models`: the default pipeline on toy, toy-sequential and ResNet18
//!   (fusion counts, fused = unfused = eager; on CUDA also = CPU).
//! - `pytorch`: the engine against committed PyTorch outputs.
//! - `prop_fusion`: conv → batch_norm property test on the device, and the
//!   random-graph pipeline property test (CPU).

mod models;
mod prop_fusion;
mod pytorch;
