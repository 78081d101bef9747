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
mod tests {
    use super::*;
    use crate::cpu::CpuKernel;
    use crate::kernel::Kernel;
    use crate::Engine;
    use candle_core::DType;
    use wick_ir::{Graph, Op};

    /// The CPU conv algorithm chosen for each conv step, by node name.
    /// `name` with seeded random weights, traced at `shape` and through the
    /// default passes.
    fn fused_graph(name: wick_models::ModelName, seed: u64, shape: &[usize]) -> Graph {
        use wick_models::{Model, WeightSource};
        let model = Model::load(name, WeightSource::Random { seed }, &Device::Cpu).unwrap();
        let mut graph = model.trace(shape).unwrap();
        wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
        graph
    }

    fn conv_kernels(model: &CompiledModel) -> Vec<(String, &'static str)> {
        model
            .plan
            .steps
            .iter()
            .filter_map(|step| match &step.kernel {
                Kernel::Cpu(CpuKernel::Conv { conv, .. }) => Some((step.name.clone(), conv.algorithm().name())),
                Kernel::Cpu(CpuKernel::ExpandedDepthwise { .. }) => Some((step.name.clone(), "expanded-depthwise")),
                Kernel::Cpu(CpuKernel::ProjectedDepthwise { .. }) => Some((step.name.clone(), "projected-depthwise")),
                _ => None,
            })
            .collect()
    }

