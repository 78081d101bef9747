//! `cargo xtask`: wick's command line. `run` executes a model, `graph` prints
//! its IR, `bench` times it. Errors go to stderr with a non-zero exit.

mod bench_cmd;
mod chunks_cmd;
mod common;
mod compare_cmd;
mod export_cmd;
mod graph_cmd;
mod ir_cmd;
mod peak_cmd;
mod process_stats;
mod profile_cmd;
mod run_cmd;
mod stats;
mod throughput_cmd;

use clap::{Parser, Subcommand};

/// wick: trace candle models into a graph IR, optimise and run them.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a model once on an input and print a one-line summary.
    Run(run_cmd::RunArgs),
    /// Print a model's traced IR (optionally after passes).
    Graph(graph_cmd::GraphArgs),
    /// Parse and verify IR text from a file, optionally run passes, print it.
    Ir(ir_cmd::IrArgs),
    /// Time candle-eager vs wick-unfused vs wick (the tutorial's benchmark).
    Bench(bench_cmd::BenchArgs),
    /// Per-op time breakdown of the engine.
    Profile(profile_cmd::ProfileArgs),
    /// Two engine settings of one model timed in one process, forwards interleaved.
    Compare(compare_cmd::CompareArgs),
    /// Forwards timed in chunks asked for on stdin (for interleaving with other runtimes).
    Chunks(chunks_cmd::ChunksArgs),
    /// Save the (optimised) graph and its folded weights to a directory.
    Export(export_cmd::ExportArgs),
    /// Images/s with 1, 2, ... threads sharing one compiled model.
    Throughput(throughput_cmd::ThroughputArgs),
    /// The CPU's measured fp32 FMA peak per instruction-set path (the roofline).
    Peak(peak_cmd::PeakArgs),
    /// One bench mode in its own process (internal).
    #[command(hide = true)]
    BenchWorker(bench_cmd::WorkerArgs),
}

fn main() -> std::process::ExitCode {
    settle_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_cmd::run(args),
        Command::Graph(args) => graph_cmd::run(args),
        Command::Ir(args) => ir_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Profile(args) => profile_cmd::run(args),
        Command::Compare(args) => compare_cmd::run(args),
        Command::Chunks(args) => chunks_cmd::run(args),
        Command::Export(args) => export_cmd::run(args),
        Command::Throughput(args) => throughput_cmd::run(args),
        Command::Peak(args) => peak_cmd::run(args),
        Command::BenchWorker(args) => bench_cmd::worker(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, whatever the error (a verifier's list included), so
            // scripts and logs get the whole problem on the line they grep.
            let message = format!("{err:#}");
            let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("error: {}", lines.join(" "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Sets `RAYON_NUM_THREADS`, where it is unset, to the size rayon's global
/// pool takes anyway (`std::thread::available_parallelism`), before any
/// thread starts. candle 0.11's CPU ops ask `candle_core::utils::
/// get_num_threads()` for their thread count on every call (each matmul,
/// each tile of its conv), and without that variable it counts the
/// physical cores by parsing `/proc/cpuinfo` each time, uncached: 65,995
/// reads in one `bench mobilenet-v3-large --iters 1` (its candle-eager
/// reference), 2.8 s of wall time against 1.0 s with the variable set
/// (2-core Zen 3 VM). The engine's own kernels never ask; candle's eager
/// path (the bench's baseline and reference) now takes the pool's thread
/// count, logical cores, where it took the physical ones.
fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Ok(threads) = std::thread::available_parallelism() {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    }
}
