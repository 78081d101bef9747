//! wick's graph rewrites: the [`Pass`] trait, the [`PassManager`] that runs
//! passes with verification, counters, IR dumps and a report, the pattern
//! matcher ([`Pattern`], [`PatternPass::register_replacement`]) that user
//! rewrites and wick's own fusions share, and the built-in passes.

#![warn(missing_docs)]

mod counters;
mod dce;
mod error;
mod fold;
mod fuse_conv_batch_norm;
mod fuse_conv_epilogue;
mod fuse_conv_input_scale;
mod manager;
mod pass;
mod pattern;
mod rewrite;

pub use counters::{Counters, PassCounters};
pub use dce::EliminateDeadCode;
pub use error::PassError;
pub use fold::{fold_conv_batch_norm, BatchNormParams};
pub use fuse_conv_batch_norm::{conv_batch_norm_pattern, fuse_conv_batch_norm, fused_name};
pub use fuse_conv_epilogue::{
    fuse_conv_activation, fuse_conv_add, fuse_conv_add_relu, fuse_conv_max_pool, fuse_conv_relu,
};
pub use fuse_conv_input_scale::fuse_conv_input_scale;
pub use manager::{ExtensionPoint, PassManager, PassReport, PassRun, StopReason};
pub use pass::Pass;
pub use pattern::{Match, MatchOutcome, Pattern, PatternBuilder, PatternId};
pub use rewrite::{PatternPass, Replacement, Rewriter};

/// wick's default pipeline: conv → batch_norm fusion, epilogue fusion,
/// input-scale fusion, then dead-code elimination.
pub fn default_pipeline() -> PassManager {
    PassManager::default_pipeline()
}
