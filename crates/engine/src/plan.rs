//! The execution plan of a compiled graph: the steps in order, the value
//! slots each reads, when each value is freed (right after its last use),
//! and the peak of live activations that gives.

use crate::kernel::{Kernel, Slot};
use candle_core::Tensor;
use wick_ir::TensorFact;

/// A graph input: where its value goes and what it must be.
#[derive(Debug)]
pub(crate) struct InputSlot {
    pub(crate) slot: Slot,
    pub(crate) name: String,
    pub(crate) fact: TensorFact,
}

/// One executed node.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) op: &'static str,
    pub(crate) fact: TensorFact,
    pub(crate) kernel: Kernel,
    pub(crate) output: Slot,
    /// Slots whose last reader is this step (freed after it).
    pub(crate) free_after: Vec<Slot>,
    /// The slots of `free_after` whose storage goes back to the forward's
    /// buffer pool (made and read by CPU kernels only: see `cpu::recycle`).
    pub(crate) recycle_after: Vec<Slot>,
    /// Whether this step's output will go back to the pool, so may be
    /// drawn from it (an output that leaves the forward, or that a candle
    /// op reads, is allocated afresh: a small result never holds a large
    /// pooled buffer).
    pub(crate) pooled_output: bool,
}

/// Everything a run needs besides its inputs; shared by every clone of a
/// compiled model (packed weights are never copied).
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) slot_count: usize,
    pub(crate) inputs: Vec<InputSlot>,
    /// Constants some step reads at run time (packed kernels hold their own).
    pub(crate) constants: Vec<(Slot, Tensor)>,
    pub(crate) steps: Vec<Step>,
    pub(crate) outputs: Vec<Slot>,
    pub(crate) output_facts: Vec<TensorFact>,
}

impl Plan {
    /// Keeps the constants some step or output reads and records, for every
    /// other value, the step after which it is dead (a value nobody reads
    /// dies where it is made; outputs and constants are never freed).
    pub(crate) fn new(mut plan: Plan) -> Plan {
        let count = plan.slot_count;
        let mut read = vec![false; count];
        let mut last_use: Vec<Option<usize>> = vec![None; count];
        for (index, step) in plan.steps.iter().enumerate() {
            last_use[step.output] = Some(index);
            for input in step.kernel.reads() {
                read[input] = true;
                last_use[input] = Some(index);
            }
        }
        for &slot in &plan.outputs {
            read[slot] = true;
        }
        plan.constants.retain(|(slot, _)| read[*slot]);
        let mut pinned = vec![false; count];
        for &slot in plan.outputs.iter().chain(plan.constants.iter().map(|(slot, _)| slot)) {
            pinned[slot] = true;
        }
        // Values a CPU kernel made and only CPU kernels read: their storage
        // is theirs alone (CPU kernels never return a view of an operand).
        let mut own_storage = vec![false; count];
        for step in &plan.steps {
            own_storage[step.output] = matches!(step.kernel, Kernel::Cpu(_));
        }
        for step in &plan.steps {
            if !matches!(step.kernel, Kernel::Cpu(_)) {
                for input in step.kernel.reads() {
                    own_storage[input] = false;
                }
            }
        }
        for (slot, last) in last_use.iter().enumerate() {
            if let (Some(step), false) = (last, pinned[slot]) {
                let step = &mut plan.steps[*step];
                step.free_after.push(slot);
                if own_storage[slot] {
                    step.recycle_after.push(slot);
                }
            }
        }
        for step in &mut plan.steps {
            step.pooled_output = own_storage[step.output] && !pinned[step.output];
        }
        plan
    }

    /// Peak bytes of activations alive at once (inputs and intermediates;
    /// constants excluded).
    pub(crate) fn peak_activation_bytes(&self) -> usize {
        let mut size = vec![0usize; self.slot_count];
        let mut live = 0usize;
        for input in &self.inputs {
            size[input.slot] = input.fact.size_in_bytes();
            live = live.saturating_add(size[input.slot]);
        }
        let mut peak = live;
        for step in &self.steps {
            size[step.output] = step.fact.size_in_bytes();
            live = live.saturating_add(size[step.output]);
            peak = peak.max(live);
            for &slot in &step.free_after {
                live -= size[slot];
            }
        }
        peak
    }

    /// Bytes of constant data held on the device for steps that read it.
    pub(crate) fn constant_bytes(&self) -> usize {
        self.constants
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
