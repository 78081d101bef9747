//! Batch tiling: the leading steps of a CPU forward whose whole-batch
//! operands and output overflow the cache run a few images at a time, and
//! the values they leave for the rest of the forward are gathered into
//! whole-batch tensors.
//!
//! A MobileNet's first layers make the largest activations of the forward
//! (96 × 112 × 112 values an image in MobileNetV2): at batch 10 each step
//! writes tens of MB that its reader then fetches back from memory, where
//! one image's stay in cache from one step to the next. Every CPU kernel
//! treats the images of a batch independently (convolutions, pools,
//! activations, per-image channel scales, linear layers over the last
//! dimension), so running them image by image computes the same values.
//!
//! Groups take as many images as keep the largest tiled step within half
//! the cache budget (one or two images for the MobileNets' and
//! EfficientNet's first blocks). Batch 10 on Zen 4 (2 threads), `bench`
//! medians of four alternating runs, tiled / untiled (`WICK_BATCH_TILING`):
//! MobileNetV2 40.1-42.2 / 44.2-46.3 ms, peak RSS 57 / 137 MiB;
//! EfficientNet-B0 69.7-71.5 / 69.6-73.6 ms, 71 / 148 MiB;
//! MobileNetV3-Large 34.3-35.4 / 33.4-34.3 and in another series 34.2-35.3
//! / 33.9-35.3 ms, 89 / 107 MiB; ResNet50 364-394 / 367-388 ms, 283 / 349
//! MiB. The gain is where the whole-batch working sets are several times
//! the cache (MobileNetV2's 96 and 144 channels at 112² and 56²); tiling
//! only MobileNetV2's steps over twice the budget gave no speed.
//!
//! Off by default since the forty-first session: with the expansion 1×1
//! convs run inside their depthwise convs and the largest outputs streamed
//! past the caches, the MobileNets' first blocks no longer write the
//! activations tiling kept in cache, and what tiling costs stayed: each
//! group reads the tiled steps' weights again (ResNet50 at batch 10 tiled
//! through layer3 in groups of one image: its 34 MB of weights up to there
//! read ten times) and runs products a tenth as wide. Zen 4, 2 threads,
//! `xtask compare --b-batch-tiling off` (forwards alternating in one
//! process), untiled over tiled: batch 10 ResNet50 0.93-0.95× the time
//! (four runs; AVX2 forced 0.99×), MobileNetV2 0.95× (AVX2 0.935×),
//! EfficientNet-B0 0.975×, ResNet34 1.006×, ResNet18 0.99×,
//! MobileNetV3-Large 0.996×; batch 32 ResNet50 0.80×, EfficientNet-B0
//! 0.915×, MobileNetV2 1.00×. Peak RSS untiled at batch 10 (`bench`):
//! ResNet50 317 MiB (242 tiled), MobileNetV2 69 (57), EfficientNet-B0 102
//! (68), the others alike; ONNX Runtime's 395, 242 and 333 MiB.

use crate::kernel::Kernel;
use crate::plan::Plan;
use crate::EngineError;
use candle_core::DType;
use std::str::FromStr;
use wick_ir::TensorFact;

/// The environment variable that turns batch tiling `on` or `off` (the
/// default) where the engine was not told ([`crate::Engine::with_batch_tiling`]).
pub const BATCH_TILING_ENV: &str = "WICK_BATCH_TILING";

/// Whether batch tiling is on, as `WICK_BATCH_TILING` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TilingSwitch(pub(crate) bool);

impl TilingSwitch {
    /// The switch `WICK_BATCH_TILING` sets, if it is set: a typed error
    /// for anything but `on` or `off`.
    pub(crate) fn from_env() -> Result<Option<Self>, EngineError> {
        crate::machine::parse_env(BATCH_TILING_ENV)
    }
}

impl FromStr for TilingSwitch {
    type Err = EngineError;

    fn from_str(given: &str) -> Result<Self, EngineError> {
        crate::machine::on_off(given)
            .map(Self)
            .ok_or_else(|| EngineError::InvalidBatchTiling { given: given.into() })
    }
}

