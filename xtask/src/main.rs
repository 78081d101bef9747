//! `cargo xtask`: wick's command line. `run` executes a model, `graph` prints
//! its IR, `bench` times it. Errors go to stderr with a non-zero exit.

mod bench_cmd;
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
