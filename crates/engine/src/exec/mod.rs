//! [`CompiledModel`]: runs a plan on inputs (checked first), freeing each
//! value after its last use, optionally timing every step, on the caller's
//! thread or inside rayon's pool, its leading steps a few images at a time
//! where the compile tiled them ([`crate::tiling`]).

use crate::cpu::data::with_cpu_f32;
use crate::cpu::output::Output;
use crate::cpu::recycle::{self, BufferPool};
use crate::error::AtNode;
use crate::kernel::Slot;
use crate::plan::{Plan, Step};
use crate::tiling::BatchTiling;
use crate::{CpuPath, EngineError};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wick_ir::TensorFact;

/// Forwards planning at most this many bytes of live activations run inside
/// rayon's pool (see `CompiledModel::execute_scheduled`).
pub const IN_POOL_MAX_ACTIVATION_BYTES: usize = 16 << 20;

/// A graph compiled for one device: immutable, `Send + Sync`, runnable from
/// many threads at once (each run has its own value slots). Clones share
/// the plan and its packed weights.
#[derive(Debug, Clone)]
pub struct CompiledModel {
    plan: Arc<Plan>,
    device: Device,
    /// Decided once at compile time (see `execute_scheduled`).
    run_in_pool: bool,
    /// The CPU kernels' path (`None` off the CPU).
    cpu_path: Option<CpuPath>,
    /// The activation buffers of the last forward, for the next one
    /// (`cpu::recycle`); shared by clones, taken by one forward at a time
    /// (a concurrent one starts with an empty pool).
    buffers: Arc<Mutex<Option<BufferPool>>>,
    /// Most bytes the pool keeps: twice the plan's peak of live activations.
    pool_cap: usize,
    /// Whether the leading steps run a few images at a time (CPU).
    tiling: Option<BatchTiling>,
    /// Whether a forward run in the pool keeps the other workers spinning
    /// (`crate::spin`, [`crate::Engine::with_spinning`]).
    spinning: bool,
}

impl CompiledModel {
    /// The plan: its steps and their kernels (read by tests).
    #[cfg(test)]
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    pub(crate) fn new(
        plan: Plan,
        device: Device,
        cpu_path: Option<CpuPath>,
        tiling: Option<BatchTiling>,
        spinning: bool,
    ) -> Self {
        let peak = plan.peak_activation_bytes();
        let run_in_pool = device.is_cpu() && peak <= IN_POOL_MAX_ACTIVATION_BYTES;
        Self {
            plan: Arc::new(plan),
            device,
            run_in_pool,
            cpu_path,
            buffers: Arc::default(),
            pool_cap: peak.saturating_mul(2),
            tiling,
            spinning,
        }
    }

    /// The misses of the pool kept for the next forward (tests; see
    /// `BufferPool::misses`).
    #[cfg(test)]
    pub(crate) fn pool_misses(&self) -> usize {
        self.buffers.lock().unwrap().as_ref().map_or(0, BufferPool::misses)
    }

    /// How many buffers the pool kept for the next forward holds (tests).
    #[cfg(test)]
    pub(crate) fn pool_len(&self) -> usize {
        self.buffers.lock().unwrap().as_ref().map_or(0, BufferPool::len)
    }

    /// This model with its leading steps tiled as `tiling` says (tests).
    #[cfg(test)]
    pub(crate) fn with_tiling(self, tiling: Option<BatchTiling>) -> Self {
        Self { tiling, ..self }
    }

    /// The instruction-set path its CPU kernels take (`None` off the CPU).
    pub fn cpu_path(&self) -> Option<CpuPath> {
        self.cpu_path
    }

    /// Name of the compiled graph.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Names and facts of the inputs, in order.
    pub fn input_facts(&self) -> impl Iterator<Item = (&str, &TensorFact)> {
        self.plan.inputs.iter().map(|i| (i.name.as_str(), &i.fact))
    }

    /// Facts of the outputs, in order.
    pub fn output_facts(&self) -> &[TensorFact] {
        &self.plan.output_facts
    }

    /// Number of executed steps (nodes other than inputs and constants).
    pub fn step_count(&self) -> usize {
        self.plan.steps.len()
    }

    /// Peak bytes of activations alive at once under this plan (inputs and
    /// intermediates; constants excluded): the engine's own accounting of
    /// what a forward holds, independent of the allocator.
    pub fn planned_peak_activation_bytes(&self) -> usize {
        self.plan.peak_activation_bytes()
    }

    /// Bytes of constant data (weights) held on the device for steps that
    /// read them at run time (weights packed into CPU kernels not included).
    pub fn constant_bytes(&self) -> usize {
        self.plan.constant_bytes()
    }

