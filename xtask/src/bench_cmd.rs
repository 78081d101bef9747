//! `cargo xtask bench`: the tutorial's "original model vs compiled" benchmark,
//! each mode timed in its own child process so peak memory is attributable.
//!
//! Modes: `candle-eager` (the model run eagerly with plain candle, the
//! tutorial's "original model"), `wick-unfused` (traced graph, no passes, on
//! the engine) and `wick` (after the default pipeline). Every mode runs on the
//! same input; outputs are compared with an eager reference computed by the
//! parent, and the command fails when a mode disagrees beyond tolerance.
//! An ONNX file (`FILE.onnx`) has no eager mode: its reference is the
//! imported graph without passes, run by the parent.

use crate::common::{report_json, DeviceArgs, ModelArgs, DEFAULT_INPUT_SEED};
use crate::{process_stats, stats};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use wick_engine::{parse_device, CacheSizes, CacheSource, CpuPath, Engine};
use wick_models::{random_input, ModelName};
use wick_passes::PassManager;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The model run eagerly with plain candle (the tutorial's "original model").
    CandleEager,
    /// The traced graph without passes, on wick's engine.
    WickUnfused,
    /// The traced graph after wick's default pipeline, on wick's engine.
    Wick,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::CandleEager => "candle-eager",
            Mode::WickUnfused => "wick-unfused",
            Mode::Wick => "wick",
        }
    }
}

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model name: toy, toy-sequential, resnet18, resnet34, resnet50,
    /// mobilenet-v2, mobilenet-v3-large or efficientnet-b0.
    model: String,
    /// Batch size (default: the tutorial's, 10 for the ResNets).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Untimed forwards before timing, per mode.
    #[arg(long, default_value_t = 10, value_name = "N")]
    warmup: usize,
    /// Timed forwards per round, per mode.
    #[arg(long, default_value_t = 20, value_name = "N")]
    iters: usize,
    /// Further rounds of `iters` forwards are run (up to this many rounds in
    /// all) while the round medians differ by more than 3%.
    #[arg(long, default_value_t = 3, value_name = "N")]
    max_rounds: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Safetensors weights with PyTorch names; seeded random weights when absent.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Comma-separated modes to time.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "candle-eager,wick-unfused,wick"
    )]
    modes: Vec<Mode>,
    /// Also write the results as JSON (schema in README).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Largest accepted |output - eager| relative to max(1, |eager|max).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Testing aid: add 1 to this mode's output, to see the bench fail.
    #[arg(long, hide = true)]
    inject_fault: Option<Mode>,
}

/// Arguments of the hidden `bench-worker` subcommand (one mode, one process).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    warmup: usize,
    #[arg(long)]
    iters: usize,
    #[arg(long)]
    max_rounds: usize,
    #[arg(long)]
    device: String,
    #[arg(long)]
    inject_fault: bool,
}

fn model_args(model: &str, weights: &Option<PathBuf>, batch: Option<usize>) -> ModelArgs {
    ModelArgs {
        model: model.to_string(),
        weights: weights.clone(),
        batch,
        hub: false,
        num_classes: None,
    }
}

fn save_tensor(path: &Path, name: &str, tensor: &Tensor) -> Result<()> {
    let tensors = HashMap::from([(name.to_string(), tensor.clone())]);
    candle_core::safetensors::save(&tensors, path).with_context(|| format!("cannot write `{}`", path.display()))
}

fn load_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let mut tensors =
        candle_core::safetensors::load(path, device).with_context(|| format!("cannot read `{}`", path.display()))?;
    tensors
        .remove(name)
        .with_context(|| format!("`{}` has no tensor `{name}`", path.display()))
}

/// One forward of the mode being timed.
type Forward = dyn Fn(&Tensor) -> Result<Tensor>;

