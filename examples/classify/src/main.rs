//! Classify one image with ResNet18:
//!
//! ```sh
//! cargo run --release -p wick-classify -- cat.jpg [resnet18.safetensors | --hub]
//! ```
//!
//! Without weights it uses wick's seeded random init (the classes are then
//! meaningless, but every step runs); `--hub` takes timm's ImageNet weights
//! from the Hugging Face cache (downloading them when allowed).

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use std::path::PathBuf;
use wick_engine::Engine;
use wick_models::{hub, Model, ModelName, WeightSource};
use wick_passes::PassManager;

/// Classify one PNG or JPEG image with ResNet18 and print the top 5 classes.
#[derive(Debug, Parser)]
#[command(name = "wick-classify", version)]
struct Args {
    /// The image (PNG or JPEG).
    image: PathBuf,
    /// ResNet18 weights (safetensors, PyTorch names); wick's seeded random init when absent.
    weights: Option<PathBuf>,
    /// Take timm's ImageNet weights from the Hugging Face cache (downloading them when allowed).
    #[arg(long, conflicts_with = "weights")]
    hub: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let source = match (args.weights, args.hub) {
        (_, true) => WeightSource::File(hub::resnet18_weights(&Default::default())?),
        (Some(path), false) => WeightSource::File(path),
        (None, false) => WeightSource::Random { seed: 0 },
    };
    let image = args.image.display().to_string();
    // 1. load, 2. trace at the input shape, 3. optimise, 4. compile, 5. run.
    let model = Model::load(ModelName::Resnet18, source, &Device::Cpu)?;
    let mut graph = model.trace(&[1, 3, 224, 224])?;
    let report = PassManager::default_pipeline().run(&mut graph)?;
    let compiled = Engine::cpu().compile(&graph)?;
    let bytes = std::fs::read(&args.image).with_context(|| format!("cannot read `{image}`"))?;
    let x = wick_serve::preprocess(&bytes).map_err(anyhow::Error::msg)?;
    let logits = compiled.run(&[x])?.remove(0);
    eprint!("{report}");
    for prediction in &wick_serve::top_classes(&logits, 5).map_err(anyhow::Error::msg)?[0] {
        println!(
            "class {:>4}  probability {:.4}",
            prediction["class"],
            prediction["score"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
