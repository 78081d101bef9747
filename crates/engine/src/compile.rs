//! [`Engine`]: verifies a graph, lowers each node to a kernel for the
//! device (weights moved or packed once) and plans the run.

use crate::cpu::budget::WeightBudget;
use crate::cpu::PackedCache;
use crate::error::AtNode;
use crate::exec::CompiledModel;
use crate::expansion::{self, Expansions};
use crate::kernel::{plan_cpu_convs, Kernel, Lowering};
use crate::machine::Machine;
use crate::plan::{InputSlot, Plan, Step};
use crate::spin::SpinSwitch;
use crate::tiling::{BatchTiling, TilingSwitch};
use crate::EngineError;
use crate::{CacheSizes, CpuPath};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use wick_ir::{Graph, Limits, NodeId, OpRole};

/// Compiles graphs for one device.
#[derive(Debug, Clone)]
pub struct Engine {
    device: Device,
    /// The CPU kernels' path, when not the best one or `WICK_ISA`'s.
    cpu_path: Option<CpuPath>,
    /// The caches the CPU kernels' blocks are sized for, when not the
    /// detected ones (with `WICK_CACHES`' in their place).
    caches: Option<CacheSizes>,
    /// Size limits every compiled graph is verified against.
    limits: Limits,
    /// How much memory packed conv weights may take, when not
    /// `WICK_WEIGHT_BUDGET`'s or the default.
    weight_budget: Option<WeightBudget>,
    /// Whether CPU forwards may run their leading steps a few images at a
    /// time, when not `WICK_BATCH_TILING`'s or the default (off).
    batch_tiling: Option<bool>,
    /// Whether small CPU forwards keep the pool's other workers spinning
    /// ([`Engine::with_spinning`]), when not `WICK_SPIN`'s or the default (on).
    spinning: Option<bool>,
    /// Whether a CPU 1×1 conv read only by a channel-blocked depthwise
    /// conv runs inside it (on unless switched off).
    expansion_fusion: bool,
}

