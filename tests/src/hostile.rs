//! The hostile-input harness: runs IR text or a saved directory from
//! outside through everything a user can reach (parse, verify, the default
//! passes, compile, run on seeded inputs) and reports how it ended. Used by
//! the committed hostile corpus (`fixtures/hostile/`), its CLI twin and the
//! fuzz targets' replay test; a panic is never an acceptable ending, so
//! callers assert [`Ending::Panic`] does not occur.

use candle_core::{Device, Tensor};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use wick_engine::{saved, Engine};
use wick_ir::{Graph, Limits};
use wick_models::random::fill_missing_constants;
use wick_passes::PassManager;

/// How one hostile input ended.
#[derive(Debug)]
pub enum Ending {
    /// It ran: the output shapes.
    Ran(Vec<Vec<usize>>),
    /// A typed error, as its message.
    Error(String),
    /// A panic, with its message: always a bug.
    Panic(String),
}

/// A safetensors file of one f32 tensor `name` of `shape` with no data
/// behind it: for a shape with a zero-sized axis, one the format accepts
/// (no values, no bytes) whose strides may still overflow.
pub fn dataless_safetensors(name: &str, shape: &[u64]) -> Vec<u8> {
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,0]}}}}"#);
    (header.len() as u64)
        .to_le_bytes()
        .into_iter()
        .chain(header.into_bytes())
        .collect()
}

/// Runs `f`, turning a panic into [`Ending::Panic`].
pub fn guarded(f: impl FnOnce() -> Result<Vec<Tensor>, String>) -> Ending {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(outputs)) => Ending::Ran(outputs.iter().map(|t| t.dims().to_vec()).collect()),
        Ok(Err(message)) => Ending::Error(message),
        Err(payload) => Ending::Panic(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into()),
        ),
    }
}

/// Parses, verifies (against `limits`), fills constants with seeded data,
/// runs the default passes, compiles and runs IR text on the CPU.
pub fn run_ir_text(text: &str, limits: &Limits) -> Ending {
    guarded(|| ir_text_pipeline(text, limits))
}

/// [`run_ir_text`] without the panic guard (for fuzz targets, where a
/// panic must reach the fuzzer).
pub fn ir_text_pipeline(text: &str, limits: &Limits) -> Result<Vec<Tensor>, String> {
    let mut graph = Graph::parse(text).map_err(|e| e.to_string())?;
    graph.verify_with(limits).map_err(|e| e.to_string())?;
    fill_missing_constants(&mut graph, 0, limits).map_err(|e| e.to_string())?;
    run_graph(graph, limits)
}

/// Loads a saved directory (against `limits`), runs the default passes,
/// compiles and runs it on the CPU.
pub fn run_saved(dir: &Path, limits: &Limits) -> Ending {
    guarded(|| {
        let graph = saved::load_with(dir, limits).map_err(|e| e.to_string())?;
        run_graph(graph, limits)
    })
}

/// A saved model from one byte string (a fuzz input): the first 4 bytes
/// (little-endian, modulo what follows) say how many of the rest are
/// `graph.wick`; the remainder is `weights.safetensors`.
pub fn split_saved(data: &[u8]) -> (&[u8], &[u8]) {
    let (head, rest) = data.split_at(data.len().min(4));
    let mut len = [0u8; 4];
    len[..head.len()].copy_from_slice(head);
    let cut = (u32::from_le_bytes(len) as usize) % (rest.len() + 1);
    rest.split_at(cut)
}

/// [`saved::from_bytes`] on [`split_saved`]'s two parts, then the passes,
/// compile and run: what `wick-serve --saved` does with a directory.
pub fn saved_bytes_pipeline(data: &[u8], limits: &Limits) -> Result<Vec<Tensor>, String> {
    let (text, weights) = split_saved(data);
    let graph = saved::from_bytes(text, weights, limits).map_err(|e| e.to_string())?;
    run_graph(graph, limits)
}

/// Bytes as an ONNX model (`wick_onnx::import_bytes`, constants and inputs
/// within `limits`), then verified, optimised, compiled and run.
pub fn onnx_bytes_pipeline(data: &[u8], limits: &Limits) -> Result<Vec<Tensor>, String> {
    let options = wick_onnx::ImportOptions {
        batch: None,
        max_elements: limits.max_elements(),
    };
    let graph = wick_onnx::import_bytes(data, &options).map_err(|e| e.to_string())?;
    graph.verify_with(limits).map_err(|e| e.to_string())?;
    run_graph(graph, limits)
}

/// Safetensors bytes as toy-sequential's weights (the loader checks names,
/// shapes and dtypes), then the model traced, optimised, compiled and run.
pub fn weights_pipeline(bytes: &[u8]) -> Result<Vec<Tensor>, String> {
    use wick_models::{Model, ModelName, WeightSource};
    let name = ModelName::ToySequential;
    let model =
        Model::load(name, WeightSource::Safetensors(bytes.to_vec()), &Device::Cpu).map_err(|e| e.to_string())?;
    let graph = model.trace(&name.input_shape(Some(1))).map_err(|e| e.to_string())?;
    run_graph(graph, &Limits::default())
}

fn run_graph(mut graph: Graph, limits: &Limits) -> Result<Vec<Tensor>, String> {
    PassManager::default_pipeline()
        .run(&mut graph)
        .map_err(|e| e.to_string())?;
    let compiled = Engine::cpu()
        .with_limits(*limits)
        .compile(&graph)
        .map_err(|e| e.to_string())?;
    let inputs = graph
        .inputs()
        .iter()
        .map(|&i| {
            let fact = &graph.node(i).fact;
            wick_models::random_input(1, &fact.shape, &Device::Cpu)
                .map_err(|e| e.to_string())?
                .to_dtype(fact.dtype)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    compiled.run(&inputs).map_err(|e| e.to_string())
}

/// One committed hostile graph: its file and the error text it must end in.
#[derive(Debug)]
pub struct HostileCase {
    /// The `.wick` file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// What its error message must contain (its first line,
    /// `// expect: ...`).
    pub expect: String,
}

/// The committed hostile graphs, `fixtures/hostile/*.wick`, in name order.
pub fn hostile_cases() -> Vec<HostileCase> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wick"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("// expect: "))
                .unwrap_or_else(|| panic!("{}: first line must be `// expect: ...`", path.display()))
                .to_string();
            HostileCase { path, text, expect }
        })
        .collect()
}
