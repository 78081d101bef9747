//! Saving an optimised graph with its (folded) weights and loading it back
//! without the model code or the passes.
//!
//! A saved model is a directory holding `graph.wick` (the IR text, first
//! line `// wick saved graph, format 1`) and `weights.safetensors` (one
//! tensor per constant, named like the constant).

use crate::EngineError;
use candle_core::{safetensors::Load, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wick_ir::{Graph, Limits, Op};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: &str = "// wick saved graph, format ";
/// File name of the IR text inside a saved-model directory.
pub const GRAPH_FILE: &str = "graph.wick";
/// File name of the weights inside a saved-model directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Errors of saving and loading graphs.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// A file could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The graph file does not start with a known format header.
    #[error("`{path}` is not a wick saved graph of format {FORMAT_VERSION}: {found}")]
    Version {
        /// The file.
        path: PathBuf,
        /// What its first line says.
        found: String,
    },
    /// A graph file larger than [`MAX_GRAPH_TEXT_BYTES`] (refused unread).
    #[error("`{path}` has {size} bytes, more than the {MAX_GRAPH_TEXT_BYTES} a graph file may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The graph text is malformed or fails verification.
    #[error("`{path}`: {source}")]
    Graph {
        /// The file.
        path: PathBuf,
        /// The IR error.
        #[source]
        source: wick_ir::IrError,
    },
    /// The weights file is corrupt or truncated.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        message: String,
    },
    /// A constant of the graph has no tensor in the weights file.
    #[error("constant `@{name}` is missing from `{path}`")]
    MissingWeight {
        /// The constant.
        name: String,
        /// The weights file.
        path: PathBuf,
    },
    /// The weights file has tensors the graph does not use.
    #[error("`{path}` has tensors the graph does not use, e.g. `{name}`")]
    UnexpectedWeight {
        /// One such tensor.
        name: String,
        /// The weights file.
        path: PathBuf,
    },
    /// A constant has no data in the graph being saved.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SavedError + '_ {
    move |source| SavedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `graph` (every constant must carry data) into directory `dir`.
pub fn save(graph: &Graph, dir: &Path) -> Result<(), SavedError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for node in graph.nodes().iter().filter(|n| n.op == Op::Constant) {
        let data = graph
            .constant_data(&node.name)
            .ok_or_else(|| EngineError::MissingConstant {
                name: node.name.clone(),
            })?;
        tensors.insert(
            node.name.clone(),
            data.to_device(&Device::Cpu)
                .and_then(|t| t.contiguous())
                .map_err(|source| EngineError::Candle {
                    node: node.name.clone(),
                    source: Box::new(wick_ir::plain_candle_error(source)),
                })?,
        );
    }
    let weights = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| SavedError::Weights {
        path: weights.clone(),
        message: e.to_string(),
    })?;
    let graph_path = dir.join(GRAPH_FILE);
    std::fs::write(&graph_path, format!("{HEADER}{FORMAT_VERSION}\n{graph}")).map_err(io(&graph_path))
}

/// The largest `graph.wick` [`load`] reads: 64 MiB (ResNet50's is 30 KB).
pub const MAX_GRAPH_TEXT_BYTES: u64 = 64 << 20;

/// The largest safetensors header the format allows (its reader's own bound).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Reads a graph saved by [`save`], with its weights attached and the
/// whole verified against [`Limits::default`].
pub fn load(dir: &Path) -> Result<Graph, SavedError> {
    load_with(dir, &Limits::default())
}

/// [`load`] with the given size limits. The graph's facts are verified
/// against `limits` before any weight is read, so a graph declaring a
/// tensor too large is refused without allocating it.
pub fn load_with(dir: &Path, limits: &Limits) -> Result<Graph, SavedError> {
    let graph_path = dir.join(GRAPH_FILE);
    let text = read_graph_text(&graph_path)?;
    let mut graph = parse_saved(&text, &graph_path, limits)?;
    attach_weights(&mut graph, &dir.join(WEIGHTS_FILE))?;
    graph.verify_with(limits).map_err(|source| SavedError::Graph {
        path: graph_path,
        source,
    })?;
    Ok(graph)
}

