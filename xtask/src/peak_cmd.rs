//! `cargo xtask peak`: the roofline the kernels are measured against — the
//! CPU's measured fp32 FMA peak per instruction-set path and thread count,
//! the rate at which threads read working sets of several sizes (the
//! caches' and memory's side), and the rate of the panel micro-kernel on
//! products of several shapes (the kernel's side).

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
    /// Comma-separated working sets, MiB per thread, whose read rate is
    /// measured (each thread sums its own buffer over and over): sized for
    /// the L2, the L3 and memory by default.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,512")]
    read_mib: Vec<usize>,
    /// Comma-separated product shapes `ROWSxDEPTHxCOLS` whose rate on the
    /// panel micro-kernel is measured (each thread its own operands, no
    /// epilogue; rows rounded up to a multiple of 8, columns to 16). The
    /// defaults: ResNet50's 1×1 convs 64 -> 256 and 256 -> 64 on a 28×28
    /// plane, ResNet18's layer2.0.conv1 (3×3, 64 -> 128, 28×28) as im2col
    /// columns, and a Winograd F(4×4) product of 64 channels on a 56×56
    /// plane's 196 tiles.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape,
        default_value = "256x64x784,64x256x784,128x576x784,64x64x196")]
    gemm: Vec<[usize; 3]>,
}

/// `ROWSxDEPTHxCOLS`, three positive integers.
fn parse_shape(text: &str) -> Result<[usize; 3], String> {
    let sizes: Vec<usize> = text
        .split('x')
        .map(|n| n.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("`{text}` is not ROWSxDEPTHxCOLS with three positive integers"))?;
    <[usize; 3]>::try_from(sizes).map_err(|_| format!("`{text}` is not ROWSxDEPTHxCOLS (three sizes)"))
}

/// Measures and prints GFLOP/s for every path this CPU has, then the read
/// rate of each working set and the panel micro-kernel's rate on each
/// product shape (both on the selected path).
pub fn run(args: PeakArgs) -> Result<()> {
    let caches = CacheSizes::selected()?;
    println!(
        "CPU {}; caches L1d {} KiB, L2 {} KiB, L3 {} KiB ({})",
        crate::process_stats::cpu_model().unwrap_or_else(|| "unknown".into()),
        caches.l1d >> 10,
        caches.l2 >> 10,
        caches.l3 >> 10,
        caches.source
    );
    println!("{:<8} {:>8} {:>12}", "path", "threads", "GFLOP/s");
    let duration = Duration::from_secs_f64(args.seconds.clamp(0.01, 60.0));
    for path in CpuPath::available() {
        for &threads in &args.threads {
            let rate = path.fma_peak(threads.max(1), duration)?;
            println!("{:<8} {:>8} {:>12.1}", path.name(), threads.max(1), rate / 1e9);
        }
    }
    // The read rate with the selected path's vectors (the widest unless
    // WICK_ISA says otherwise).
    let path = CpuPath::selected()?;
    println!("{:<8} {:>8} {:>12}", "MiB", "threads", "read GB/s");
    for &mib in &args.read_mib {
        let Some(bytes) = mib.max(1).checked_mul(1 << 20) else {
            anyhow::bail!("--read-mib {mib} is more than this machine can address");
        };
        for &threads in &args.threads {
            let rate = path.read_rate(threads.max(1), bytes, duration)?;
            println!("{:<8} {:>8} {:>12.1}", mib.max(1), threads.max(1), rate / 1e9);
        }
    }
    println!("{:<16} {:>8} {:>12}", "panel product", "threads", "GFLOP/s");
    for &shape in &args.gemm {
        for &threads in &args.threads {
            let rate = path.panel_rate(threads.max(1), shape, duration)?;
            let [rows, depth, cols] = shape;
            println!(
                "{:<16} {:>8} {:>12.1}",
                format!("{rows}x{depth}x{cols}"),
                threads.max(1),
                rate / 1e9
            );
        }
    }
    Ok(())
}
