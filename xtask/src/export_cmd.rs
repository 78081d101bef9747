//! `cargo xtask export`: save a model's optimised graph and folded weights.

use crate::common::{apply_passes, ModelArgs, OptimiseArgs};
use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory to write `graph.wick` and `weights.safetensors` into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    optimise: OptimiseArgs,
}

/// Traces at the given batch, runs the passes and saves the result.
pub fn run(args: ExportArgs) -> Result<()> {
    let model = args.model.load(&Device::Cpu)?;
    let shape = model.name().input_shape(args.model.batch);
    let (graph, _) = apply_passes(model.trace(&shape)?, args.optimise.passes, None)?;
    wick_engine::saved::save(&graph, &args.out).with_context(|| format!("exporting to `{}`", args.out.display()))?;
    println!(
        "{}: saved {} nodes for input {shape:?} (passes: {}) to {}",
        model.name(),
        graph.len(),
        args.optimise.passes,
        args.out.display()
    );
    Ok(())
}
