//! `cargo xtask throughput`: images/s when several threads share one compiled model.

use crate::common::{CompiledRun, DeviceArgs, ModelArgs, OptimiseArgs, DEFAULT_INPUT_SEED};
use anyhow::{Context, Result};
use clap::Args;
use std::time::{Duration, Instant};
use wick_models::random_input;

/// Arguments of `throughput`.
#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated numbers of caller threads to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Seconds of calls per thread count (after one warm-up call per thread).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[command(flatten)]
    optimise: OptimiseArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs the shared model from each number of threads for a fixed time and prints images/s.
pub fn run(args: ThroughputArgs) -> Result<()> {
    let run = CompiledRun::new(&args.model, args.optimise.passes, &args.device)?;
    let (name, shape, device, compiled) = (run.name, run.shape, run.device, run.compiled);
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    println!(
        "{name} {shape:?} on {}, passes {}, {} rayon threads inside the kernels",
        args.device.device,
        args.optimise.passes,
        rayon_threads()
    );
    for &threads in &args.threads {
        let threads = threads.max(1);
        eprintln!("{threads} caller thread(s) for {:.1} s", duration.as_secs_f64());
        let start = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                // Clones share the compiled plan and its packed weights.
                let compiled = compiled.clone();
                let x = random_input(DEFAULT_INPUT_SEED + t as u64, &shape, &device);
                let device = device.clone();
                std::thread::spawn(move || -> Result<u64> {
                    let x = x?;
                    compiled.run(std::slice::from_ref(&x))?;
                    let mut calls = 0;
                    while start.elapsed() < duration {
                        compiled.run(std::slice::from_ref(&x))?;
                        calls += 1;
                    }
                    // Asynchronous devices: count only finished work.
                    device.synchronize()?;
                    Ok(calls)
                })
            })
            .collect();
        let mut calls = 0;
        for handle in handles {
            calls += handle.join().ok().context("a caller thread panicked")??;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "threads {threads}: {calls} forwards in {elapsed:.2} s = {:.1} images/s",
            (calls as usize * shape[0]) as f64 / elapsed
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