/// Runs one mode: load, compile, warm up, time, report JSON on stdout.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let x = load_tensor(&args.input, "input", &device)?;
    let model_args = model_args(&args.model, &args.weights, Some(x.dims()[0]));
    let compile_start = Instant::now();
    let mut passes = Value::Null;
    let mut planned_peak = Value::Null;
    let forward: Box<Forward> = match (args.mode, model_args.onnx_path()) {
        (Mode::CandleEager, Some(_)) => bail!("candle-eager runs a model of the zoo, not an ONNX file"),
        (Mode::CandleEager, None) => {
            let model = model_args.load(&device)?;
            Box::new(move |x: &Tensor| Ok(model.forward_eager(x)?))
        }
        (Mode::WickUnfused | Mode::Wick, onnx) => {
            let mut graph = match onnx {
                Some(path) => model_args.import_onnx(path)?,
                // A service keeps only the compiled model: the candle one is
                // dropped so the unfused weights are not counted twice in peak memory.
                None => model_args.load(&device)?.trace(x.dims())?,
            };
            if args.mode == Mode::Wick {
                let report = PassManager::default_pipeline().run(&mut graph)?;
                passes = report_json(Some(&report));
            }
            let compiled = Engine::new(device.clone()).compile_owned(graph)?;
            planned_peak = json!(compiled.planned_peak_activation_bytes() as f64 / (1 << 20) as f64);
            Box::new(move |x: &Tensor| Ok(compiled.run(std::slice::from_ref(x))?.remove(0)))
        }
    };
    let compile_ms = match args.mode {
        Mode::CandleEager => 0.0,
        _ => compile_start.elapsed().as_secs_f64() * 1e3,
    };
    let name = args.mode.name();
    eprintln!("  {name}: {} warm-up forwards", args.warmup);
    for _ in 0..args.warmup {
        forward(&x)?;
        device.synchronize()?;
    }
    let mut samples = Vec::new();
    let faults_before = process_stats::minor_faults();
    let mut output = None;
    let mut previous_median: Option<f64> = None;
    for round in 1..=args.max_rounds.max(1) {
        let mut round_samples = Vec::with_capacity(args.iters);
        for _ in 0..args.iters.max(1) {
            let start = Instant::now();
            let y = forward(&x)?;
            device.synchronize()?;
            round_samples.push(start.elapsed().as_secs_f64() * 1e3);
            output = Some(y);
        }
        let round_median = stats::median(&round_samples);
        samples.extend(round_samples);
        eprintln!(
            "  {name}: round {round}: {} forwards, median {round_median:.2} ms",
            args.iters.max(1)
        );
        let stable = previous_median.is_some_and(|p| (round_median - p).abs() <= 0.03 * p);
        if stable || (round == 1 && is_steady(&samples)) {
            break;
        }
        previous_median = Some(round_median);
    }
    let faults = match (faults_before, process_stats::minor_faults()) {
        (Some(before), Some(after)) => json!((after - before) as f64 / samples.len() as f64),
        _ => Value::Null,
    };
    let mut output = output.context("no forward was timed")?;
    if args.inject_fault {
        output = (output + 1.0)?;
    }
    save_tensor(&args.output, "output", &output)?;
    let result = json!({
        "samples_ms": samples,
        "compile_ms": compile_ms,
        "peak_rss_mib": process_stats::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        "minor_faults_per_forward": faults,
        "planned_peak_activation_mib": planned_peak,
        "passes": passes,
    });
    println!("{result}");
    Ok(())
}

/// A first round is steady when its two halves have medians within 3%.
fn is_steady(samples: &[f64]) -> bool {
    let (a, b) = samples.split_at(samples.len() / 2);
    let (ma, mb) = (stats::median(a), stats::median(b));
    !a.is_empty() && (ma - mb).abs() <= 0.03 * ma.min(mb)
}

struct ModeResult {
    mode: Mode,
    samples: Vec<f64>,
    compile_ms: f64,
    peak_rss_mib: Option<f64>,
    faults_per_forward: Option<f64>,
    planned_peak_mib: Option<f64>,
    passes: Value,
    max_abs_diff: f64,
}

