//! `cargo xtask run`: run a model once on a given or generated input.

use crate::common::{apply_passes, DeviceArgs, ModelArgs, OptimiseArgs, DEFAULT_INPUT_SEED};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use wick_engine::Engine;
use wick_models::random_input;

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Safetensors file with one tensor named `input` (NCHW); a seeded random input when absent.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Where to write the output, as safetensors with one tensor named `output`.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    optimise: OptimiseArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

fn read_input(path: &Path, device: &candle_core::Device) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read input file `{}`", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("input file `{}` is not a valid safetensors file: {e}", path.display()))?;
    let names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    if names != ["input"] {
        bail!(
            "input file `{}` must hold exactly one tensor named `input`, found {:?}",
            path.display(),
            names
        );
    }
    let view = file.tensor("input").expect("name listed above");
    use candle_core::safetensors::Load;
    view.load(device)
        .map_err(|e| anyhow::anyhow!("input file `{}`: tensor `input`: {e}", path.display()))
}

/// Runs the model and prints `model: input [..] -> output [..] in X ms`.
pub fn run(args: RunArgs) -> Result<()> {
    let device = args.device.open()?;
    let model = args.model.load(&device)?;
    let name = model.name();
    let x = match &args.input {
        Some(path) => {
            if args.model.batch.is_some() {
                bail!("--batch applies to the generated input; it cannot be combined with --input");
            }
            read_input(path, &device)?
        }
        None => random_input(DEFAULT_INPUT_SEED, &name.input_shape(args.model.batch), &device)?,
    };
    model.check_input(x.dims())?;
    let (graph, _report) = apply_passes(model.trace(x.dims())?, args.optimise.passes, None)?;
    let compiled = Engine::new(device).compile(&graph)?;
    let start = Instant::now();
    let outputs = compiled.run(std::slice::from_ref(&x))?;
    let elapsed = start.elapsed();
    let output = outputs.into_iter().next().context("graph has no output")?;
    if let Some(path) = &args.output {
        let tensors = HashMap::from([("output".to_string(), output.clone())]);
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("cannot write output file `{}`", path.display()))?;
    }
    let path = compiled.cpu_path().map_or(String::new(), |p| format!(", path: {p}"));
    println!(
        "{name}: input {:?} -> output {:?} in {:.3} ms (passes: {}, device: {}{path})",
        x.dims(),
        output.dims(),
        elapsed.as_secs_f64() * 1e3,
        args.optimise.passes,
        args.device.device
    );
    Ok(())
}