    /// Runs the model. Every input is checked against its fact before
    /// anything runs; inputs on another device are copied to this one.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        self.execute_scheduled(inputs, None)
    }

    /// Like [`CompiledModel::run`], also timing every step. On asynchronous
    /// devices each step is synchronised, so the times are per step, not overlapped.
    pub fn run_profiled(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Vec<StepProfile>), EngineError> {
        let mut profile = Vec::with_capacity(self.plan.steps.len());
        let outputs = self.execute_scheduled(inputs, Some(&mut profile))?;
        Ok((outputs, profile))
    }

    /// Small forwards (at most [`IN_POOL_MAX_ACTIVATION_BYTES`] of planned
    /// activations, e.g. ResNet18 at batch 1 with 3.8 MiB) run on one of rayon's workers
    /// while the caller waits: each kernel's parallel loop then starts from
    /// inside the pool instead of waking a worker and putting the caller to
    /// sleep, which cost ResNet18 at batch 1 ~20% (22.5 -> 17.8 ms on 2
    /// cores). Large forwards stay on the caller's thread so that their
    /// activations come from the caller's malloc arena: glibc gives each
    /// worker its own, and forwards alternating between two workers' arenas
    /// raised ResNet18's batch-10 peak RSS from 261 to 323 MiB for no speed.
    /// From a thread already in the pool both run in place. A small forward
    /// with spinning on also keeps the pool's other workers taking its
    /// work until it ends (`crate::spin`).
    fn execute_scheduled(
        &self,
        inputs: &[Tensor],
        profile: Option<&mut Vec<StepProfile>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        if self.run_in_pool && self.spinning {
            crate::spin::with_spinners(|| self.execute_pooled(inputs, profile))
        } else if self.run_in_pool {
            rayon::scope(|_| self.execute_pooled(inputs, profile))
        } else {
            self.execute_pooled(inputs, profile)
        }
    }

    /// [`Self::execute`] with the model's buffer pool current on this thread
    /// (CPU only), kept for the next forward.
    fn execute_pooled(
        &self,
        inputs: &[Tensor],
        profile: Option<&mut Vec<StepProfile>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        if !self.device.is_cpu() {
            return self.execute(inputs, profile);
        }
        let pool = self.buffers.lock().ok().and_then(|mut p| p.take());
        let pool = pool.unwrap_or_else(|| BufferPool::new(self.pool_cap));
        let misses = pool.misses();
        let (result, pool) = recycle::with_pool(pool, || self.execute(inputs, profile));
        if pool.misses() > misses {
            // Expected while the pool warms up; on later forwards, a step
            // that drops a buffer it was lent (faults in fresh pages).
            tracing::debug!(
                model = %self.plan.name,
                fresh = pool.misses() - misses,
                "forward allocated activation buffers the pool did not hold"
            );
        }
        if let Ok(mut kept) = self.buffers.lock() {
            kept.get_or_insert(pool);
        }
        result
    }

    fn execute(
        &self,
        inputs: &[Tensor],
        mut profile: Option<&mut Vec<StepProfile>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        let plan = &*self.plan;
        let declared = plan.inputs.iter().map(|i| (i.name.as_str(), &i.fact));
        check_inputs(&plan.name, declared, inputs, None)?;
        let mut slots: Vec<Option<Tensor>> = vec![None; plan.slot_count];
        for (slot, data) in &plan.constants {
            slots[*slot] = Some(data.clone());
        }
        for (given, declared) in inputs.iter().zip(&plan.inputs) {
            slots[declared.slot] = Some(given.detach().to_device(&self.device).at(&declared.name)?);
        }
        let mut first = 0;
        if let Some(tiling) = &self.tiling {
            self.run_tiled(&mut slots, tiling, profile.as_deref_mut())?;
            first = tiling.steps;
        }
        for step in &plan.steps[first..] {
            let elapsed = self.run_step(step, &mut slots, profile.is_some())?;
            if let (Some(profile), Some(elapsed)) = (profile.as_deref_mut(), elapsed) {
                profile.push(StepProfile::of(step, elapsed));
            }
        }
        plan.outputs
            .iter()
            .map(|&slot| {
                slots[slot].clone().ok_or_else(|| EngineError::Candle {
                    node: plan.name.clone(),
                    source: Box::new(candle_core::Error::Msg(
                        "engine invariant broken: output missing".into(),
                    )),
                })
            })
            .collect()
    }

    /// Runs `step` on `slots`: stores its output and frees (or recycles)
    /// the values whose last reader it is. Timed, after a device sync,
    /// when `timed`.
    fn run_step(
        &self,
        step: &Step,
        slots: &mut [Option<Tensor>],
        timed: bool,
    ) -> Result<Option<Duration>, EngineError> {
        let value = |slot: Slot| {
            slots[slot].clone().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "engine invariant broken: slot {slot} freed before its last use"
                ))
            })
        };
        let start = timed.then(Instant::now);
        let output = recycle::drawing(step.pooled_output, || step.kernel.run(value)).at(&step.name)?;
        let elapsed = match start {
            Some(start) => {
                self.device.synchronize().at(&step.name)?;
                Some(start.elapsed())
            }
            None => None,
        };
        slots[step.output] = Some(output);
        for &slot in &step.recycle_after {
            if let Some(value) = slots[slot].take() {
                recycle::reclaim(value);
            }
        }
        for &slot in &step.free_after {
            slots[slot] = None;
        }
        Ok(elapsed)
    }

    /// The first `tiling.steps` steps, `tiling.images` images at a time
    /// (the inputs narrowed to them): the outputs of `tiling.boundary` are
    /// gathered into whole-batch tensors in `slots` (see [`crate::tiling`]).
    fn run_tiled(
        &self,
        slots: &mut [Option<Tensor>],
        tiling: &BatchTiling,
        profile: Option<&mut Vec<StepProfile>>,
    ) -> Result<(), EngineError> {
        let plan = &*self.plan;
        let steps = &plan.steps[..tiling.steps];
        let mut elapsed = vec![Duration::ZERO; steps.len()];
        let mut boundary = Vec::with_capacity(tiling.boundary.len());
        for &index in &tiling.boundary {
            let step = &steps[index];
            // From the pool where the step's own output would be.
            let len = step.fact.shape.iter().product();
            let data = recycle::drawing(step.pooled_output, || Output::new(len, "batch-tiled value"));
            boundary.push(Gathered {
                step,
                data: data.at(&step.name)?,
            });
        }
        for start in (0..tiling.batch).step_by(tiling.images.max(1)) {
            let images = tiling.images.min(tiling.batch - start);
            let mut group = slots.to_vec();
            for input in &plan.inputs {
                if let Some(value) = &slots[input.slot] {
                    group[input.slot] = Some(value.narrow(0, start, images).at(&input.name)?);
                }
            }
            for (step, total) in steps.iter().zip(&mut elapsed) {
                if let Some(e) = self.run_step(step, &mut group, profile.is_some())? {
                    *total += e;
                }
            }
            for gathered in &mut boundary {
                let value = group[gathered.step.output].take();
                gathered.append(value).at(&gathered.step.name)?;
            }
        }
        for gathered in boundary {
            let step = gathered.step;
            slots[step.output] = Some(gathered.finish().at(&step.name)?);
        }
        if let Some(profile) = profile {
            profile.extend(steps.iter().zip(elapsed).map(|(step, e)| StepProfile::of(step, e)));
        }
        Ok(())
    }
}

