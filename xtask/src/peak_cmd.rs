//! `cargo xtask peak`: the CPU's measured fp32 FMA peak per instruction-set
//! path and thread count, the roofline the kernels are measured against.

use anyhow::Result;
use clap::Args;
use std::time::Duration;
use wick_engine::{CacheSizes, CpuPath};

/// Arguments of `peak`.
#[derive(Debug, Args)]
pub struct PeakArgs {
    /// Comma-separated thread counts (each thread runs its own FMA chains).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

/// Measures and prints GFLOP/s for every path this CPU has.
pub fn run(args: PeakArgs) -> Result<()> {
    let caches = CacheSizes::detect();
    println!(
        "CPU {}; caches L1d {} KiB, L2 {} KiB, L3 {} KiB ({})",
        crate::process_stats::cpu_model().unwrap_or_else(|| "unknown".into()),
        caches.l1d >> 10,
        caches.l2 >> 10,
        caches.l3 >> 10,
        if caches.detected { "sysfs" } else { "fallback" }
    );
    println!("{:<8} {:>8} {:>12}", "path", "threads", "GFLOP/s");
    let duration = Duration::from_secs_f64(args.seconds.clamp(0.01, 60.0));
    for path in CpuPath::available() {
        for &threads in &args.threads {
            let rate = path.fma_peak(threads.max(1), duration)?;
            println!("{:<8} {:>8} {:>12.1}", path.name(), threads.max(1), rate / 1e9);
        }
    }
    Ok(())
}
