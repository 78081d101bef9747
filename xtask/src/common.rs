//! Options shared by the subcommands: model, weights, batch, passes, device.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use wick_engine::{CompiledModel, Engine};
use wick_ir::Graph;
use wick_models::{Model, ModelName, WeightSource};
use wick_passes::{PassManager, PassReport};

/// Seed of the random weights used when no `--weights` file is given.
pub const DEFAULT_WEIGHT_SEED: u64 = 0;
/// Seed of the random input used when no `--input` file is given.
pub const DEFAULT_INPUT_SEED: u64 = 1;

/// Which pass pipeline to run on the traced graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Passes {
    /// The graph exactly as traced.
    None,
    /// wick's default pipeline.
    Default,
}

impl std::fmt::Display for Passes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Passes::None => "none",
            Passes::Default => "default",
        })
    }
}

/// Model selection and weights.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model name (toy, toy-sequential, resnet18, resnet34, resnet50,
    /// mobilenet-v2, mobilenet-v3-large, efficientnet-b0) or an ONNX file
    /// (`*.onnx`); `run` also takes a directory written by `export`, or a
    /// file of IR text.
    pub model: String,
    /// Safetensors file with PyTorch parameter names; seeded random weights when absent.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Batch size of the generated input (default: the tutorial's).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Classifier outputs (default: the weights' count, 1000 for the
    /// seeded init); weights of another count are refused.
    #[arg(long, value_name = "N")]
    pub num_classes: Option<usize>,
    /// Take the weights from the Hugging Face hub (timm's `resnet18.a1_in1k`,
    /// `resnet34.a1_in1k`, `resnet50.a1_in1k`), local cache first; set
    /// HF_HUB_OFFLINE=1 to never download.
    #[arg(long, conflicts_with = "weights")]
    pub hub: bool,
}

impl ModelArgs {
    /// Parses the model name.
    pub fn name(&self) -> Result<ModelName> {
        Ok(self.model.parse::<ModelName>()?)
    }

    /// The ONNX file named instead of a model, if the argument is one (`*.onnx`).
    pub fn onnx_path(&self) -> Option<&Path> {
        onnx_path(&self.model)
    }

    /// Imports the ONNX file `path` at `--batch` (the file's batch, 1 where
    /// symbolic, without it); the flags that pick weights do not apply.
    pub fn import_onnx(&self, path: &Path) -> Result<Graph> {
        if self.weights.is_some() || self.hub || self.num_classes.is_some() {
            anyhow::bail!(
                "`{}` is an ONNX file: it carries its weights and classes (no --weights, --hub or --num-classes)",
                path.display()
            );
        }
        if self.batch == Some(0) {
            anyhow::bail!("--batch must be at least 1");
        }
        let limits = wick_ir::Limits::from_env().map_err(anyhow::Error::msg)?;
        let options = wick_onnx::ImportOptions {
            batch: self.batch,
            max_elements: limits.max_elements(),
        };
        let graph =
            wick_onnx::import_file(path, &options).with_context(|| format!("importing `{}`", path.display()))?;
        graph.verify_with(&limits)?;
        Ok(graph)
    }

    /// Loads the model onto `device`.
    pub fn load(&self, device: &Device) -> Result<Model> {
        let name = self.name()?;
        if self.batch == Some(0) {
            anyhow::bail!("--batch must be at least 1");
        }
        let source = match (&self.weights, self.hub) {
            (Some(path), _) => WeightSource::File(path.clone()),
            (None, true) => WeightSource::File(wick_models::hub::weights(name, &Default::default())?),
            (None, false) => WeightSource::Random {
                seed: DEFAULT_WEIGHT_SEED,
            },
        };
        Model::load_with_classes(name, source, device, self.num_classes)
            .with_context(|| format!("loading model `{name}`"))
    }
}

/// `--passes` for the commands that execute or save a model: optimised
/// unless `--passes none`, as ONNX Runtime and tract optimise by default.
#[derive(Debug, Args)]
pub struct OptimiseArgs {
    /// Pass pipeline: `default` (wick's fusions) or `none` (the graph as traced).
    #[arg(long, value_enum, default_value_t = Passes::Default)]
    pub passes: Passes,
}

/// `--passes` for the commands that print a graph: as traced unless `--passes default`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Pass pipeline to run before printing: `none` (the graph as traced) or `default`.
    #[arg(long, value_enum, default_value_t = Passes::None)]
    pub passes: Passes,
}

/// `--device` for the commands that execute a model.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    /// Opens the device (a typed error for unknown names or a build without CUDA).
    pub fn open(&self) -> Result<Device> {
        Ok(wick_engine::parse_device(&self.device)?)
    }
}

/// A model traced at its default input shape (batch from `--batch`), run
/// through `passes` and compiled for the device: what `profile` and
/// `throughput` measure.
pub struct CompiledRun {
    /// The model's name, or the ONNX file's path.
    pub name: String,
    /// The input shape traced and compiled for.
    pub shape: Vec<usize>,
    /// The device it runs on.
    pub device: Device,
    /// The compiled model.
    pub compiled: CompiledModel,
}

