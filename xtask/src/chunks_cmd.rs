//! `cargo xtask chunks`: wick's forwards timed in chunks asked for on
//! stdin, for a driver that interleaves them with other runtimes' chunks
//! in one run (`scripts/bench_reference.py --interleave`). On a noisy VM
//! separate processes of one runtime have swung by 1.5× between minutes,
//! more than the differences being measured; chunks of each runtime a few
//! hundred milliseconds apart put the host's drift on all of them alike.
//!
//! Protocol, one line each way: the driver writes a count `N`, this
//! command runs `N` forwards and writes their times in milliseconds,
//! space-separated; an empty line, `q` or the end of input ends it, after
//! a last line `rss MiB` (the process's peak resident set).

use crate::common::{DeviceArgs, ModelArgs, Passes, DEFAULT_INPUT_SEED};
use crate::process_stats;
use anyhow::{bail, Result};
use clap::Args;
use std::io::{BufRead, Write};
use std::time::Instant;
use wick_engine::Engine;
use wick_models::random_input;

/// The most forwards one request may ask for.
const MAX_CHUNK: usize = 100_000;

/// Arguments of `chunks`.
#[derive(Debug, Args)]
pub struct ChunksArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// What one request line asks for: `Some(n)` forwards, or `None` to stop.
fn request(line: &str) -> Result<Option<usize>> {
    match line.trim() {
        "" | "q" => Ok(None),
        given => match given.parse::<usize>() {
            Ok(n) if (1..=MAX_CHUNK).contains(&n) => Ok(Some(n)),
            _ => bail!("a chunk request is a count of forwards from 1 to {MAX_CHUNK}, or `q`; got `{given}`"),
        },
    }
}

/// Serves chunk requests from stdin until told to stop.
pub fn run(args: ChunksArgs) -> Result<()> {
    let device = args.device.open()?;
    let traced = args.model.traced(&device, Passes::Default, None)?;
    let (name, shape) = (traced.name, traced.shape);
    // The graph is consumed as `bench` does: its constants go as their
    // packed copies are made, so the peak RSS reported is a service's
    // (with `compile(&graph)` the graph's weights stayed beside the packed
    // ones: ResNet34 at batch 10 read 393 MiB here against bench's 271).
    let compiled = Engine::new(device.clone()).compile_owned(traced.graph)?;
    let x = random_input(DEFAULT_INPUT_SEED, &shape, &device)?;
    eprintln!("chunks {name}: input {shape:?}, ready");
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Some(n) = request(&line?)? else { break };
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            compiled.run(std::slice::from_ref(&x))?;
            device.synchronize()?;
            times.push(format!("{:.4}", start.elapsed().as_secs_f64() * 1e3));
        }
        writeln!(out, "{}", times.join(" "))?;
        out.flush()?;
    }
    let rss = process_stats::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0));
    writeln!(out, "rss {rss:.1}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::request;

    /// Counts are served, `q` and blank lines stop, anything else is an
    /// error that quotes the line.
    #[test]
    fn parses_requests() {
        assert_eq!(request("5\n").unwrap(), Some(5));
        assert_eq!(request(" 100000 ").unwrap(), Some(100_000));
        assert_eq!(request("q").unwrap(), None);
        assert_eq!(request("").unwrap(), None);
        for bad in ["0", "-1", "100001", "ten", "1e3"] {
            let err = request(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