/// [`load_with`] on the two files' bytes already in memory (`graph.wick`,
/// then `weights.safetensors`): the same checks, in the same order.
pub fn from_bytes(graph_text: &[u8], weights: &[u8], limits: &Limits) -> Result<Graph, SavedError> {
    let (graph_path, weights_path) = (Path::new(GRAPH_FILE), Path::new(WEIGHTS_FILE));
    if graph_text.len() as u64 > MAX_GRAPH_TEXT_BYTES {
        return Err(too_long(graph_path, graph_text.len() as u64));
    }
    let mut graph = parse_saved(graph_text, graph_path, limits)?;
    check_weights_size(&graph, weights.len() as u64, weights_path)?;
    attach_weight_bytes(&mut graph, weights, weights_path)?;
    graph.verify_with(limits).map_err(|source| SavedError::Graph {
        path: graph_path.to_path_buf(),
        source,
    })?;
    Ok(graph)
}

fn too_long(path: &Path, size: u64) -> SavedError {
    SavedError::TooLarge {
        path: path.to_path_buf(),
        size,
    }
}

/// The bytes of a graph file (`graph.wick` or any IR text), refused by
/// size before it is read when over [`MAX_GRAPH_TEXT_BYTES`].
pub fn read_graph_text(path: &Path) -> Result<Vec<u8>, SavedError> {
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    if size > MAX_GRAPH_TEXT_BYTES {
        return Err(too_long(path, size));
    }
    std::fs::read(path).map_err(io(path))
}

/// The header check, parse and first verification (facts within `limits`
/// before any weight is read) of a saved graph's text.
fn parse_saved(bytes: &[u8], path: &Path, limits: &Limits) -> Result<Graph, SavedError> {
    let text = String::from_utf8_lossy(bytes);
    let first = text.lines().next().unwrap_or_default();
    if first != format!("{HEADER}{FORMAT_VERSION}") {
        let first: String = first.chars().take(80).collect();
        return Err(SavedError::Version {
            path: path.to_path_buf(),
            found: format!("first line `{first}`"),
        });
    }
    let bad_graph = |source| SavedError::Graph {
        path: path.to_path_buf(),
        source,
    };
    let graph = Graph::parse(&text).map_err(bad_graph)?;
    graph.verify_with(limits).map_err(bad_graph)?;
    Ok(graph)
}

/// Gives every constant of `graph` its tensor from the safetensors file
/// `path` (tensors named like the constants). The file may be no larger
/// than the declared constants need (plus a header), each tensor's shape
/// must be the declared one before it is read, and the file may hold no
/// tensor the graph does not use. Verify the graph first: the declared
/// facts bound what is read.
pub fn attach_weights(graph: &mut Graph, path: &Path) -> Result<(), SavedError> {
    check_weights_size(graph, std::fs::metadata(path).map_err(io(path))?.len(), path)?;
    let bytes = std::fs::read(path).map_err(io(path))?;
    attach_weight_bytes(graph, &bytes, path)
}

fn constants(graph: &Graph) -> Vec<(String, wick_ir::TensorFact)> {
    graph
        .nodes()
        .iter()
        .filter(|n| n.op == Op::Constant)
        .map(|n| (n.name.clone(), n.fact.clone()))
        .collect()
}

/// Refuses a weights file of `size` bytes larger than the graph's constants
/// and a safetensors header can take, before it is read.
fn check_weights_size(graph: &Graph, size: u64, path: &Path) -> Result<(), SavedError> {
    let declared = constants(graph)
        .iter()
        .try_fold(8 + MAX_SAFETENSORS_HEADER, |total, (_, fact)| {
            total.checked_add(fact.checked_size_in_bytes()? as u64)
        })
        .unwrap_or(u64::MAX);
    if size > declared {
        return Err(SavedError::Weights {
            path: path.to_path_buf(),
            message: format!("{size} bytes, more than the graph's constants and a header can take ({declared})"),
        });
    }
    Ok(())
}

