//! `cargo xtask compare`: one model under two engine settings, timed in
//! one process forward by forward (A B B A …), so that the host's drift
//! between and within minutes falls on both alike. On a noisy VM, separate
//! processes of one binary have swung by 1.5× while a change of a few
//! percent was being measured; the ratio of forwards interleaved this way
//! read 0.99–1.01 for identical settings. Variant A is the engine's
//! default; variant B changes what the `--b-*` options say (none: a null
//! test).

use crate::common::{DeviceArgs, ModelArgs, Passes, DEFAULT_INPUT_SEED};
use crate::stats;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::time::Instant;
use wick_engine::{CompiledModel, CpuPath, Engine, WeightBudget};
use wick_models::random_input;

/// Arguments of `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Timed forwards per variant, after `--warmup` of each.
    #[arg(long, default_value_t = 40, value_name = "N")]
    forwards: usize,
    /// Untimed forwards per variant before timing.
    #[arg(long, default_value_t = 5, value_name = "N")]
    warmup: usize,
    /// Variant B's pass pipeline (A: `default`).
    #[arg(long, value_enum, default_value_t = Passes::Default)]
    b_passes: Passes,
    /// Variant B's CPU path: `avx512`, `avx2` or `scalar` (A: the best the
    /// CPU has, or `WICK_ISA`'s).
    #[arg(long, value_name = "PATH")]
    b_isa: Option<String>,
    /// Variant B's packed-weight budget: a factor of at least 1 or
    /// `unlimited` (A: the default, or `WICK_WEIGHT_BUDGET`'s).
    #[arg(long, value_name = "BUDGET")]
    b_weight_budget: Option<String>,
    /// Variant B's batch tiling: `on` or `off` (A: off, or `WICK_BATCH_TILING`'s).
    #[arg(long, value_name = "on|off")]
    b_batch_tiling: Option<String>,
    /// Variant B's spinning: `on` or `off` (A: on, or `WICK_SPIN`'s).
    #[arg(long, value_name = "on|off")]
    b_spin: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Variant B's engine: `engine` with each given `--b-*` setting, and the
/// settings in words (empty: none given).
fn variant_b(args: &CompareArgs, mut engine: Engine) -> Result<(Engine, Vec<String>)> {
    let mut said = Vec::new();
    if args.b_passes != Passes::Default {
        said.push(format!("passes {}", args.b_passes));
    }
    if let Some(isa) = &args.b_isa {
        let path: CpuPath = isa.parse()?;
        engine = engine.with_cpu_path(path)?;
        said.push(format!("isa {path}"));
    }
    if let Some(given) = &args.b_weight_budget {
        engine = engine.with_weight_budget(given.parse::<WeightBudget>()?);
        said.push(format!("weight budget {given}"));
    }
    if let Some(tiling) = &args.b_batch_tiling {
        engine = engine.with_batch_tiling(on_off("--b-batch-tiling", tiling)?);
        said.push(format!("batch tiling {tiling}"));
    }
    if let Some(spin) = &args.b_spin {
        engine = engine.with_spinning(on_off("--b-spin", spin)?);
        said.push(format!("spinning {spin}"));
    }
    Ok((engine, said))
}

/// `on` or `off` given to `flag`, or an error naming the flag.
fn on_off(flag: &str, given: &str) -> Result<bool> {
    match given.trim() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => bail!("{flag} takes `on` or `off`, got `{other}`"),
    }
}

/// Which variant the `i`-th timed forward runs: A B B A, A B B A, …
fn runs_b(i: usize) -> bool {
    matches!(i % 4, 1 | 2)
}

/// Times the two variants interleaved and prints medians and ratios.
pub fn run(args: CompareArgs) -> Result<()> {
    let device = args.device.open()?;
    let a = args.model.traced(&device, Passes::Default, None)?;
    let b_graph = match args.b_passes {
        Passes::Default => a.graph.clone(),
        passes => args.model.traced(&device, passes, None)?.graph,
    };
    let (b_engine, said) = variant_b(&args, Engine::new(device.clone()))?;
    let compiled_a = Engine::new(device.clone()).compile(&a.graph)?;
    let compiled_b = b_engine.compile(&b_graph)?;
    let x = random_input(DEFAULT_INPUT_SEED, &a.shape, &device)?;
    let forward = |model: &CompiledModel| -> Result<(f64, candle_core::Tensor)> {
        let start = Instant::now();
        let y = model.run(std::slice::from_ref(&x))?.remove(0);
        device.synchronize()?;
        Ok((start.elapsed().as_secs_f64() * 1e3, y))
    };
    let b_name = match said.is_empty() {
        true => "the same settings (a null test)".to_string(),
        false => said.join(", "),
    };
    eprintln!(
        "compare {}: input {:?}, A default vs B {b_name}: {} warm-up + {} timed forwards each, A B B A order",
        a.name, a.shape, args.warmup, args.forwards
    );
    for _ in 0..args.warmup {
        forward(&compiled_a)?;
        forward(&compiled_b)?;
    }
    let forwards = args.forwards.max(1);
    let (mut times_a, mut times_b) = (Vec::with_capacity(forwards), Vec::with_capacity(forwards));
    let (mut last_a, mut last_b) = (None, None);
    for i in 0..2 * forwards {
        if runs_b(i) {
            let (ms, y) = forward(&compiled_b)?;
            times_b.push(ms);
            last_b = Some(y);
        } else {
            let (ms, y) = forward(&compiled_a)?;
            times_a.push(ms);
            last_a = Some(y);
        }
    }
    let (ya, yb) = (last_a.context("no forward of A")?, last_b.context("no forward of B")?);
    let diff = stats::abs_max(&(ya - yb)?)?;
    // The i-th forward of A against the i-th of B: neighbours in time.
    let pair_ratios: Vec<f64> = times_a.iter().zip(&times_b).map(|(a, b)| b / a).collect();
    let row = |name: &str, t: &[f64]| {
        println!(
            "{name:<3} median {:>9.3} ms   min {:>9.3}   max {:>9.3}",
            stats::median(t),
            stats::min(t),
            stats::max(t)
        );
    };
    println!(
        "{} {:?} on {}: A default, B {b_name}",
        a.name, a.shape, args.device.device
    );
    row("A", &times_a);
    row("B", &times_b);
    println!(
        "B/A: ratio of medians {:.3}, median of pair ratios {:.3} ({} pairs); max |B - A| of the outputs {diff:.3e}",
        stats::median(&times_b) / stats::median(&times_a),
        stats::median(&pair_ratios),
        pair_ratios.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::runs_b;

    /// Each variant runs half the forwards, in A B B A order.
    #[test]
    fn interleaves_a_b_b_a() {
        let order: String = (0..8).map(|i| if runs_b(i) { 'B' } else { 'A' }).collect();
        assert_eq!(order, "ABBAABBA");
    }
}
