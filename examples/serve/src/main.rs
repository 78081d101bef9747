//! `wick-serve`: serves ResNet18 over HTTP (see the library docs for the API).
//!
//! ```sh
//! cargo run --release -p wick-serve -- --addr 127.0.0.1:8080 [--weights FILE | --saved DIR]
//! curl -s -H 'Content-Type: image/jpeg' --data-binary @cat.jpg \
//!      'http://127.0.0.1:8080/v1/models/resnet18:predict?top_k=3'
//! ```

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use std::future::IntoFuture;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wick_engine::{BatchedModel, Engine};
use wick_models::{Model, ModelName, WeightSource};
use wick_passes::PassManager;
use wick_serve::batcher::BatchConfig;
use wick_serve::oip::ModelInfo;
use wick_serve::{router, AppState};

/// Serve ResNet18 classification over HTTP.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// torchvision/timm ResNet18 weights (safetensors); seeded random weights when absent.
    #[arg(long, conflicts_with = "saved")]
    weights: Option<PathBuf>,
    /// A graph saved by `cargo xtask export resnet18 --passes default --out DIR`.
    #[arg(long)]
    saved: Option<PathBuf>,
    /// Largest accepted request body.
    #[arg(long, default_value_t = wick_serve::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// The model's name in URLs (default: the graph's name, `resnet18` for
    /// the built-in model).
    #[arg(long)]
    model_name: Option<String>,
    /// Dynamic batching: most rows coalesced into one forward.
    #[arg(long, default_value_t = BatchConfig::default().max_batch, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_batch: usize,
    /// Dynamic batching: how long (ms) the oldest request waits for others.
    #[arg(long, default_value_t = 2.0)]
    max_delay_ms: f64,
    /// Requests queued at most. The service admits at most this plus
    /// --max-batch x --workers requests at once (reading, queued, running),
    /// checked before a body is read; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = BatchConfig::default().max_queue, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_queue: usize,
    /// Forwards in flight at once (each already uses every core).
    #[arg(long, default_value_t = BatchConfig::default().workers, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    workers: usize,
    /// Per-request deadline in ms: a request whose forward has not started
    /// (or finished) by then gets 504.
    #[arg(long, default_value_t = 30_000)]
    deadline_ms: u64,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// Serve only these batch sizes (comma-separated), compiled at start;
    /// the batcher forms only these. Default: any size, compiled on first use.
    #[arg(long, value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    /// Batch sizes kept compiled.
    #[arg(long, default_value_t = 4)]
    cache: usize,
}

fn main() -> Result<()> {
    // Decoding, encoding and image preprocessing run on Tokio's blocking
    // pool: short CPU work, for which more threads than cores only add
    // memory (each thread's allocations, a malloc arena each). Forwards run
    // on the batcher's own threads.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(cores)
        .build()?
        .block_on(serve())
}

async fn serve() -> Result<()> {
    // One line per request at info (RUST_LOG, default info; e.g.
    // RUST_LOG=wick_serve=debug adds each batch formed).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Size limits on every graph and request tensor (WICK_MAX_ELEMENTS).
    let limits = wick_ir::Limits::from_env().map_err(anyhow::Error::msg)?;
    let graph = match &args.saved {
        Some(dir) => {
            wick_engine::saved::load_with(dir, &limits).with_context(|| format!("loading `{}`", dir.display()))?
        }
        None => {
            let source = match &args.weights {
                Some(path) => WeightSource::File(path.clone()),
                None => WeightSource::Random { seed: 0 },
            };
            let model = Model::load(ModelName::Resnet18, source, &Device::Cpu)?;
            let mut graph = model.trace(&[1, 3, 224, 224])?;
            PassManager::default_pipeline().run(&mut graph)?;
            graph
        }
    };
    let name = args.model_name.clone().unwrap_or_else(|| graph.name().to_string());
    let info = ModelInfo::of(&graph, &name).map_err(anyhow::Error::msg)?;
    let config = BatchConfig {
        max_batch: args.max_batch,
        max_delay: Duration::from_micros((args.max_delay_ms * 1000.0) as u64),
        max_queue: args.max_queue,
        workers: args.workers,
    };
    let mut model = BatchedModel::new(Engine::cpu().with_limits(limits), graph, args.cache)?;
    if !args.batch_sizes.is_empty() {
        eprintln!("compiling batch sizes {:?}", args.batch_sizes);
        model = model.with_allowed_batches(&args.batch_sizes)?;
    }
    let deadline = Duration::from_millis(args.deadline_ms);
    let state = Arc::new(AppState::new(model, info, limits, config, deadline).with_max_body_bytes(args.max_body_bytes));
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("cannot bind {}", args.addr))?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // On SIGTERM / Ctrl-C: stop accepting, let requests in flight finish,
    // but for at most --drain-seconds.
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = Arc::clone(&stopping);
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown().await;
        signalled.notify_one();
    });
    let drain = Duration::from_secs(args.drain_seconds);
    tokio::select! {
        result = server.into_future() => {
            result?;
            eprintln!("shut down");
        }
        _ = async { stopping.notified().await; tokio::time::sleep(drain).await } => {
            eprintln!("shut down after {} s of draining, with requests still in flight", drain.as_secs());
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