/// A value of the whole batch gathered from its groups of images, in one
/// buffer (from the forward's pool where its step's output would be).
struct Gathered<'a> {
    /// The tiled step that makes it.
    step: &'a Step,
    /// The whole batch's values so far.
    data: Output,
}

impl Gathered<'_> {
    /// Appends one group's values (a CPU f32 tensor a tiled step made,
    /// held by no one else: its buffer goes back to the pool).
    fn append(&mut self, group: Option<Tensor>) -> candle_core::Result<()> {
        let Some(group) = group else {
            candle_core::bail!("engine invariant broken: a batch-tiled value missing from a group")
        };
        let group = match group.is_contiguous() {
            true => group,
            false => group.contiguous()?,
        };
        let room = self.data.room();
        if group.elem_count() > room {
            candle_core::bail!("engine invariant broken: batch-tiled groups larger than the batch")
        }
        with_cpu_f32("batch-tiled value", &group, None, |values, _| {
            self.data.extend_from_slice(values);
            Ok(())
        })?;
        recycle::reclaim(group);
        Ok(())
    }

    /// The gathered value, once every group is in.
    fn finish(self) -> candle_core::Result<Tensor> {
        self.data.into_tensor(&self.step.fact.shape)
    }
}

/// The one input check of a run: the count, then each input's dtype and
/// shape against its declaration (`declared`, in order), with the first
/// dimension replaced by `batch` when given (a [`crate::BatchedModel`]).
pub(crate) fn check_inputs<'a>(
    graph: &str,
    declared: impl ExactSizeIterator<Item = (&'a str, &'a TensorFact)>,
    inputs: &[Tensor],
    batch: Option<usize>,
) -> Result<(), EngineError> {
    if inputs.len() != declared.len() {
        return Err(EngineError::InputCount {
            graph: graph.to_string(),
            expected: declared.len(),
            got: inputs.len(),
        });
    }
    for (given, (name, fact)) in inputs.iter().zip(declared) {
        // A copy of the declared fact only where the batch replaces its first dimension.
        let expected = match batch {
            Some(batch) if !fact.shape.is_empty() => {
                let mut fact = fact.clone();
                fact.shape[0] = batch;
                Cow::Owned(fact)
            }
            _ => Cow::Borrowed(fact),
        };
        let got = TensorFact::of(given);
        if got != *expected {
            return Err(EngineError::InputMismatch {
                input: name.to_string(),
                expected: expected.into_owned(),
                got,
            });
        }
    }
    Ok(())
}

/// Time spent in one executed node, from [`CompiledModel::run_profiled`].
#[derive(Debug, Clone)]
pub struct StepProfile {
    /// Node name.
    pub name: String,
    /// Op name.
    pub op: &'static str,
    /// Fact of the node's output.
    pub output: TensorFact,
    /// Wall time of the step.
    pub elapsed: std::time::Duration,
}

impl StepProfile {
    /// The profile of `step` run in `elapsed`.
    fn of(step: &Step, elapsed: Duration) -> Self {
        StepProfile {
            name: step.name.clone(),
            op: step.op,
            output: step.fact.clone(),
            elapsed,
        }
    }
}

#[cfg(test)]
mod tests;