/// [`attach_weights`] on the file's bytes (`path` names them in errors).
fn attach_weight_bytes(graph: &mut Graph, bytes: &[u8], path: &Path) -> Result<(), SavedError> {
    let constants = constants(graph);
    let corrupt = |message: String| SavedError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    for (name, fact) in &constants {
        let view = file.tensor(name).map_err(|_| SavedError::MissingWeight {
            name: name.clone(),
            path: path.to_path_buf(),
        })?;
        if view.shape() != fact.shape.as_slice() {
            return Err(corrupt(format!(
                "tensor `{name}` has shape {:?}, the graph declares {fact}",
                view.shape()
            )));
        }
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| corrupt(format!("tensor `{name}`: {}", wick_ir::plain_candle_message(e))))?;
        graph
            .set_constant_data(name, tensor)
            .map_err(|source| SavedError::Graph {
                path: path.to_path_buf(),
                source,
            })?;
    }
    if let Some(extra) = file
        .names()
        .into_iter()
        .find(|n| !constants.iter().any(|(c, _)| c == *n))
    {
        return Err(SavedError::UnexpectedWeight {
            name: extra.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Engine;
    use candle_core::DType;

    fn graph() -> Graph {
        crate::test_util::graph_with_weights(
            "graph g(%x: f32[1,2,3,3]) {\n  @w = constant : f32[2,2,1,1]\n  @b = constant : f32[2]\n  %c = conv2d(%x, @w, @b) : f32[1,2,3,3]\n  return %c\n}",
        )
    }

    /// Save then load gives the same text and identical outputs.
    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let original = graph();
        save(&original, dir.path()).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.to_string(), original.to_string());
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 3), &Device::Cpu).unwrap();
        let a = Engine::cpu()
            .compile(&original)
            .unwrap()
            .run(std::slice::from_ref(&x))
            .unwrap();
        let b = Engine::cpu().compile(&loaded).unwrap().run(&[x]).unwrap();
        let diff = crate::test_util::max_abs_diff(&a[0], &b[0]);
        assert_eq!(diff, 0.0);
    }

    /// Wrong version, corrupt or truncated weights, missing or extra tensors are typed errors.
    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        save(&graph(), dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(GRAPH_FILE)).unwrap();
        std::fs::write(dir.path().join(GRAPH_FILE), text.replace("format 1", "format 9")).unwrap();
        assert!(matches!(load(dir.path()), Err(SavedError::Version { .. })));
        std::fs::write(dir.path().join(GRAPH_FILE), &text).unwrap();

        let weights = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), &weights[..weights.len() - 3]).unwrap();
        assert!(matches!(load(dir.path()), Err(SavedError::Weights { .. })));

        let only_w = HashMap::from([(
            "w".to_string(),
            Tensor::zeros((2, 2, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        )]);
        candle_core::safetensors::save(&only_w, dir.path().join(WEIGHTS_FILE)).unwrap();
        assert!(matches!(load(dir.path()), Err(SavedError::MissingWeight { ref name, .. }) if name == "b"));

        let mut extra = only_w.clone();
        extra.insert("b".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
        extra.insert("stray".into(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&extra, dir.path().join(WEIGHTS_FILE)).unwrap();
        assert!(matches!(load(dir.path()), Err(SavedError::UnexpectedWeight { ref name, .. }) if name == "stray"));

        let mut wrong = only_w;
        wrong.insert("b".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&wrong, dir.path().join(WEIGHTS_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("has shape [3], the graph declares f32[2]"),
            "{err}"
        );
    }
}