/// How a forward's leading steps run: `images` at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchTiling {
    /// How many of the plan's first steps run per group of images.
    pub(crate) steps: usize,
    /// Images per group: fewer than the batch.
    pub(crate) images: usize,
    /// The batch the plan was compiled for.
    pub(crate) batch: usize,
    /// The tiled steps whose outputs outlive them (read by a later step or
    /// a graph output), by index: what each group leaves to gather.
    pub(crate) boundary: Vec<usize>,
}

impl BatchTiling {
    /// The first `steps` steps of `plan` in groups of `images` of the
    /// batch `plan` was compiled for, with the steps whose outputs outlive
    /// them (none of the tiled steps frees them).
    pub(crate) fn new(plan: &Plan, steps: usize, images: usize) -> Self {
        let tiled = &plan.steps[..steps];
        let freed: Vec<usize> = tiled.iter().flat_map(|s| s.free_after.iter().copied()).collect();
        Self {
            steps,
            images,
            batch: batch_of(plan).unwrap_or(0),
            boundary: (0..steps).filter(|&i| !freed.contains(&tiled[i].output)).collect(),
        }
    }

    /// The tiling of `plan` for a cache that keeps `cached_bytes` between
    /// steps, if any: the leading run of CPU steps whose operands and
    /// outputs all have the batch as their first dimension (f32), up to the
    /// last of them whose operands and output take more than `cached_bytes`
    /// at the whole batch; groups of as many images as keep the largest
    /// step of the run within half of `cached_bytes`. `None` when no step
    /// overflows the cache, or a group would be the whole batch.
    pub(crate) fn of(plan: &Plan, cached_bytes: usize) -> Option<Self> {
        let batch = batch_of(plan)?;
        let mut facts: Vec<Option<&TensorFact>> = vec![None; plan.slot_count];
        for input in &plan.inputs {
            facts[input.slot] = Some(&input.fact);
        }
        // Bytes of each separable step's operands and output.
        let mut sizes = Vec::new();
        for step in &plan.steps {
            let operands: Option<Vec<&TensorFact>> = step.kernel.reads().iter().map(|&slot| facts[slot]).collect();
            let separable = matches!(step.kernel, Kernel::Cpu(_))
                && operands
                    .as_ref()
                    .is_some_and(|ops| ops.iter().chain([&&step.fact]).all(|f| per_image(f, batch)));
            if !separable {
                break;
            }
            facts[step.output] = Some(&step.fact);
            let bytes = operands
                .into_iter()
                .flatten()
                .chain([&step.fact])
                .map(TensorFact::size_in_bytes)
                .fold(0usize, usize::saturating_add);
            sizes.push(bytes);
        }
        let steps = sizes.iter().rposition(|&bytes| bytes > cached_bytes)? + 1;
        let largest = sizes[..steps].iter().copied().max().unwrap_or(0);
        let per_image = largest.div_ceil(batch).max(1);
        let images = (cached_bytes / 2 / per_image).max(1);
        (images < batch).then(|| BatchTiling::new(plan, steps, images))
    }
}

/// The first dimension every input of `plan` shares, when there are
/// inputs, each has one and it is at least 2.
fn batch_of(plan: &Plan) -> Option<usize> {
    let mut dims = plan.inputs.iter().map(|i| i.fact.shape.first().copied());
    let first = dims.next()??;
    (first >= 2 && dims.all(|d| d == Some(first))).then_some(first)
}

