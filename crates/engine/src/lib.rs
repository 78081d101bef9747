//! wick's executor: compiles a verified [`wick_ir::Graph`] for a candle
//! [`Device`](candle_core::Device) into a [`CompiledModel`] that can be run
//! from many threads.
//!
//! Compilation moves weights to the device once, chooses a kernel per node
//! (precomputing what depends only on constants), and plans when each
//! intermediate is freed (right after its last use).

#![warn(missing_docs)]

mod cpu_conv;
mod cpu_pool;
mod device;
mod error;
mod kernels;
mod model;

pub use device::{parse_device, DeviceSpec};
pub use error::EngineError;
pub use model::{CompiledModel, Engine, StepProfile};