impl Engine {
    /// An engine for `device`. On the CPU its kernels take the path
    /// `WICK_ISA` names (`avx512`, `avx2` or `scalar`) when set, the best
    /// one the CPU has otherwise.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            cpu_path: None,
            caches: None,
            limits: Limits::default(),
            weight_budget: None,
            batch_tiling: None,
            spinning: None,
            expansion_fusion: true,
        }
    }

    /// The same engine verifying graphs against `limits` instead of
    /// [`Limits::default`]: the largest tensor, and the largest workspace
    /// an op may need (candle's convolutions unfold their input, im2col).
    pub fn with_limits(self, limits: Limits) -> Self {
        Self { limits, ..self }
    }

    /// The same engine packing CPU conv weights within `budget`, whatever
    /// `WICK_WEIGHT_BUDGET` says. Without it, that variable's budget (a
    /// factor or `unlimited`; a typed error at compile when malformed) or
    /// [`WeightBudget::default`]: packed weights at most
    /// [`crate::DEFAULT_WEIGHT_BUDGET`] times the graph's conv weights plus
    /// [`crate::DEFAULT_WEIGHT_ALLOWANCE_MIB`]. Over
    /// budget, the Winograd F(4×4) convs with the fewest tiles per forward
    /// step down to F(2×2), trading some speed for memory;
    /// [`WeightBudget::unlimited`] gives every conv its fastest algorithm.
    pub fn with_weight_budget(self, budget: WeightBudget) -> Self {
        Self {
            weight_budget: Some(budget),
            ..self
        }
    }

    /// The same engine with batch tiling on or off (the default). On, a
    /// CPU forward whose first steps' whole-batch operands and outputs
    /// overflow the cache (a MobileNet's first blocks at batch 10) runs
    /// those steps a few images at a time, as many as stay in cache, and
    /// gathers what they leave for the rest into whole-batch tensors: the
    /// same values and a lower peak of live activations, but each group
    /// reads the steps' weights again and runs smaller products, which
    /// now costs more time than the memory traffic it saves
    /// (the engine's `tiling` module). Off, every step runs on the whole batch.
    /// Without it, `WICK_BATCH_TILING` (`on` or `off`; a typed error at
    /// compile otherwise) or off.
    pub fn with_batch_tiling(self, on: bool) -> Self {
        Self {
            batch_tiling: Some(on),
            ..self
        }
    }

    /// The same engine with spinning on (the default) or off. On, a CPU
    /// forward small enough to run inside rayon's pool keeps the pool's
    /// other workers taking its work until it ends, instead of letting
    /// them sleep between kernels and waking them for the next (5-13%
    /// of the time at batch 1 on a 2-core VM), at the cost of the CPU time
    /// they would have slept through. Without it, `WICK_SPIN` (`on` or
    /// `off`; a typed error at compile otherwise) or on.
    pub fn with_spinning(self, on: bool) -> Self {
        Self {
            spinning: Some(on),
            ..self
        }
    }

    /// The same engine with expansion fusion on (the default) or off. On,
    /// a CPU 1×1 conv (or a conv of at most 64 values per window, a
    /// network's stem) whose only reader is a depthwise conv taking the
    /// channel-blocked form (outputs up to 112 wide on the AVX2 and AVX-512
    /// paths: a MobileNet's or EfficientNet's expansion and the depthwise
    /// conv after it) runs inside that conv as one step, its output
    /// computed band by band in cache and never made whole: the same
    /// values up to f32 rounding, less time and memory. Off, each conv is
    /// its own step (to compare, or to profile the 1×1 conv alone).
    pub fn with_expansion_fusion(self, on: bool) -> Self {
        Self {
            expansion_fusion: on,
            ..self
        }
    }

    /// The size limits compiled graphs are verified against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The same engine with its CPU kernels on `path`, whatever `WICK_ISA`
    /// says: a typed error when the CPU lacks it.
    pub fn with_cpu_path(self, path: CpuPath) -> Result<Self, EngineError> {
        path.isa()?;
        Ok(Self {
            cpu_path: Some(path),
            ..self
        })
    }

    /// The same engine with its CPU kernels' blocks sized for `caches`
    /// instead of the detected caches and `WICK_CACHES`: a typed error when
    /// a size is outside [`crate::L1D_RANGE`], [`crate::L2_RANGE`] or
    /// [`crate::L3_RANGE`] (0 for no L3). Outputs do not depend on it
    /// beyond rounding (the blocks change the order of some sums); speed
    /// does.
    pub fn with_caches(self, caches: CacheSizes) -> Result<Self, EngineError> {
        caches.check()?;
        Ok(Self {
            caches: Some(caches),
            ..self
        })
    }

    /// An engine for the host CPU.
    pub fn cpu() -> Self {
        Self::new(Device::Cpu)
    }

    /// The device compiled models run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Verifies `graph` (against [`Engine::limits`]), moves its constants
    /// to the device, selects a kernel per node and plans when each
    /// intermediate value is freed.
    pub fn compile(&self, graph: &Graph) -> Result<CompiledModel, EngineError> {
        self.compile_sharing(graph, None)
    }

    /// [`Engine::compile`] consuming the graph: each constant's data is
    /// released as soon as the last node using it is lowered (a packed
    /// conv keeps only its packed copy), so the compile's peak memory is
    /// the packed weights plus what is still unpacked, not both in full.
    /// The same result as [`Engine::compile`] on the same graph.
    pub fn compile_owned(&self, mut graph: Graph) -> Result<CompiledModel, EngineError> {
        self.compile_graph(GraphArg::Owned(&mut graph), None)
    }

    /// [`Engine::compile`], taking packed convs and linear layers from
    /// `packed` (and adding to it) when given: the compiles of one graph at
    /// several batch sizes then share their packed weights.
    pub(crate) fn compile_sharing(
        &self,
        graph: &Graph,
        packed: Option<&PackedCache>,
    ) -> Result<CompiledModel, EngineError> {
        self.compile_graph(GraphArg::Borrowed(graph), packed)
    }

    fn compile_graph(&self, mut arg: GraphArg<'_>, packed: Option<&PackedCache>) -> Result<CompiledModel, EngineError> {
        let graph = arg.graph();
        graph.verify_with(&self.limits)?;
        let machine = match self.device.is_cpu() {
            true => Some(Machine::resolve(self.cpu_path, self.caches)?),
            false => None,
        };
        let conv_algorithms = match &machine {
            Some(machine) => {
                let budget = match self.weight_budget {
                    Some(budget) => budget,
                    None => WeightBudget::from_env()?.unwrap_or_default(),
                };
                plan_cpu_convs(graph, budget, machine)
            }
            None => Default::default(),
        };
        let expansions = match machine {
            Some(machine) if self.expansion_fusion => Expansions::find(graph, &conv_algorithms, machine.isa),
            _ => Expansions::default(),
        };
        // The fused 1×1 convs' weights, by the depthwise conv that runs them.
        let mut expanding = HashMap::new();
        // The fused depthwise steps (kernel, name) that run a projection, by projection.
        let mut projecting = HashMap::new();
        let lowering = Lowering {
            device: &self.device,
            machine,
            limits: &self.limits,
            packed,
            conv_algorithms: &conv_algorithms,
        };
        let mut constants = Vec::new();
        let mut steps = Vec::new();
        let mut inputs = Vec::new();
        // For an owned graph: how many users of each constant are still to
        // be lowered, and whether a lowered kernel reads it at run time.
        let mut pending_users: Vec<usize> = graph.users().iter().map(Vec::len).collect();
        let mut read_at_run_time = vec![false; graph.len()];
        for &output in graph.outputs() {
            read_at_run_time[output.index()] = true;
        }
        let ids: Vec<_> = graph.node_ids().collect();
        for id in ids {
            let graph = arg.graph();
            let node = graph.node(id);
            match node.op.role() {
                OpRole::Input => inputs.push(InputSlot {
                    slot: id.index(),
                    name: node.name.clone(),
                    fact: node.fact.clone(),
                }),
                OpRole::Constant => {
                    let data = graph
                        .constant_data(&node.name)
                        .ok_or_else(|| EngineError::MissingConstant {
                            name: node.name.clone(),
                        })?;
                    // Detached: a constant derived from a candle `Var` (candle-nn keeps
                    // batch-norm statistics in Vars) would make every result track
                    // its inputs for backprop and keep the whole forward alive.
                    // An owned graph's constants are taken when no step reads them.
                    if !arg.is_owned() {
                        constants.push((id.index(), data.detach().to_device(&self.device).at(&node.name)?));
                    }
                }
                OpRole::Computed => {
                    if let Some(lanes) = expansions.fused_lanes(id) {
                        // No step: its reader runs it (the weights are
                        // taken now, before an owned graph releases them).
                        expanding.insert(id, expansion::expand_weights(graph, node, lanes).at(&node.name)?);
                    } else {
                        let mut kernel = Kernel::lower(graph, node, &lowering)?;
                        let mut name = node.name.clone();
                        if let Some(producer) = expansions.producer_of(id) {
                            let (expand, x) =
                                lowered_first(&mut expanding, producer, "its fused conv").at(&node.name)?;
                            kernel = expansion::fuse(kernel, expand, x).at(&node.name)?;
                            name = format!("{}+{}", graph.node(producer).name, node.name);
                        }
                        if let Some(depthwise) = expansions.projected_in(id) {
                            let (fused, fused_name) =
                                lowered_first(&mut projecting, depthwise, "the depthwise conv it reads")
                                    .at(&node.name)?;
                            kernel = expansion::project(fused, kernel).at(&node.name)?;
                            name = format!("{fused_name}+{name}");
                        }
                        for slot in kernel.reads() {
                            read_at_run_time[slot] = true;
                        }
                        if expansions.projection_of(id).is_some() {
                            // No step: its projection runs it.
                            projecting.insert(id, (kernel, name));
                        } else {
                            steps.push(Step {
                                name,
                                op: node.op.name(),
                                fact: node.fact.clone(),
                                kernel,
                                output: id.index(),
                                free_after: Vec::new(),
                                recycle_after: Vec::new(),
                                pooled_output: false,
                            });
                        }
                    }
                    release(
                        &mut arg,
                        id,
                        &mut pending_users,
                        &read_at_run_time,
                        &mut constants,
                        &self.device,
                    )?;
                }
            }
        }
        // A fused kernel stashed for a step that never took it would leave
        // its node's value unmade: refused here rather than missed at run time.
        let unrun = expanding.keys().chain(projecting.keys()).min();
        if let Some(&id) = unrun {
            let node = &arg.graph().node(id).name;
            let message = format!("engine invariant broken: `{node}` was lowered for a fused step that never ran it");
            return Err(candle_core::Error::Msg(message)).at(node);
        }
        let graph = arg.graph();
        if arg.is_owned() {
            // Constants no step lowered (graph outputs, say) are still there.
            for id in graph.node_ids() {
                let node = graph.node(id);
                if node.op.role() == OpRole::Constant && read_at_run_time[id.index()] {
                    if let Some(data) = graph.constant_data(&node.name) {
                        constants.push((id.index(), data.detach().to_device(&self.device).at(&node.name)?));
                    }
                }
            }
        }
        // Declaration order of inputs in the signature may differ from node order.
        inputs.sort_by_key(|input| graph.inputs().iter().position(|i| i.index() == input.slot));
        let plan = Plan::new(Plan {
            name: graph.name().to_string(),
            slot_count: graph.len(),
            inputs,
            constants,
            steps,
            outputs: graph.outputs().iter().map(|o| o.index()).collect(),
            output_facts: graph.outputs().iter().map(|&o| graph.node(o).fact.clone()).collect(),
        });
        let tiling_on = match self.batch_tiling {
            Some(on) => on,
            None => TilingSwitch::from_env()?.is_some_and(|s| s.0),
        };
        let tiling = match machine {
            Some(machine) if tiling_on => BatchTiling::of(&plan, machine.cached_bytes()),
            _ => None,
        };
        if let Some(t) = &tiling {
            tracing::debug!(
                graph = graph.name(),
                steps = t.steps,
                images = t.images,
                cached_bytes = machine.map_or(0, |m| m.cached_bytes()),
                "batch tiling: the first steps run a few images at a time"
            );
        }
        let spinning = match self.spinning {
            Some(on) => on,
            None => SpinSwitch::from_env()?.is_none_or(|s| s.0),
        };
        Ok(CompiledModel::new(
            plan,
            self.device.clone(),
            machine.map(|m| m.isa.path()),
            tiling,
            spinning,
        ))
    }
}

