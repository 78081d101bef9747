//! `cargo xtask ir`: parse, verify (and optionally optimise) IR text from a file.

use crate::common::{apply_passes, InspectArgs, OutputArgs};
use anyhow::{Context, Result};
use clap::Args;
use std::io::Read;
use std::path::PathBuf;
use wick_ir::Graph;

/// Arguments of `ir`.
#[derive(Debug, Args)]
pub struct IrArgs {
    /// File with IR text as printed by `graph` (`-` reads standard input).
    file: PathBuf,
    #[command(flatten)]
    passes: InspectArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Parses and verifies the file, gives its constants seeded random data,
/// runs the passes and prints the result.
pub fn run(args: IrArgs) -> Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read `{}`", args.file.display()))?
    };
    let mut graph = Graph::parse(&text).with_context(|| format!("in `{}`", args.file.display()))?;
    // Text carries no weights; give constants deterministic data so that
    // weight-folding passes can run on hand-written graphs (verified
    // against the limits first: nothing too large is allocated).
    let limits = wick_ir::Limits::from_env().map_err(anyhow::Error::msg)?;
    wick_models::random::fill_missing_constants(&mut graph, 0, &limits)?;
    let name = graph.name().to_string();
    let (graph, report) = apply_passes(graph, args.passes.passes, args.output.dump_ir.as_deref())?;
    args.output.emit(&name, &graph, report.as_ref())
}