/// Whether `fact` is an f32 value with `batch` images along its first dimension.
fn per_image(fact: &TensorFact, batch: usize) -> bool {
    fact.dtype == DType::F32 && fact.shape.first() == Some(&batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Engine;
    use candle_core::{Device, Tensor};
    use wick_models::{Model, ModelName, WeightSource};

    /// MobileNetV2 at `batch`, default passes, random weights, compiled
    /// untiled; and an input.
    fn mobilenet(batch: usize) -> (crate::CompiledModel, Tensor) {
        let model = Model::load(ModelName::MobilenetV2, WeightSource::Random { seed: 3 }, &Device::Cpu).unwrap();
        let shape = ModelName::MobilenetV2.input_shape(Some(batch));
        let mut graph = model.trace(&shape).unwrap();
        wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
        let compiled = Engine::cpu().with_batch_tiling(false).compile(&graph).unwrap();
        let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        (compiled, x)
    }

    /// The tiled steps are the leading CPU steps up to the last whose
    /// whole-batch operands overflow the budget, in groups that keep the
    /// largest within half of it; no tiling at batch 1, with a budget no
    /// step overflows, or when one group would hold the whole batch.
    #[test]
    fn tiles_the_steps_that_overflow() {
        let (model, _) = mobilenet(3);
        let plan = model.plan();
        let bytes = |step: &crate::plan::Step| -> usize {
            let values: usize = step
                .kernel
                .reads()
                .iter()
                .map(|&slot| {
                    plan.steps
                        .iter()
                        .find(|s| s.output == slot)
                        .map_or(3 * 3 * 224 * 224, |s| s.fact.shape.iter().product())
                })
                .sum();
            (values + step.fact.shape.iter().product::<usize>()) * 4
        };
        // The first step (the stem: 3 × 224² in, 32 × 112² out) overflows 4 MiB at batch 3.
        let budget = 4 << 20;
        let tiling = BatchTiling::of(plan, budget).expect("tiled");
        let last = tiling.steps - 1;
        assert!(bytes(&plan.steps[last]) > budget);
        assert!(
            plan.steps[tiling.steps..].iter().all(|s| bytes(s) <= budget),
            "a later step overflows"
        );
        let largest = plan.steps[..tiling.steps].iter().map(bytes).max().unwrap();
        assert_eq!(tiling.images, (budget / 2 / largest.div_ceil(3)).max(1));
        assert!(tiling.images < 3);
        assert_eq!(BatchTiling::of(plan, usize::MAX), None, "nothing overflows");
        // Every step overflows one byte: all up to the first that is not a
        // CPU kernel (the flatten before the classifier).
        let cpu = plan
            .steps
            .iter()
            .take_while(|s| matches!(s.kernel, Kernel::Cpu(_)))
            .count();
        assert!(cpu < plan.steps.len());
        assert_eq!(BatchTiling::of(plan, 1), Some(BatchTiling::new(plan, cpu, 1)));
        let (one, _) = mobilenet(1);
        assert_eq!(BatchTiling::of(one.plan(), 1), None, "batch 1");
    }

    /// `on` and `off` parse; anything else is a typed error naming it.
    #[test]
    fn switch_parses() {
        assert_eq!("on".parse::<TilingSwitch>().unwrap(), TilingSwitch(true));
        assert_eq!(" off".parse::<TilingSwitch>().unwrap(), TilingSwitch(false));
        for bad in ["", "yes", "0", "On"] {
            let err = bad.parse::<TilingSwitch>().unwrap_err();
            assert!(
                matches!(&err, EngineError::InvalidBatchTiling { given } if given == bad)
                    && err.to_string().contains(BATCH_TILING_ENV),
                "{bad:?}: {err}"
            );
        }
    }

    /// Tiled forwards give the untiled one's output (each image's values
    /// are computed alike whatever the group) in groups of 1 and 2 images
    /// of 3, up to a few steps, inside a residual block (two values to
    /// gather) and through every step that may be tiled; the profile has
    /// every step once.
    #[test]
    fn tiled_forwards_match() {
        let (model, x) = mobilenet(3);
        let want = model.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let steps = BatchTiling::of(model.plan(), 1).unwrap().steps;
        // A cut inside an inverted residual block: its input and the
        // block's last output so far both outlive the tiled steps.
        let inside = (1..steps)
            .find(|&k| BatchTiling::new(model.plan(), k, 1).boundary.len() >= 2)
            .expect("a cut two values cross");
        for (tiled, images) in [(4, 1), (11, 2), (inside, 2), (steps, 1), (steps - 1, 2)] {
            let tiling = BatchTiling::new(model.plan(), tiled, images);
            let model = model.clone().with_tiling(Some(tiling.clone()));
            let got = model.run(std::slice::from_ref(&x)).unwrap().remove(0);
            assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(diff <= 1e-5, "{tiling:?}: {diff}");
            let (outputs, profile) = model.run_profiled(std::slice::from_ref(&x)).unwrap();
            assert!(crate::test_util::max_abs_diff(&outputs[0], &want) <= 1e-5);
            let names: Vec<&str> = profile.iter().map(|p| p.name.as_str()).collect();
            let plan_names: Vec<&str> = model.plan().steps.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, plan_names, "{tiling:?}");
        }
    }
}
