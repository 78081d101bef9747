//! `cargo xtask run`: run a model of the zoo, a saved directory or a file
//! of IR text once on a given or generated input.

use crate::common::{apply_passes, DeviceArgs, ModelArgs, OptimiseArgs, DEFAULT_INPUT_SEED, DEFAULT_WEIGHT_SEED};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use wick_engine::{saved, Engine};
use wick_ir::{Graph, Limits};
use wick_models::random::fill_missing_constants;
use wick_models::random_input;

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Safetensors file with one tensor named `input` (NCHW); a seeded random input when absent.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Where to write the output, as safetensors with one tensor named `output`.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    optimise: OptimiseArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The tensors of safetensors file `path`, which must hold exactly those
/// named in `names` (for a single input, `input` is accepted too).
fn read_inputs(path: &Path, names: &[String], device: &candle_core::Device) -> Result<Vec<Tensor>> {
    // Inputs are tensors within the element limit: refuse a file that
    // cannot be one (a sparse 100 GB file, say) before reading it.
    let limits = Limits::from_env().map_err(anyhow::Error::msg)?;
    let most = (limits.max_elements() as u64)
        .saturating_mul(8 * names.len() as u64)
        .saturating_add(100_000_008);
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read input file `{}`", path.display()))?
        .len();
    if size > most {
        bail!(
            "input file `{}` has {size} bytes, more than {} tensor(s) within the element limit can take",
            path.display(),
            names.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read input file `{}`", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("input file `{}` is not a valid safetensors file: {e}", path.display()))?;
    let mut found: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    found.sort();
    let mut wanted = names.to_vec();
    wanted.sort();
    let names: Vec<String> = match (names, found.as_slice()) {
        ([_], [only]) if only == "input" => vec!["input".into()],
        _ if found == wanted => names.to_vec(),
        _ => bail!(
            "input file `{}` must hold exactly the tensors {:?}, found {:?}",
            path.display(),
            wanted,
            found
        ),
    };
    names
        .iter()
        .map(|name| {
            let view = file.tensor(name)?;
            wick_models::load_view(&view, device)
                .map_err(|e| anyhow::anyhow!("input file `{}`: tensor `{name}`: {e}", path.display()))
        })
        .collect()
}

/// What `run` runs: a model of the zoo, a directory written by `export`,
/// a file of IR text, or an ONNX file.
enum Target {
    Model,
    Saved(PathBuf),
    IrText(PathBuf),
    Onnx(PathBuf),
}

impl Target {
    fn of(arg: &str) -> Target {
        let path = Path::new(arg);
        if let Some(onnx) = crate::common::onnx_path(arg) {
            Target::Onnx(onnx.to_path_buf())
        } else if path.is_dir() {
            Target::Saved(path.to_path_buf())
        } else if path.is_file() || path.extension().is_some_and(|e| e == "wick") {
            Target::IrText(path.to_path_buf())
        } else {
            Target::Model
        }
    }
}

/// Runs the model and prints `model: input [..] -> output [..] in X ms`.
pub fn run(args: RunArgs) -> Result<()> {
    match Target::of(&args.model.model) {
        Target::Model => run_model(args),
        Target::Onnx(path) => {
            let graph = args.model.import_onnx(&path)?;
            let limits = Limits::from_env().map_err(anyhow::Error::msg)?;
            run_graph(&args, graph, limits)
        }
        Target::Saved(dir) => {
            if args.model.weights.is_some() || args.model.hub {
                bail!(
                    "`{}` is a saved model: it carries its weights (no --weights or --hub)",
                    dir.display()
                );
            }
            let limits = Limits::from_env().map_err(anyhow::Error::msg)?;
            let graph = saved::load_with(&dir, &limits)?;
            run_graph(&args, graph, limits)
        }
        Target::IrText(path) => {
            if args.model.hub {
                bail!("--hub applies to a model name, not to IR text");
            }
            let limits = Limits::from_env().map_err(anyhow::Error::msg)?;
            let mut graph = read_ir(&path, &limits)?;
            match &args.model.weights {
                Some(weights) => saved::attach_weights(&mut graph, weights)?,
                None => {
                    fill_missing_constants(&mut graph, DEFAULT_WEIGHT_SEED, &limits)?;
                }
            }
            graph.verify_with(&limits)?;
            run_graph(&args, graph, limits)
        }
    }
}

/// Parses and verifies IR text from `path` (at most
/// [`saved::MAX_GRAPH_TEXT_BYTES`]).
fn read_ir(path: &Path, limits: &Limits) -> Result<Graph> {
    let bytes = saved::read_graph_text(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let text = String::from_utf8(bytes).with_context(|| format!("`{}` is not UTF-8 text", path.display()))?;
    let graph = Graph::parse(&text).with_context(|| format!("in `{}`", path.display()))?;
    graph.verify_with(limits)?;
    Ok(graph)
}

/// Runs a saved or parsed graph (verified, constants attached) once.
fn run_graph(args: &RunArgs, graph: Graph, limits: Limits) -> Result<()> {
    let device = args.device.open()?;
    let graph = match args.model.batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(batch) if args.input.is_none() => graph.with_batch(batch)?,
        Some(_) => bail!("--batch applies to the generated input; it cannot be combined with --input"),
        None => graph,
    };
    let names: Vec<String> = graph.inputs().iter().map(|&i| graph.node(i).name.clone()).collect();
    let mut graph = graph;
    let inputs = match &args.input {
        Some(path) => {
            let inputs = read_inputs(path, &names, &device)?;
            // One input of another batch size: the graph follows it (an
            // ONNX file or IR text fixes a batch; the input file decides).
            if let ([x], [id]) = (inputs.as_slice(), graph.inputs()) {
                let fact = &graph.node(*id).fact.shape;
                if x.dims().len() == fact.len() && x.dims()[1..] == fact[1..] && x.dims()[0] != fact[0] {
                    graph = graph.with_batch(x.dims()[0])?;
                }
            }
            inputs
        }
        None => graph
            .inputs()
            .iter()
            .map(|&i| {
                let fact = &graph.node(i).fact;
                Ok(random_input(DEFAULT_INPUT_SEED, &fact.shape, &device)?.to_dtype(fact.dtype)?)
            })
            .collect::<Result<_>>()?,
    };
    let name = graph.name().to_string();
    let (graph, _report) = apply_passes(graph, args.optimise.passes, None)?;
    let compiled = Engine::new(device).with_limits(limits).compile(&graph)?;
    let start = Instant::now();
    let outputs = compiled.run(&inputs)?;
    let elapsed = start.elapsed();
    let output = outputs.into_iter().next().context("graph has no output")?;
    if let Some(path) = &args.output {
        write_output(path, &output)?;
    }
    let dims: Vec<&[usize]> = inputs.iter().map(|x| x.dims()).collect();
    println!(
        "graph {name}: input {dims:?} -> output {:?} in {:.3} ms (passes: {}, device: {})",
        output.dims(),
        elapsed.as_secs_f64() * 1e3,
        args.optimise.passes,
        args.device.device
    );
    Ok(())
}

fn write_output(path: &Path, output: &Tensor) -> Result<()> {
    let tensors = HashMap::from([("output".to_string(), output.clone())]);
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write output file `{}`", path.display()))
}

/// Runs a model of the zoo, traced at its input's shape.
fn run_model(args: RunArgs) -> Result<()> {
    let device = args.device.open()?;
    let model = args.model.load(&device)?;
    let name = model.name();
    let x = match &args.input {
        Some(path) => {
            if args.model.batch.is_some() {
                bail!("--batch applies to the generated input; it cannot be combined with --input");
            }
            read_inputs(path, &["input".to_string()], &device)?.remove(0)
        }
        None => random_input(DEFAULT_INPUT_SEED, &name.input_shape(args.model.batch), &device)?,
    };
    model.check_input(x.dims())?;
    let (graph, _report) = apply_passes(model.trace(x.dims())?, args.optimise.passes, None)?;
    let compiled = Engine::new(device).compile(&graph)?;
    let start = Instant::now();
    let outputs = compiled.run(std::slice::from_ref(&x))?;
    let elapsed = start.elapsed();
    let output = outputs.into_iter().next().context("graph has no output")?;
    if let Some(path) = &args.output {
        write_output(path, &output)?;
    }
    let path = compiled.cpu_path().map_or(String::new(), |p| format!(", path: {p}"));
    println!(
        "{name}: input {:?} -> output {:?} in {:.3} ms (passes: {}, device: {}{path})",
        x.dims(),
        output.dims(),
        elapsed.as_secs_f64() * 1e3,
        args.optimise.passes,
        args.device.device
    );
    Ok(())
}
