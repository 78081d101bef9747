//! `cargo xtask graph`: print a model's IR.

use crate::common::{apply_passes, InspectArgs, ModelArgs, OutputArgs};
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
    let model = args.model.load(&Device::Cpu)?;
    let shape = model.name().input_shape(args.model.batch);
    let (graph, report) = apply_passes(model.trace(&shape)?, args.passes.passes, args.output.dump_ir.as_deref())?;
    args.output.emit(model.name().as_str(), &graph, report.as_ref())
}
