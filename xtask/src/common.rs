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
        let source = match &self.weights {
            Some(path) => WeightSource::File(path.clone()),
            None => WeightSource::Random { seed: DEFAULT_WEIGHT_SEED },
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
