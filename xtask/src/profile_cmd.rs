//! `cargo xtask profile`: where the engine's time goes, per op kind and per node.

use crate::common::{CompiledRun, DeviceArgs, ModelArgs, OptimiseArgs, DEFAULT_INPUT_SEED};
use anyhow::Result;
use clap::Args;
use std::collections::BTreeMap;
use std::time::Instant;
use wick_models::random_input;

/// Arguments of `profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Profiled forwards (after one warm-up); times are averaged.
    #[arg(long, default_value_t = 5, value_name = "N")]
    iters: usize,
    /// How many of the slowest nodes to list
    #[arg(long, default_value_t = 10, value_name = "N")]
    top: usize,
    #[command(flatten)]
    optimise: OptimiseArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs the model with per-step timing and prints the breakdown.
pub fn run(args: ProfileArgs) -> Result<()> {
    let CompiledRun {
        name,
        shape,
        device,
        compiled,
    } = CompiledRun::new(&args.model, args.optimise.passes, &args.device)?;
    let x = random_input(DEFAULT_INPUT_SEED, &shape, &device)?;
    eprintln!(
        "profile {}: input {shape:?}, passes {}, 1 warm-up + {} profiled forwards",
        name, args.optimise.passes, args.iters
    );
    compiled.run(std::slice::from_ref(&x))?;
    let iters = args.iters.max(1);
    let mut per_node: Vec<(String, &'static str, String, f64)> = Vec::new();
    let mut wall = 0.0;
    for iteration in 0..iters {
        let start = Instant::now();
        let (_, steps) = compiled.run_profiled(std::slice::from_ref(&x))?;
        wall += start.elapsed().as_secs_f64() * 1e3;
        if iteration == 0 {
            per_node = steps
                .iter()
                .map(|s| (s.name.clone(), s.op, s.output.to_string(), 0.0))
                .collect();
        }
        for (entry, step) in per_node.iter_mut().zip(&steps) {
            entry.3 += step.elapsed.as_secs_f64() * 1e3 / iters as f64;
        }
    }
    wall /= iters as f64;
    let total: f64 = per_node.iter().map(|n| n.3).sum();
    let mut by_op: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for (_, op, _, ms) in &per_node {
        let entry = by_op.entry(op).or_default();
        entry.0 += 1;
        entry.1 += ms;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    println!(
        "{} {shape:?}, passes {}: {wall:.2} ms per forward ({total:.2} ms in steps)",
        name, args.optimise.passes
    );
    println!("\n{:<20} {:>6} {:>10} {:>7}", "op", "nodes", "ms", "share");
    for (op, (count, ms)) in &by_op {
        println!(
            "{op:<20} {count:>6} {ms:>10.3} {:>6.1}%",
            100.0 * ms / total.max(f64::MIN_POSITIVE)
        );
    }
    per_node.sort_by(|a, b| b.3.total_cmp(&a.3));
    println!("\n{} slowest nodes:", args.top.min(per_node.len()));
    println!(
        "{:<28} {:<18} {:<22} {:>9} {:>7}",
        "node", "op", "output", "ms", "share"
    );
    for (name, op, fact, ms) in per_node.iter().take(args.top) {
        println!(
            "{name:<28} {op:<18} {fact:<22} {ms:>9.3} {:>6.1}%",
            100.0 * ms / total.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
