//! Graphs from fuzz bytes, checked differentially: every byte string
//! becomes a valid graph (convolutions with any groups, kernel, stride,
//! dilation and padding, batch norms, every activation, adds,
//! squeeze-and-excitation's broadcast multiply, channel concats, zero
//! padding, average pools, max pools in floor and ceil mode, a global pool
//! → flatten → linear head), which runs through the default passes on
//! wick's f32 CPU kernels and, as the reference, unfused in f64 on candle's
//! ops. Two scales ([`Scale`]): small graphs for the `graph_diff` fuzz
//! target, models' sizes for `graph_diff_wide`; both targets and their
//! corpus replays call [`check_bytes`].

mod small;
mod wide;

use candle_core::{DType, Tensor};
use wick_engine::{BatchedModel, Engine, EngineError};
use wick_ir::{Graph, NodeId};
use wick_passes::PassManager;

/// How large the graphs drawn from fuzz bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Planes up to 12×12 and up to six input channels, every attribute
    /// drawn per axis: runs take milliseconds (the `graph_diff` target).
    Small,
    /// Channel counts and planes of ResNets' and MobileNets' layers, mostly
    /// their blocks, within a multiply-add budget: the kernel choices only
    /// large convs take (the `graph_diff_wide` target).
    Model,
}

/// A case drawn from fuzz bytes: a valid graph, its input and the engine
/// wick runs it on.
pub struct Case {
    /// The graph, unoptimised.
    pub graph: Graph,
    /// Its one input.
    pub input: Tensor,
    /// The CPU engine that runs the optimised graph (at [`Scale::Model`]
    /// its switches are drawn too).
    pub engine: Engine,
    /// Whether the graph is served through a [`BatchedModel`] (drawn at
    /// [`Scale::Model`]), checked at its batch and at batch 1.
    pub batched: bool,
}

/// The case `data` builds at `scale`.
pub fn case_from_bytes(data: &[u8], scale: Scale) -> Case {
    match scale {
        Scale::Small => small::case_from_bytes(data),
        Scale::Model => wide::case_from_bytes(data),
    }
}

/// Reads small numbers from the fuzz bytes; zeros once they run out.
pub(crate) struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    /// A value in `0..n` (n ≥ 1).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first as usize % n
    }

    /// A coin: whether the next byte is odd.
    pub(crate) fn flag(&mut self) -> bool {
        self.below(2) == 1
    }

    /// Maybe (a coin) one of `values` past the input as a further graph
    /// output, when it is not one already (both generators end so).
    pub(crate) fn extra_output(&mut self, values: &[NodeId], outputs: &mut Vec<NodeId>) {
        if self.flag() && values.len() > 2 {
            let extra = values[1 + self.below(values.len() - 1)];
            if !outputs.contains(&extra) {
                outputs.push(extra);
            }
        }
    }
}

/// The same graph in f64 (facts and constants converted).
fn to_f64(graph: &Graph) -> Graph {
    let mut wide = graph.clone();
    for id in graph.node_ids() {
        wide.node_mut(id).fact.dtype = DType::F64;
        let node = graph.node(id);
        if let Some(data) = graph.constant_data(&node.name) {
            let data = data.to_dtype(DType::F64).expect("cpu conversion");
            wide.set_constant_data(&node.name, data).expect("fact converted above");
        }
    }
    wide
}

/// Builds the case of `data` at `scale`, runs its graph optimised in f32
/// on wick's kernels and unoptimised in f64 on candle's ops, and compares
/// every output within `1e-3 · max(1, |reference|)` (a case served
/// batched: at its batch and at batch 1 on its first image, against the
/// same images' reference). `Ok(false)` when there is no reference
/// (candle's conv takes equal stride and dilation on both axes only); an
/// `Err` names the disagreement or the failure.
pub fn check_bytes(data: &[u8], scale: Scale) -> Result<bool, String> {
    let Case {
        graph,
        input,
        engine,
        batched,
    } = case_from_bytes(data, scale);
    graph.verify().map_err(|e| format!("built graph: {e}"))?;
    let mut optimised = graph.clone();
    PassManager::default_pipeline()
        .run(&mut optimised)
        .map_err(|e| format!("passes: {e}"))?;
    let runs = wick_runs(engine, optimised, &input, batched).map_err(|e| format!("wick f32: {e}\n{graph}"))?;
    let wide = to_f64(&graph);
    let reference = match Engine::cpu().compile(&wide) {
        Err(EngineError::Unsupported { .. }) => return Ok(false),
        other => other.map_err(|e| format!("reference: {e}"))?,
    };
    let want = reference
        .run(&[input.to_dtype(DType::F64).map_err(|e| e.to_string())?])
        .map_err(|e| format!("reference: {e}"))?;
    for got in &runs {
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let images = g.dim(0).map_err(|e| e.to_string())?;
            let w = w.narrow(0, 0, images).map_err(|e| e.to_string())?;
            let g = g.to_dtype(DType::F64).map_err(|e| e.to_string())?;
            let diff = crate::max_abs_diff(&g, &w);
            let scale = crate::max_abs(&w).max(1.0);
            if diff.is_nan() || diff > 1e-3 * scale {
                return Err(format!(
                    "output {k} at batch {images}: wick f32 differs from the f64 reference by {diff:e} (scale \
                     {scale:e})\n{graph}"
                ));
            }
        }
    }
    Ok(true)
}

/// wick's outputs for `input` on the `optimised` graph: one compile, or
/// (`batched`) a [`BatchedModel`] at the input's batch and then, where
/// that is more than one, at batch 1 on the first image (the two compiles
/// sharing packed weights, as a service's do).
fn wick_runs(
    engine: Engine,
    optimised: Graph,
    input: &Tensor,
    batched: bool,
) -> Result<Vec<Vec<Tensor>>, Box<dyn std::error::Error>> {
    if !batched {
        return Ok(vec![engine.compile(&optimised)?.run(std::slice::from_ref(input))?]);
    }
    let model = BatchedModel::new(engine, optimised, 2)?;
    let mut runs = vec![model.run(std::slice::from_ref(input))?];
    if input.dim(0)? > 1 {
        runs.push(model.run(&[input.narrow(0, 0, 1)?])?);
    }
    Ok(runs)
}

/// The op kinds of the graph `data` builds at `scale` (to check the
/// generator's reach).
pub fn op_kinds(data: &[u8], scale: Scale) -> Vec<&'static str> {
    let case = case_from_bytes(data, scale);
    case.graph.nodes().iter().map(|n| n.op.name()).collect()
}

/// `count` byte strings of `len` bytes from a fixed xorshift stream: the
/// generators' reach tests draw from it.
pub fn seeded_strings(count: usize, len: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    (0..count).map(|_| (0..len).map(|_| next()).collect()).collect()
}

#[cfg(test)]
mod tests;
