//! `cargo xtask graph`: print a model's IR.

use crate::common::{InspectArgs, ModelArgs, OutputArgs};
use anyhow::Result;
use candle_core::Device;
use clap::Args;

/// Arguments of `graph`.
#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    passes: InspectArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Traces the model at its default input shape and prints the IR.
pub fn run(args: GraphArgs) -> Result<()> {
    let traced = args
        .model
        .traced(&Device::Cpu, args.passes.passes, args.output.dump_ir.as_deref())?;
    args.output
        .emit(traced.name.as_str(), &traced.graph, traced.report.as_ref())
}