/// Takes what lowering stashed for node `id` (`what`: lowered before the
/// node whose step runs it); an error naming it when it is absent.
fn lowered_first<V>(stash: &mut HashMap<NodeId, V>, id: NodeId, what: &str) -> candle_core::Result<V> {
    stash
        .remove(&id)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} was not lowered first")))
}

/// For an owned graph, after lowering node `id`: releases the data of each
/// constant operand no node still to be lowered reads, keeping it (moved
/// to `device`) in `constants` when a lowered kernel reads it at run time.
fn release(
    arg: &mut GraphArg<'_>,
    id: NodeId,
    pending_users: &mut [usize],
    read_at_run_time: &[bool],
    constants: &mut Vec<(usize, Tensor)>,
    device: &Device,
) -> Result<(), EngineError> {
    let GraphArg::Owned(graph) = arg else {
        return Ok(());
    };
    for operand in graph.node(id).inputs.clone() {
        let slot = operand.index();
        pending_users[slot] -= 1;
        if pending_users[slot] > 0 || graph.node(operand).op.role() != OpRole::Constant {
            continue;
        }
        let name = graph.node(operand).name.clone();
        if let Some(data) = graph.take_constant_data(&name) {
            if read_at_run_time[slot] {
                constants.push((slot, data.detach().to_device(device).at(&name)?));
            }
        }
    }
    Ok(())
}

/// The graph a compile works on: borrowed (its constants stay), or owned
/// (each constant's data is released once lowered).
enum GraphArg<'a> {
    Borrowed(&'a Graph),
    Owned(&'a mut Graph),
}

impl GraphArg<'_> {
    fn graph(&self) -> &Graph {
        match self {
            GraphArg::Borrowed(graph) => graph,
            GraphArg::Owned(graph) => graph,
        }
    }

    fn is_owned(&self) -> bool {
        matches!(self, GraphArg::Owned(_))
    }
}
