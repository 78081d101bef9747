//! `cargo xtask peak`: the roofline the kernels are measured against — the
//! CPU's measured fp32 FMA peak per instruction-set path and thread count,
//! and the rate at which threads read working sets of several sizes (the
//! caches' and memory's side).

use anyhow::{anyhow, Result};
use clap::Args;
use std::hint::black_box;
use std::time::{Duration, Instant};
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
}

/// Measures and prints GFLOP/s for every path this CPU has, then the read
/// rate of each working set.
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
    println!("{:<8} {:>8} {:>12}", "MiB", "threads", "read GB/s");
    for &mib in &args.read_mib {
        let Some(bytes) = mib.max(1).checked_mul(1 << 20) else {
            anyhow::bail!("--read-mib {mib} is more than this machine can address");
        };
        for &threads in &args.threads {
            let rate = read_rate(threads.max(1), bytes, duration)?;
            println!("{:<8} {:>8} {:>12.1}", mib.max(1), threads.max(1), rate / 1e9);
        }
    }
    Ok(())
}

/// Bytes per second `threads` threads read together, each summing its own
/// buffer of `bytes` over and over for about `duration` (after a first pass
/// that brings its pages in).
fn read_rate(threads: usize, bytes: usize, duration: Duration) -> Result<f64> {
    let rates = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || one_reader(bytes, duration)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a bandwidth probe thread panicked"))?)
            .collect::<Result<Vec<f64>>>()
    })?;
    Ok(rates.iter().sum())
}

/// Floats summed per step: four cache lines.
const STEP: usize = 64;

/// One thread's read rate over a buffer of about `bytes` (whole steps).
fn one_reader(bytes: usize, duration: Duration) -> Result<f64> {
    let len = (bytes / 4).max(STEP) / STEP * STEP;
    let mut buffer: Vec<f32> = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| anyhow!("cannot allocate {} MiB for the read probe", (len * 4) >> 20))?;
    buffer.resize(len, 1.0);
    let mut acc = [0f32; 16];
    sum(&buffer, &mut acc);
    let start = Instant::now();
    let mut passes = 0u64;
    while passes == 0 || start.elapsed() < duration {
        sum(black_box(&buffer), &mut acc);
        passes += 1;
    }
    black_box(acc);
    Ok(passes as f64 * (len * 4) as f64 / start.elapsed().as_secs_f64())
}

/// Adds `buffer` into 16 running sums, compiled for the widest vectors
/// the CPU has (baseline SSE loads would cap the rate from L2).
fn sum(buffer: &[f32], acc: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { sum_avx512(buffer, acc) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { sum_avx2(buffer, acc) };
        }
    }
    sum_body(buffer, acc)
}

/// [`sum_body`] with AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(buffer: &[f32], acc: &mut [f32; 16]) {
    sum_body(buffer, acc)
}

/// [`sum_body`] with AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(buffer: &[f32], acc: &mut [f32; 16]) {
    sum_body(buffer, acc)
}

/// `acc[i] += Σ` of every value at `i` mod 16: four independent vector
/// adds per step, each a cache line's values.
#[inline(always)]
fn sum_body(buffer: &[f32], acc: &mut [f32; 16]) {
    for step in buffer.chunks_exact(STEP) {
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc += (step[i] + step[i + 16]) + (step[i + 32] + step[i + 48]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums are the buffer's (every path), and a rate comes back
    /// positive and finite (no rate is asserted).
    #[test]
    fn reads_sum_the_buffer() {
        let buffer: Vec<f32> = (0..4 * STEP).map(|i| i as f32).collect();
        let mut acc = [0f32; 16];
        sum(&buffer, &mut acc);
        for (i, &a) in acc.iter().enumerate() {
            let want: f32 = buffer.iter().skip(i).step_by(16).sum();
            assert_eq!(a, want, "lane {i}");
        }
        let rate = read_rate(2, 1 << 16, Duration::from_millis(1)).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }
}
