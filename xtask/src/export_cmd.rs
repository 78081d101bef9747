//! `cargo xtask export`: save a model's optimised graph and folded weights.

use crate::common::{ModelArgs, OptimiseArgs, Traced};
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
    let Traced { name, shape, graph, .. } = args.model.traced(&Device::Cpu, args.optimise.passes, None)?;
    wick_engine::saved::save(&graph, &args.out).with_context(|| format!("exporting to `{}`", args.out.display()))?;
    println!(
        "{name}: saved {} nodes for input {shape:?} (passes: {}) to {}",
        graph.len(),
        args.optimise.passes,
        args.out.display()
    );
    Ok(())
}
