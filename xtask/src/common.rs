//! Options shared by the subcommands: model, weights, batch, passes, device.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use wick_ir::Graph;
use wick_models::{Model, ModelName, WeightSource};

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
    /// Model name: toy, toy-sequential or resnet18.
    pub model: String,
    /// Safetensors file with PyTorch parameter names; seeded random weights when absent.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Batch size of the generated input (default: the tutorial's).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Pass pipeline.
    #[arg(long, value_enum, default_value_t = Passes::None)]
    pub passes: Passes,
    /// Take resnet18's weights from the Hugging Face hub (`timm/resnet18.a1_in1k`),
    /// local cache first; set HF_HUB_OFFLINE=1 to never download.
    #[arg(long, conflicts_with = "weights")]
    pub hub: bool,
}

impl ModelArgs {
    /// Parses the model name.
    pub fn name(&self) -> Result<ModelName> {
        Ok(self.model.parse::<ModelName>()?)
    }

    /// Loads the model onto `device`.
    pub fn load(&self, device: &Device) -> Result<Model> {
        let name = self.name()?;
        if self.batch == Some(0) {
            anyhow::bail!("--batch must be at least 1");
        }
        let source = match (&self.weights, self.hub) {
            (Some(path), _) => WeightSource::File(path.clone()),
            (None, true) if name == ModelName::Resnet18 => {
                WeightSource::File(wick_models::hub::resnet18_weights(&Default::default())?)
            }
            (None, true) => anyhow::bail!("--hub is only available for resnet18"),
            (None, false) => WeightSource::Random {
                seed: DEFAULT_WEIGHT_SEED,
            },
        };
        Model::load(name, source, device).with_context(|| format!("loading model `{name}`"))
    }
}

/// Applies the selected pipeline to `graph`.
pub fn apply_passes(graph: Graph, passes: Passes) -> Result<Graph> {
    match passes {
        Passes::None => Ok(graph),
        Passes::Default => Ok(graph),
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