/// Runs every mode in a child process and prints the comparison table.
pub fn run(args: BenchArgs) -> Result<()> {
    let mut args = args;
    let onnx = crate::common::onnx_path(&args.model).map(Path::to_path_buf);
    if onnx.is_some() && args.modes.contains(&Mode::CandleEager) {
        eprintln!(
            "an ONNX file has no candle-eager mode: skipped (the reference is the imported graph without passes)"
        );
        args.modes.retain(|&m| m != Mode::CandleEager);
    }
    let name = match &onnx {
        Some(path) => path.display().to_string(),
        None => args.model.parse::<ModelName>()?.to_string(),
    };
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    if args.modes.is_empty() {
        bail!("--modes lists no mode");
    }
    let device = args.device.open()?;
    // The path the workers' engines compile for (they inherit WICK_ISA).
    let cpu_path = device.is_cpu().then(CpuPath::selected).transpose()?;
    let caches = CacheSizes::selected()?;
    let machine = format!(
        "CPU {}, path {}, caches L1d {} KiB / L2 {} KiB / L3 {} KiB ({})",
        process_stats::cpu_model().unwrap_or_else(|| "unknown".into()),
        cpu_path.map_or("-".to_string(), |p| p.to_string()),
        caches.l1d >> 10,
        caches.l2 >> 10,
        caches.l3 >> 10,
        caches.source
    );
    let model_args = model_args(&args.model, &args.weights, args.batch);
    // The reference: candle's eager forward, or for an ONNX file the
    // imported graph without passes on wick's engine.
    let (shape, x, flops, reference) = match &onnx {
        Some(path) => {
            let graph = model_args.import_onnx(path)?;
            let shape = match graph.inputs() {
                [input] => graph.node(*input).fact.shape.clone(),
                inputs => bail!("`{name}` has {} inputs; bench takes one", inputs.len()),
            };
            let x = random_input(DEFAULT_INPUT_SEED, &shape, &device)?;
            let compiled = wick_engine::Engine::new(device.clone()).compile(&graph)?;
            let reference = compiled.run(std::slice::from_ref(&x))?.remove(0);
            (shape, x, graph.flops(), reference)
        }
        None => {
            let model = model_args.load(&device)?;
            let shape = model.name().input_shape(args.batch);
            let x = random_input(DEFAULT_INPUT_SEED, &shape, &device)?;
            (
                shape.clone(),
                x.clone(),
                model.trace(&shape)?.flops(),
                model.forward_eager(&x)?,
            )
        }
    };
    let batch = shape[0];
    let reference_scale = stats::abs_max(&reference)?;

    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let input = dir.path().join("input.safetensors");
    save_tensor(&input, "input", &x)?;
    eprintln!(
        "bench {name}: input {shape:?}, device {}, {:.2} GFLOP/forward, {} warm-up + {} timed forwards per round (up to {} rounds) per mode",
        args.device.device,
        flops as f64 / 1e9,
        args.warmup,
        args.iters,
        args.max_rounds
    );
    let exe = std::env::current_exe().context("cannot locate the xtask binary")?;
    let mut results = Vec::new();
    for (index, &mode) in args.modes.iter().enumerate() {
        eprintln!("[{}/{}] {}", index + 1, args.modes.len(), mode.name());
        let output = dir.path().join(format!("{}.safetensors", mode.name()));
        let mut command = Command::new(&exe);
        command
            .arg("bench-worker")
            .args([
                "--model",
                &args.model,
                "--mode",
                mode.name(),
                "--device",
                &args.device.device,
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--warmup", &args.warmup.to_string(), "--iters", &args.iters.to_string()])
            .args(["--max-rounds", &args.max_rounds.to_string()]);
        if let Some(weights) = &args.weights {
            command.arg("--weights").arg(weights);
        }
        if args.inject_fault == Some(mode) {
            command.arg("--inject-fault");
        }
        let child = command
            .stderr(Stdio::inherit())
            .output()
            .context("cannot start the bench worker")?;
        if !child.status.success() {
            bail!("mode {} failed ({})", mode.name(), child.status);
        }
        let report: Value = serde_json::from_slice(&child.stdout).context("bench worker printed no result")?;
        let got = load_tensor(&output, "output", &device)?;
        let max_abs_diff = stats::abs_max(&(&got - &reference)?)?;
        results.push(ModeResult {
            mode,
            samples: serde_json::from_value(report["samples_ms"].clone())?,
            compile_ms: report["compile_ms"].as_f64().unwrap_or(0.0),
            peak_rss_mib: report["peak_rss_mib"].as_f64(),
            faults_per_forward: report["minor_faults_per_forward"].as_f64(),
            planned_peak_mib: report["planned_peak_activation_mib"].as_f64(),
            passes: report["passes"].clone(),
            max_abs_diff,
        });
    }

    let eager_median = results
        .iter()
        .find(|r| r.mode == Mode::CandleEager)
        .map(|r| stats::median(&r.samples));
    print_table(
        &results,
        &name,
        &shape,
        &args.device.device,
        &machine,
        flops,
        eager_median,
    );
    let passes = results
        .iter()
        .find(|r| r.mode == Mode::Wick)
        .map(|r| r.passes.clone())
        .unwrap_or(Value::Null);
    if let Some(path) = &args.json {
        let modes: Vec<Value> = results
            .iter()
            .map(|r| {
                let median = stats::median(&r.samples);
                json!({
                    "name": r.mode.name(),
                    "median_ms": median,
                    "min_ms": stats::min(&r.samples),
                    "max_ms": stats::max(&r.samples),
                    "peak_rss_mib": r.peak_rss_mib,
                    "compile_ms": r.compile_ms,
                    "max_abs_diff_vs_eager": r.max_abs_diff,
                    "samples": r.samples.len(),
                    "images_per_s": batch as f64 / (median / 1e3),
                    "speedup_vs_eager": eager_median.map(|e| e / median),
                    "gflop_per_s": flops as f64 / 1e9 / (median / 1e3),
                    "minor_faults_per_forward": r.faults_per_forward,
                    "planned_peak_activation_mib": r.planned_peak_mib,
                })
            })
            .collect();
        let document = json!({
            "model": name,
            "batch": batch,
            "device": args.device.device,
            "gflop_per_forward": flops as f64 / 1e9,
            "modes": modes,
            "passes": passes,
            "input_shape": shape,
            "warmup": args.warmup,
            "iters": args.iters,
            "tolerance": args.tolerance,
            "cpu": process_stats::cpu_model(),
            "cpu_path": cpu_path.map(|p| p.to_string()),
            "caches": {
                "l1d_kib": caches.l1d >> 10,
                "l2_kib": caches.l2 >> 10,
                "l3_kib": caches.l3 >> 10,
                "detected": caches.source == CacheSource::Sysfs,
                "source": caches.source.name(),
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let limit = args.tolerance * reference_scale.max(1.0);
    let wrong: Vec<String> = results
        .iter()
        // NaN differences fail too.
        .filter(|r| r.max_abs_diff.is_nan() || r.max_abs_diff > limit)
        .map(|r| format!("{} (max |diff| {:.3e})", r.mode.name(), r.max_abs_diff))
        .collect();
    if !wrong.is_empty() {
        bail!(
            "outputs disagree with the reference beyond {limit:.3e} ({} x max(1, |reference| = {reference_scale:.3})): {}",
            args.tolerance,
            wrong.join(", ")
        );
    }
    Ok(())
}

fn print_table(
    results: &[ModeResult],
    name: &str,
    shape: &[usize],
    device: &str,
    machine: &str,
    flops: u64,
    eager_median: Option<f64>,
) {
    println!(
        "{name} {shape:?} on {device}: {:.2} GFLOP per forward; {machine}",
        flops as f64 / 1e9
    );
    println!(
        "{:<13} {:>10} {:>10} {:>10} {:>9} {:>8} {:>8} {:>9} {:>10} {:>11} {:>10} {:>12}",
        "mode",
        "median ms",
        "min ms",
        "max ms",
        "images/s",
        "speedup",
        "GFLOP/s",
        "peak MiB",
        "live MiB",
        "compile ms",
        "faults/fwd",
        "max |diff|"
    );
    for r in results {
        let median = stats::median(&r.samples);
        let batch = shape[0] as f64;
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        println!(
            "{:<13} {:>10.2} {:>10.2} {:>10.2} {:>9.1} {:>8} {:>8.1} {:>9} {:>10} {:>11.1} {:>10} {:>12.3e}",
            r.mode.name(),
            median,
            stats::min(&r.samples),
            stats::max(&r.samples),
            batch / (median / 1e3),
            eager_median.map_or("-".to_string(), |e| format!("{:.2}x", e / median)),
            flops as f64 / 1e9 / (median / 1e3),
            opt(r.peak_rss_mib, 0),
            opt(r.planned_peak_mib, 1),
            r.compile_ms,
            opt(r.faults_per_forward, 0),
            r.max_abs_diff
        );
    }
    if let Some(wick) = results.iter().find(|r| r.mode == Mode::Wick) {
        let passes: Vec<String> = wick
            .passes
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let counters: Vec<String> = p["counters"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{} [{}]", p["name"].as_str().unwrap_or("?"), counters.join(", "))
            })
            .collect();
        println!("passes: {}", passes.join("; "));
    }
    println!(
        "(median/min/max over {} timed forwards per mode; peak MiB = each mode's own process peak RSS; live MiB = engine-planned peak activations)",
        results.first().map_or(0, |r| r.samples.len())
    );
    // The same words as `scripts/bench_reference.py`'s line, so that a log
    // of a pair states every process's peak RSS with its unit, apart from
    // the table's neighbouring number columns.
    let rss: Vec<String> = results
        .iter()
        .filter_map(|r| r.peak_rss_mib.map(|m| format!("{} process {m:.0} MiB", r.mode.name())))
        .collect();
    if !rss.is_empty() {
        println!("peak RSS: {}", rss.join(", "));
    }
}