    /// Kernels follow the compiled shape, on every path the machine has:
    /// ResNet18 at batch 1 runs layer4's 3×3 stride-1 convs as F(2×2)
    /// (direct with wide FMAs) and its few-pixel direct convs on the lane
    /// GEMM; at batch 10 the 1×1 stride-2 downsamples use panels and every
    /// 3×3 stride-1 conv is F(4×4), within the default weight budget (2.5×
    /// the conv weights + 48 MiB) too; the 3×3 stride-2 convs (576 deep and
    /// more) take lanes at both batches on the SIMD paths, panels past 256
    /// pixels on the scalar one; a bare 2.5× steps layer4's three, the
    /// fewest tiles, down to F(2×2) (packed weights 3.5× the conv weights
    /// with them, 2.1× without), to the same output within f32 rounding.
    #[test]
    fn conv_kernels_follow_the_compiled_batch() {
        use crate::cpu::gemm::Isa;
        use crate::WeightBudget;
        use wick_models::{Model, ModelName, WeightSource};
        let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 1 }, &Device::Cpu).unwrap();
        let x = wick_models::random_input(5, &ModelName::Resnet18.input_shape(Some(10)), &Device::Cpu).unwrap();
        for isa in Isa::available() {
            let compile = |batch: usize, budget: WeightBudget| {
                let mut graph = model.trace(&ModelName::Resnet18.input_shape(Some(batch))).unwrap();
                wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
                let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
                engine.with_weight_budget(budget).compile(&graph).unwrap()
            };
            let kernels = |batch: usize| conv_kernels(&compile(batch, WeightBudget::default()));
            let count = |ks: &[(String, &str)], kind: &str| ks.iter().filter(|(_, k)| *k == kind).count();
            let simd = isa != Isa::Scalar;
            // The 3×3 stride-2 convs past 256 pixels.
            let deep_strided = match simd {
                true => "direct-lanes",
                false => "direct-panels",
            };
            let one = kernels(1);
            assert_eq!(one.len(), 20, "{one:?}");
            // Where the AVX-512 FMAs are wide, layer4's stride-1 convs run
            // direct rather than F(2×2) (the policy's test covers both).
            let f2 = match crate::machine::Machine::resolve(Some(isa.path()), None)
                .unwrap()
                .wide_fma
            {
                true => "direct-lanes",
                false => "winograd-f2x2",
            };
            for (name, kind) in &one {
                let expected = match name.as_str() {
                    n if n.starts_with("layer4.") && n.contains("conv2") => f2,
                    n if n.starts_with("layer4.1.conv1") => f2,
                    n if n.starts_with("layer4.")
                        || n.starts_with("layer3.0.conv1")
                        || n.starts_with("layer3.0.downsample") =>
                    {
                        "direct-lanes"
                    }
                    n if n.starts_with("conv1") => "stem",
                    n if n.starts_with("layer2.0.conv1") => deep_strided,
                    n if n.contains("downsample") => "direct-panels",
                    _ => "winograd-f4x4",
                };
                assert_eq!(*kind, expected, "{name} at batch 1 on {isa:?}");
            }
            let bare = WeightBudget::factor(crate::DEFAULT_WEIGHT_BUDGET).unwrap();
            let (budgeted, unlimited) = (compile(10, bare), compile(10, WeightBudget::unlimited()));
            let ten = conv_kernels(&budgeted);
            for (name, kind) in &ten {
                let expected = match name.as_str() {
                    n if n.starts_with("conv1") => "stem",
                    n if n.contains("downsample") => "direct-panels",
                    // layer2-4's first convs have stride 2.
                    n if n.contains(".0.conv1") && !n.starts_with("layer1") => deep_strided,
                    n if n.starts_with("layer4.") => "winograd-f2x2",
                    _ => "winograd-f4x4",
                };
                assert_eq!(*kind, expected, "{name} at batch 10 on {isa:?}");
            }
            let all_f4 = conv_kernels(&unlimited);
            let lanes = if simd { 3 } else { 0 };
            assert_eq!(count(&all_f4, "winograd-f4x4"), 13, "{all_f4:?}");
            assert_eq!(count(&all_f4, "direct-panels"), 6 - lanes, "{all_f4:?}");
            assert_eq!(count(&all_f4, "direct-lanes"), lanes, "{all_f4:?}");
            assert_eq!(count(&all_f4, "stem"), 1, "{all_f4:?}");
            assert_eq!(
                kernels(10),
                all_f4,
                "the default budget's allowance holds layer4's F(4×4) on {isa:?}"
            );
            let run = |model: &CompiledModel| model.run(std::slice::from_ref(&x)).unwrap().remove(0);
            let diff = crate::test_util::max_abs_diff(&run(&budgeted), &run(&unlimited));
            assert!(diff < 1e-4, "{isa:?}: {diff}");
        }
    }

    /// MobileNetV2's convs at batch 1: every 1×1 on the in-place GEMM but
    /// the eleven projections on 14×14 and 7×7 planes (192 / 384 / 576 ->
    /// 64 / 96 on 14×14, 576 / 960 -> 160 and 960 -> 320 on 7×7: in two
    /// halves of their depth), none on the lane form, every 3×3
    /// depthwise on the depthwise kernel, the stem on the direct conv; with
    /// expansion fusion (the default) each block's expansion runs inside
    /// its depthwise conv where that takes the channel-blocked form (all
    /// 16 at 224×224 on the SIMD paths: every output up to 112 wide but
    /// the first block's, which has no expansion), as one step named after
    /// both, and so does the stem (a window of 27 values) inside the first
    /// block's depthwise conv, and each in-place projection after such a
    /// pair (features.1-6: the 112×112, 56×56 and 28×28 blocks), to the
    /// same output within f32 rounding.
    #[test]
    fn mobilenet_convs_take_their_kernels() {
        use wick_models::ModelName;
        let name = ModelName::MobilenetV2;
        let graph = fused_graph(name, 1, &name.input_shape(Some(1)));
        let count = |kernels: &[(String, &str)], kind: &str| kernels.iter().filter(|(_, k)| *k == kind).count();
        let x = wick_models::random_input(4, &name.input_shape(Some(1)), &Device::Cpu).unwrap();
        for isa in crate::cpu::gemm::Isa::available() {
            let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
            let (fused, unfused) = (
                engine.clone().compile(&graph).unwrap(),
                engine.with_expansion_fusion(false).compile(&graph).unwrap(),
            );
            let kernels = conv_kernels(&unfused);
            let kinds = [
                "pointwise",
                "pointwise-lanes",
                "pointwise-split",
                "depthwise",
                "direct-panels",
                "expanded-depthwise",
                "projected-depthwise",
            ];
            let counts = kinds.map(|k| count(&kernels, k));
            assert_eq!(
                [counts.as_slice(), &[kernels.len()]].concat(),
                [23, 0, 11, 17, 1, 0, 0, 52],
                "{kernels:?}"
            );
            let kernels = conv_kernels(&fused);
            let counts = kinds.map(|k| count(&kernels, k));
            let blocked = matches!(isa, crate::cpu::gemm::Isa::Avx512 | crate::cpu::gemm::Isa::Avx2Fma);
            // Blocked: the stem and the expansions run in their depthwise
            // convs, and the in-place projections after features.1-6's in
            // them too.
            let want = match blocked {
                true => [1, 0, 11, 0, 0, 11, 6, 29],
                false => [23, 0, 11, 17, 1, 0, 0, 52],
            };
            assert_eq!(
                [counts.as_slice(), &[kernels.len()]].concat(),
                want,
                "{isa:?} {kernels:?}"
            );
            if blocked {
                let pair = "features.7.conv.0.0+1+relu6+features.7.conv.1.0+1+relu6";
                assert!(kernels.contains(&(pair.into(), "expanded-depthwise")), "{kernels:?}");
                let head = "features.0.0+1+relu6+features.1.conv.0.0+1+relu6+features.1.conv.1+2";
                assert!(kernels.contains(&(head.into(), "projected-depthwise")), "{kernels:?}");
                let block = "features.3.conv.0.0+1+relu6+features.3.conv.1.0+1+relu6+features.3.conv.2+3+add";
                assert!(kernels.contains(&(block.into(), "projected-depthwise")), "{kernels:?}");
                // The expanded tensors are never made.
                assert!(fused.planned_peak_activation_bytes() < unfused.planned_peak_activation_bytes());
            }
            let run = |model: &CompiledModel| model.run(std::slice::from_ref(&x)).unwrap().remove(0);
            let (a, b) = (run(&fused), run(&unfused));
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let diff = crate::test_util::max_abs_diff(&a, &b);
            assert!(diff <= 1e-5 * scale.max(1.0), "{isa:?}: diff {diff} at scale {scale}");
        }
    }

    /// MobileNetV2 at batch 2 on two threads, where the projections of
    /// features.1-6 run inside their blocks' steps band by band (at batch 1
    /// those steps run the two convs in turn): the unfused output within
    /// f32 rounding, on every path.
    #[test]
    fn mobilenet_projections_in_their_blocks_match() {
        use wick_models::ModelName;
        let name = ModelName::MobilenetV2;
        let shape = [2, 3, 224, 224];
        let graph = fused_graph(name, 2, &shape);
        let x = wick_models::random_input(5, &shape, &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in crate::cpu::gemm::Isa::available() {
            let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
            let (fused, unfused) = (
                engine.clone().compile(&graph).unwrap(),
                engine.with_expansion_fusion(false).compile(&graph).unwrap(),
            );
            let run = |model: &CompiledModel| pool.install(|| model.run(std::slice::from_ref(&x)).unwrap().remove(0));
            let (a, b) = (run(&fused), run(&unfused));
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let diff = crate::test_util::max_abs_diff(&a, &b);
            assert!(diff <= 1e-5 * scale.max(1.0), "{isa:?}: diff {diff} at scale {scale}");
        }
    }

    /// Compiling an owned graph gives the same model as compiling a
    /// borrowed one (bit for bit), also when constants are read at run
    /// time (the unfused graph's batch norms, the linear layer) or are a
    /// graph output.
    #[test]
    fn compile_owned_equals_compile() {
        use wick_models::{Model, ModelName, WeightSource};
        let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 2 }, &Device::Cpu).unwrap();
        let x = wick_models::random_input(4, &[1, 3, 64, 64], &Device::Cpu).unwrap();
        let traced = model.trace(x.dims()).unwrap();
        let mut fused = traced.clone();
        wick_passes::PassManager::default_pipeline().run(&mut fused).unwrap();
        for graph in [traced, fused] {
            let want = Engine::cpu()
                .compile(&graph)
                .unwrap()
                .run(std::slice::from_ref(&x))
                .unwrap();
            let got = Engine::cpu()
                .compile_owned(graph)
                .unwrap()
                .run(std::slice::from_ref(&x))
                .unwrap();
            assert_eq!(want[0].to_vec2::<f32>().unwrap(), got[0].to_vec2::<f32>().unwrap());
        }
        let mut graph = Graph::new("constant-out");
        let input = graph.add_input("x", TensorFact::new(DType::F32, [2])).unwrap();
        let c = graph
            .add_constant("c", Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        let sum = graph.add_node("sum", Op::Add, &[input, c]).unwrap();
        graph.set_outputs(vec![sum, c]);
        let x = Tensor::new(&[10f32, 20.0], &Device::Cpu).unwrap();
        let out = Engine::cpu().compile_owned(graph).unwrap().run(&[x]).unwrap();
        assert_eq!(out[0].to_vec1::<f32>().unwrap(), [11.0, 22.0]);
        assert_eq!(out[1].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    }

    /// A fused conv's input scale on both families of kernels: wick's CPU
    /// conv (f32; a 1×1 and a 3×3 one) and candle's ops (f64, and f32 with
    /// a weight that is an input, not a constant) equal the conv of the
    /// input multiplied by the scale.
    #[test]
    fn fused_conv_input_scale_on_every_kernel() {
        let d = Device::Cpu;
        for (dtype, constant_weight, kernel) in [
            (DType::F32, true, 1),
            (DType::F32, true, 3),
            (DType::F64, true, 3),
            (DType::F32, false, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = Tensor::randn(0f32, 1.0, (2, 5, 1, 1), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f32, 1.0, (4, 5, kernel, kernel), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, 4, &d).unwrap().to_dtype(dtype).unwrap();
            let mut graph = Graph::new("scaled");
            let fact = |t: &Tensor| TensorFact::new(dtype, t.dims().to_vec());
            let xi = graph.add_input("x", fact(&x)).unwrap();
            let si = graph.add_input("s", fact(&s)).unwrap();
            let wi = match constant_weight {
                true => graph.add_constant("w", w.clone()).unwrap(),
                false => graph.add_input("w", fact(&w)).unwrap(),
            };
            let bi = graph.add_constant("b", b.clone()).unwrap();
            let attrs = wick_ir::FusedConv2dAttrs {
                conv: wick_ir::Conv2dAttrs {
                    padding: [kernel / 2; 2],
                    ..Default::default()
                },
                input_scale: true,
                ..Default::default()
            };
            let y = graph.add_node("y", Op::FusedConv2d(attrs), &[xi, wi, bi, si]).unwrap();
            graph.set_outputs(vec![y]);
            let mut inputs = vec![x.clone(), s.clone()];
            if !constant_weight {
                inputs.push(w.clone());
            }
            let got = Engine::cpu().compile(&graph).unwrap().run(&inputs).unwrap().remove(0);
            let want = x
                .broadcast_mul(&s)
                .unwrap()
                .conv2d(&w, kernel / 2, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-4,
                "{dtype:?} constant weight {constant_weight} {kernel}x{kernel}: {diff}"
            );
        }
    }

    fn assert_send_sync<T: Send + Sync>() {}

    /// A compiled model can be shared across threads.
    #[test]
    fn compiled_model_is_send_and_sync() {
        assert_send_sync::<CompiledModel>();
    }

    /// Every path this CPU has compiles ResNet-like convs (Winograd, direct,
    /// pooled) to the same output within f32 rounding, and reports its path.
    #[test]
    fn every_cpu_path_gives_the_same_output() {
        use crate::CpuPath;
        use wick_models::ModelName;
        let graph = fused_graph(ModelName::Resnet18, 3, &[1, 3, 64, 64]);
        let x = wick_models::random_input(4, &[1, 3, 64, 64], &Device::Cpu).unwrap();
        let run = |path: CpuPath| {
            let compiled = Engine::cpu().with_cpu_path(path).unwrap().compile(&graph).unwrap();
            assert_eq!(compiled.cpu_path(), Some(path));
            compiled.run(std::slice::from_ref(&x)).unwrap().remove(0)
        };
        let scalar = run(CpuPath::Scalar);
        for path in CpuPath::available() {
            let diff = crate::test_util::max_abs_diff(&run(path), &scalar);
            assert!(diff < 1e-4, "{path}: {diff}");
        }
    }

    /// Blocks sized for the smallest caches wick accepts, the fallback and
    /// the largest give the same output within f32 rounding (ResNet18's
    /// Winograd, direct and pooled convs; MobileNetV2's blocked depthwise
    /// convs with their expansions), on every path; out-of-range caches are
    /// a typed error before anything is compiled.
    #[test]
    fn every_cache_size_gives_the_same_output() {
        use crate::{CacheSizes, CpuPath};
        use wick_models::ModelName;
        let sizes = [
            CacheSizes::given(4 << 10, 64 << 10, 0).unwrap(),
            CacheSizes::FALLBACK,
            CacheSizes::given(1 << 20, 256 << 20, 16 << 30).unwrap(),
        ];
        for (name, shape) in [
            (ModelName::Resnet18, [1, 3, 64, 64]),
            (ModelName::MobilenetV2, [2, 3, 64, 64]),
        ] {
            let graph = fused_graph(name, 3, &shape);
            let x = wick_models::random_input(4, &shape, &Device::Cpu).unwrap();
            for path in CpuPath::available() {
                let run = |caches: CacheSizes| {
                    let engine = Engine::cpu().with_cpu_path(path).unwrap().with_caches(caches).unwrap();
                    engine
                        .compile(&graph)
                        .unwrap()
                        .run(std::slice::from_ref(&x))
                        .unwrap()
                        .remove(0)
                };
                let reference = run(CacheSizes::detect());
                for caches in sizes {
                    let diff = crate::test_util::max_abs_diff(&run(caches), &reference);
                    assert!(diff < 1e-4, "{name} {path} {caches:?}: {diff}");
                }
            }
        }
        let too_small = CacheSizes {
            l2: 1 << 10,
            ..CacheSizes::FALLBACK
        };
        let err = Engine::cpu().with_caches(too_small).unwrap_err();
        assert!(
            matches!(err, EngineError::InvalidCacheSize { level: "l2", .. }),
            "{err}"
        );
    }

    /// Buffers recycled across steps and forwards never reach the caller:
    /// outputs held from one forward keep their values through the next
    /// ones, and forwards on a warm pool equal those of a fresh model bit
    /// for bit. Only values CPU kernels made and only CPU kernels read are
    /// recycled, and no step whose output leaves the forward draws.
    #[test]
    fn recycled_buffers_never_reach_the_caller() {
        use crate::kernel::Kernel;
        use wick_models::ModelName;
        let name = ModelName::MobilenetV2;
        let graph = fused_graph(name, 3, &[2, 3, 64, 64]);
        let compiled = Engine::cpu().compile(&graph).unwrap();
        let plan = &compiled.plan;
        let made_by_cpu: Vec<usize> = plan
            .steps
            .iter()
            .filter(|s| matches!(s.kernel, Kernel::Cpu(_)))
            .map(|s| s.output)
            .collect();
        let read_by_candle: Vec<usize> = plan
            .steps
            .iter()
            .filter(|s| matches!(s.kernel, Kernel::Candle(_)))
            .flat_map(|s| s.kernel.reads())
            .collect();
        let recycled: Vec<usize> = plan.steps.iter().flat_map(|s| s.recycle_after.clone()).collect();
        assert!(recycled.len() > 20, "{recycled:?}");
        for slot in &recycled {
            assert!(
                made_by_cpu.contains(slot) && !read_by_candle.contains(slot) && !plan.outputs.contains(slot),
                "slot {slot}: made by {:?}",
                plan.steps.iter().find(|s| s.output == *slot).map(|s| &s.name)
            );
        }
        assert!(plan
            .steps
            .iter()
            .all(|s| !s.pooled_output || !plan.outputs.contains(&s.output)));
        let input = |seed| wick_models::random_input(seed, &[2, 3, 64, 64], &Device::Cpu).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let first = compiled.run(&[input(1)]).unwrap().remove(0);
        let kept = values(&first);
        let second = compiled.run(&[input(2)]).unwrap().remove(0);
        let again = compiled.run(&[input(1)]).unwrap().remove(0);
        assert_eq!(values(&first), kept, "a held output was overwritten");
        assert_eq!(values(&again), kept);
        let fresh = Engine::cpu().compile(&graph).unwrap();
        assert_eq!(values(&fresh.run(&[input(2)]).unwrap()[0]), values(&second));
    }

    /// A warm forward lends every large output from the pool and gets each
    /// buffer back: none is lost to a step's intermediate. MobileNetV3-Large
    /// scales the input of its squeeze-and-excitation 1×1 convs on 7×7
    /// planes (run on the lane layout) into a value of its own, which used
    /// to take a pooled buffer and drop it: three buffers lost a forward,
    /// and at batch 10 ~1500 page faults a forward for the ones allocated
    /// in their place.
    #[test]
    fn warm_forwards_lose_no_pooled_buffer() {
        use wick_models::ModelName;
        let name = ModelName::MobilenetV3Large;
        let shape = [2, 3, 224, 224];
        let graph = fused_graph(name, 3, &shape);
        let compiled = Engine::cpu().compile(&graph).unwrap();
        let x = wick_models::random_input(1, &shape, &Device::Cpu).unwrap();
        for _ in 0..2 {
            compiled.run(std::slice::from_ref(&x)).unwrap();
        }
        let warm = compiled.pool_misses();
        for _ in 0..2 {
            compiled.run(std::slice::from_ref(&x)).unwrap();
        }
        assert_eq!(compiled.pool_misses(), warm, "warm forwards allocated afresh");
    }

    /// Warm forwards give the pool back what they took and nothing more:
    /// MobileNetV3-Large's squeeze convs and classifiers, whose outputs
    /// came from the heap, added a buffer each to the pool every forward
    /// (`recycle::MAX_BUFFERS`).
    #[test]
    fn warm_forwards_keep_the_pool_size() {
        use wick_models::ModelName;
        let shape = [1, 3, 224, 224];
        let graph = fused_graph(ModelName::MobilenetV3Large, 3, &shape);
        let compiled = Engine::cpu().compile(&graph).unwrap();
        let x = wick_models::random_input(1, &shape, &Device::Cpu).unwrap();
        for _ in 0..2 {
            compiled.run(std::slice::from_ref(&x)).unwrap();
        }
        let warm = compiled.pool_len();
        for _ in 0..3 {
            compiled.run(std::slice::from_ref(&x)).unwrap();
        }
        assert!(warm > 0);
        assert_eq!(compiled.pool_len(), warm, "the pool grew over warm forwards");
    }

    /// A small forward computes the same values with the pool's workers
    /// spinning as without, also with many forwards of it at once from
    /// inside the pool, each handing out spinners.
    #[test]
    fn spinning_changes_no_value() {
        use rayon::prelude::*;
        use wick_models::ModelName;
        let shape = [1, 3, 64, 64];
        let graph = fused_graph(ModelName::Resnet18, 5, &shape);
        let spinning = Engine::cpu().with_spinning(true).compile(&graph).unwrap();
        let still = Engine::cpu().with_spinning(false).compile(&graph).unwrap();
        assert!(spinning.run_in_pool && spinning.spinning && !still.spinning);
        let x = wick_models::random_input(2, &shape, &Device::Cpu).unwrap();
        let want = still
            .run(std::slice::from_ref(&x))
            .unwrap()
            .remove(0)
            .to_vec2::<f32>()
            .unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let outputs: Vec<_> = pool.install(|| {
            (0..6)
                .into_par_iter()
                .map(|_| spinning.run(std::slice::from_ref(&x)).unwrap().remove(0))
                .collect()
        });
        for y in outputs {
            assert_eq!(y.to_vec2::<f32>().unwrap(), want);
        }
    }

    /// Clones share the plan (and so the packed weights) instead of copying it.
    #[test]
    fn clones_share_the_plan() {
        let model = Engine::cpu().compile(&small_graph()).unwrap();
        let clone = model.clone();
        assert!(Arc::ptr_eq(&model.plan, &clone.plan));
    }

    fn small_graph() -> Graph {
        let mut graph = Graph::parse(
            "graph g(%x: f32[1,2,3,3]) {
  @w = constant : f32[2,2,1,1]
  %c = conv2d(%x, @w) : f32[1,2,3,3]
  %r = relu(%c) : f32[1,2,3,3]
  %a = add(%r, %c) : f32[1,2,3,3]
  return %a
}",
        )
        .unwrap();
        let w = Tensor::new(&[1f32, 0., 0., -1.], &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 1, 1))
            .unwrap();
        graph.set_constant_data("w", w).unwrap();
        graph
    }

    /// Values are freed after their last use, never before, and outputs are kept.
    #[test]
    fn frees_after_last_use() {
        let model = Engine::cpu().compile(&small_graph()).unwrap();
        let frees: Vec<Vec<usize>> = model.plan.steps.iter().map(|s| s.free_after.clone()).collect();
        // slots: 0=x, 1=w, 2=c, 3=r, 4=a. x dies after conv; c and r after add; w (constant) and a (output) never.
        assert_eq!(frees, vec![vec![0], vec![], vec![2, 3]]);
        let x = Tensor::arange(0f32, 18., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3, 3))
            .unwrap();
        let out = model.run(std::slice::from_ref(&x)).unwrap();
        // channel 0 = relu(x0) + x0 = 2*x0 (x0 >= 0); channel 1 = relu(-x1) - x1 = -x1.
        let expected = Tensor::cat(
            &[
                (x.narrow(1, 0, 1).unwrap() * 2.0).unwrap(),
                x.narrow(1, 1, 1).unwrap().neg().unwrap(),
            ],
            1,
        )
        .unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&out[0], &expected), 0.0);
        // x (72 B) dies after the conv; the peak is c, r and a together at the add.
        assert_eq!(model.planned_peak_activation_bytes(), 3 * 72);
        let (profiled, steps) = model.run_profiled(std::slice::from_ref(&x)).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.op).collect::<Vec<_>>(),
            ["conv2d", "relu", "add"]
        );
        assert_eq!(crate::test_util::max_abs_diff(&profiled[0], &out[0]), 0.0);
    }

    /// A fused conv (with residual, ReLU and pool) whose weights arrive at
    /// run time takes candle's conv, the one-pass epilogue op and candle's
    /// pool (the CUDA path's kernels); it equals wick's CPU conv with the
    /// fused pool compiled from the same values as constants.
    #[test]
    fn runtime_weight_fused_conv_matches_packed() {
        let text = |params: &str, operands: &str| {
            format!(
                "graph g(%x: f32[2,3,5,5]{params}, %r: f32[2,4,5,5]) {{
{}  %y = fused_conv2d[padding=1, relu=1, pool_kernel=3, pool_stride=2, pool_padding=1](%x, {operands}, %r) : f32[2,4,3,3]
  return %y
}}",
                if params.is_empty() {
                    "  @w = constant : f32[4,3,3,3]\n  @b = constant : f32[4]\n"
                } else {
                    ""
                }
            )
        };
        let d = Device::Cpu;
        let (x, w, b, r) = (
            Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &d).unwrap(),
            Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &d).unwrap(),
            Tensor::randn(0f32, 1.0, 4, &d).unwrap(),
            Tensor::randn(0f32, 1.0, (2, 4, 5, 5), &d).unwrap(),
        );
        let runtime = Graph::parse(&text(", %w: f32[4,3,3,3], %b: f32[4]", "%w, %b")).unwrap();
        let got = Engine::cpu()
            .compile(&runtime)
            .unwrap()
            .run(&[x.clone(), w.clone(), b.clone(), r.clone()])
            .unwrap();
        let mut constant = Graph::parse(&text("", "@w, @b")).unwrap();
        constant.set_constant_data("w", w).unwrap();
        constant.set_constant_data("b", b).unwrap();
        let want = Engine::cpu().compile(&constant).unwrap().run(&[x, r]).unwrap();
        assert!(crate::test_util::max_abs_diff(&got[0], &want[0]) < 1e-5);
    }

    /// Wrong input shape, dtype or count is a typed error naming the input and both facts.
    #[test]
    fn inputs_are_checked() {
        let model = Engine::cpu().compile(&small_graph()).unwrap();
        let wrong_shape = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = model.run(&[wrong_shape]).unwrap_err();
        assert_eq!(err.to_string(), "input `%x` must be f32[1,2,3,3], got f32[1,2,3,4]");
        let wrong_dtype = Tensor::zeros((1, 2, 3, 3), DType::F64, &Device::Cpu).unwrap();
        let err = model.run(&[wrong_dtype]).unwrap_err();
        assert_eq!(err.to_string(), "input `%x` must be f32[1,2,3,3], got f64[1,2,3,3]");
        assert!(matches!(
            model.run(&[]),
            Err(EngineError::InputCount {
                expected: 1,
                got: 0,
                ..
            })
        ));
    }

    /// A graph whose constants have no data cannot be compiled.
    #[test]
    fn missing_constant_data_is_an_error() {
        let graph = Graph::parse(
            "graph g(%x: f32[2]) {\n  @b = constant : f32[2]\n  %y = add(%x, @b) : f32[2]\n  return %y\n}",
        )
        .unwrap();
        let err = Engine::cpu().compile(&graph).unwrap_err();
        assert!(
            matches!(err, EngineError::MissingConstant { ref name } if name == "b"),
            "{err}"
        );
    }

    /// Per-axis stride runs on the CPU f32 kernel; elsewhere (here f64, which
    /// only candle's conv serves) it is rejected at compile time, not mid-run.
    #[test]
    fn unequal_stride_needs_the_packed_kernel() {
        let text = |dtype: &str| {
            format!(
                "graph g(%x: {dtype}[1,1,4,4]) {{\n  @w = constant : {dtype}[1,1,1,1]\n  %y = conv2d[stride=[1,2]](%x, @w) : {dtype}[1,1,4,2]\n  return %y\n}}"
            )
        };
        let mut graph = Graph::parse(&text("f32")).unwrap();
        graph
            .set_constant_data("w", Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = Engine::cpu().compile(&graph).unwrap().run(&[x]).unwrap().remove(0);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 4., 6., 8., 10., 12., 14.]
        );
        let mut graph = Graph::parse(&text("f64")).unwrap();
        graph
            .set_constant_data("w", Tensor::ones((1, 1, 1, 1), DType::F64, &Device::Cpu).unwrap())
            .unwrap();
        let err = Engine::cpu().compile(&graph).unwrap_err();
        assert!(matches!(err, EngineError::Unsupported { .. }), "{err}");
    }
}
