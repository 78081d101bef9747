//! `cargo xtask graph`: print a model's IR.

use crate::common::{apply_passes, emit, ModelArgs};
use anyhow::Result;
use candle_core::Device;
use clap::Args;

/// Arguments of `graph`.
#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    model: ModelArgs,
}

/// Traces the model at its default input shape and prints the IR.
pub fn run(args: GraphArgs) -> Result<()> {
    let model = args.model.load(&Device::Cpu)?;
    let shape = model.name().input_shape(args.model.batch);
    let graph = apply_passes(model.trace(&shape)?, args.model.passes)?;
    emit(&graph.to_string())
}