impl CompiledRun {
    /// Loads, traces, optimises and compiles.
    pub fn new(model: &ModelArgs, passes: Passes, device: &DeviceArgs) -> Result<Self> {
        let device = device.open()?;
        let traced = model.traced(&device, passes, None)?;
        let compiled = Engine::new(device.clone()).compile_owned(traced.graph)?;
        Ok(Self {
            name: traced.name,
            shape: traced.shape,
            device,
            compiled,
        })
    }
}

/// `arg` as an ONNX file, if it names one (`*.onnx`, any case).
pub fn onnx_path(arg: &str) -> Option<&Path> {
    let path = Path::new(arg);
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
        .then_some(path)
}

/// A model traced at its default input shape (batch from `--batch`), or
/// an ONNX file imported, and run through a pass pipeline.
pub struct Traced {
    /// The model's name, or the ONNX file's path.
    pub name: String,
    /// The input shape traced at.
    pub shape: Vec<usize>,
    /// The graph after the passes.
    pub graph: Graph,
    /// The pass report (`None` for `--passes none`).
    pub report: Option<PassReport>,
}

impl ModelArgs {
    /// Loads the model onto `device`, traces it and runs `passes`
    /// (dumping IR into `dump_dir` when given).
    pub fn traced(&self, device: &Device, passes: Passes, dump_dir: Option<&Path>) -> Result<Traced> {
        let (name, graph) = match self.onnx_path() {
            Some(path) => (path.display().to_string(), self.import_onnx(path)?),
            None => {
                let model = self.load(device)?;
                let shape = model.name().input_shape(self.batch);
                (model.name().to_string(), model.trace(&shape)?)
            }
        };
        let shape = match graph.inputs() {
            [input] => graph.node(*input).fact.shape.clone(),
            inputs => anyhow::bail!("`{name}` has {} inputs; wick's commands take one", inputs.len()),
        };
        let (graph, report) = apply_passes(graph, passes, dump_dir)?;
        Ok(Traced {
            name,
            shape,
            graph,
            report,
        })
    }
}

/// Applies the selected pipeline to `graph`; the report is `None` for `--passes none`.
pub fn apply_passes(mut graph: Graph, passes: Passes, dump_dir: Option<&Path>) -> Result<(Graph, Option<PassReport>)> {
    match passes {
        Passes::None => Ok((graph, None)),
        Passes::Default => {
            let mut manager = PassManager::default_pipeline();
            if let Some(dir) = dump_dir {
                manager.dump_ir_to(dir);
            }
            let report = manager.run(&mut graph)?;
            Ok((graph, Some(report)))
        }
    }
}

/// The pass report as the JSON documented in README
/// (`[{"name", "changed", "counters", "nodes_before", "nodes_after"}]`).
pub fn report_json(report: Option<&PassReport>) -> serde_json::Value {
    let runs = report.map(|r| r.runs.as_slice()).unwrap_or_default();
    serde_json::Value::Array(
        runs.iter()
            .map(|run| {
                serde_json::json!({
                    "name": run.name,
                    "changed": run.changed,
                    "counters": run.counters,
                    "nodes_before": run.nodes_before,
                    "nodes_after": run.nodes_after,
                })
            })
            .collect(),
    )
}

/// Output options shared by `graph` and `ir`.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Also print the pass report table after the IR.
    #[arg(long)]
    pub report: bool,
    /// Print only the pass report as JSON (schema in README).
    #[arg(long, conflicts_with = "report")]
    pub json: bool,
    /// Write Graphviz DOT of the final graph to FILE, and an SVG beside it
    /// (FILE with its extension replaced by `.svg`) when Graphviz's `dot` is installed.
    #[arg(long, value_name = "FILE")]
    pub dot: Option<PathBuf>,
    /// Write the IR before and after every pass into DIR (`NNN-<pass>.before.ir` / `.after.ir`).
    #[arg(long, value_name = "DIR")]
    pub dump_ir: Option<PathBuf>,
}

impl OutputArgs {
    /// Prints the graph / report / JSON and writes the DOT file as requested.
    pub fn emit(&self, label: &str, graph: &Graph, report: Option<&PassReport>) -> Result<()> {
        if let Some(path) = &self.dot {
            std::fs::write(path, graph.to_dot()).with_context(|| format!("cannot write `{}`", path.display()))?;
            let svg = path.with_extension("svg");
            match std::process::Command::new("dot")
                .arg("-Tsvg")
                .arg(path)
                .arg("-o")
                .arg(&svg)
                .status()
            {
                Ok(status) if status.success() => eprintln!("wrote {} and {}", path.display(), svg.display()),
                Ok(status) => eprintln!("wrote {}; `dot` failed ({status}), no SVG", path.display()),
                Err(_) => eprintln!("wrote {} (install graphviz for an SVG)", path.display()),
            }
        }
        if self.json {
            let value = serde_json::json!({ "model": label, "passes": report_json(report) });
            return emit(&format!("{}\n", serde_json::to_string_pretty(&value)?));
        }
        emit(&graph.to_string())?;
        if self.report {
            match report {
                Some(report) => emit(&format!("\n{report}"))?,
                None => emit("\n(no passes run: --passes none)\n")?,
            }
        }
        Ok(())
    }
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
