//! Any batch size without re-tracing: a compiled-model cache keyed by
//! batch, least recently used first out, one compile per size however many
//! callers ask for it at once.

use crate::exec::check_inputs;
use crate::{CompiledModel, Engine, EngineError};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wick_ir::Graph;

/// Counters of a [`BatchedModel`]'s compile cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Runs served by an already compiled batch size (including callers
    /// that waited for another's compile of it).
    pub hits: u64,
    /// Runs that found their batch size neither compiled nor compiling.
    pub misses: u64,
    /// Compiles run (one per miss that succeeded or failed).
    pub compiles: u64,
    /// Compiled sizes dropped to make room.
    pub evictions: u64,
    /// Batch sizes compiled and held now.
    pub entries: usize,
}

/// One batch size: its compiled model once ready (the slot's lock is held
/// while it compiles, so a second caller waits for the first's result
/// instead of compiling again), and when it was last used.
#[derive(Debug, Default)]
struct Slot {
    model: Mutex<Option<Arc<CompiledModel>>>,
    last_used: AtomicU64,
}

/// A graph served at any batch size: each new batch size is compiled once
/// (facts re-inferred with [`Graph::with_batch`], weights shared) and kept
/// in a bounded cache; when it is full, the size used least recently is
/// dropped. Concurrent first calls at one size compile it once. Only the
/// first dimension may vary: any other difference from the template's
/// input facts is an [`EngineError::InputMismatch`].
#[derive(Debug)]
pub struct BatchedModel {
    template: Graph,
    engine: Engine,
    capacity: usize,
    slots: Mutex<HashMap<usize, Arc<Slot>>>,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    compiles: AtomicU64,
    evictions: AtomicU64,
    /// The only batch sizes served, when restricted (sorted, distinct).
    allowed: Option<Vec<usize>>,
    /// Packed convs and linear layers shared by every batch size's compile.
    packed: crate::cpu::PackedCache,
}

impl BatchedModel {
    /// Serves `graph` (traced at any batch size) on `engine`'s device,
    /// holding at most `capacity` compiled batch sizes (at least 1).
    pub fn new(engine: Engine, graph: Graph, capacity: usize) -> Result<Self, EngineError> {
        graph.verify_with(engine.limits())?;
        Ok(Self {
            template: graph,
            engine,
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            allowed: None,
            packed: Default::default(),
        })
    }

    /// The same model serving only the batch sizes in `sizes` (any other
    /// is [`EngineError::BatchNotAllowed`]), each compiled now; the cache
    /// grows to hold them all.
    pub fn with_allowed_batches(mut self, sizes: &[usize]) -> Result<Self, EngineError> {
        let mut sizes = sizes.to_vec();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.first().is_none_or(|&s| s == 0) {
            return Err(EngineError::BatchNotAllowed {
                batch: 0,
                allowed: sizes,
            });
        }
        self.capacity = self.capacity.max(sizes.len());
        for &size in &sizes {
            self.compiled(size)?;
        }
        self.allowed = Some(sizes);
        Ok(self)
    }

    /// The batch sizes served, when restricted.
    pub fn allowed_batches(&self) -> Option<&[usize]> {
        self.allowed.as_deref()
    }

    /// Cache counters.
    pub fn stats(&self) -> CacheStats {
        let entries = self
            .slots
            .lock()
            .map(|slots| {
                slots
                    .values()
                    .filter(|s| s.model.try_lock().map(|m| m.is_some()).unwrap_or(false))
                    .count()
            })
            .unwrap_or(0);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries,
        }
    }

    /// The batch size of `inputs` after the one input check (every
    /// dimension but the first as declared; the first equal across inputs
    /// and at least 1).
    fn check(&self, inputs: &[Tensor]) -> Result<usize, EngineError> {
        let batch = inputs.first().and_then(|t| t.dims().first().copied()).unwrap_or(0);
        let declared = self.template.inputs().iter().map(|&id| {
            let node = self.template.node(id);
            (node.name.as_str(), &node.fact)
        });
        check_inputs(self.template.name(), declared, inputs, Some(batch.max(1)))?;
        Ok(batch)
    }

    /// The slot for `batch`, created when absent; marks it used now.
    fn slot(&self, batch: usize) -> Arc<Slot> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = Arc::clone(slots.entry(batch).or_default());
        slot.last_used.store(now, Ordering::Relaxed);
        slot
    }

    /// Drops the least recently used sizes other than `keep` until the
    /// cache holds `capacity` (callers still holding a dropped model keep
    /// it alive until they finish).
    fn evict_beyond_capacity(&self, keep: usize) {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while slots.len() > self.capacity {
            let oldest = slots
                .iter()
                .filter(|(&b, _)| b != keep)
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(&b, _)| b);
            let Some(oldest) = oldest else { break };
            slots.remove(&oldest);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The compiled model for `batch`, compiling it on a miss; callers
    /// arriving while it compiles wait for that compile.
    pub fn compiled(&self, batch: usize) -> Result<Arc<CompiledModel>, EngineError> {
        if let Some(allowed) = &self.allowed {
            if allowed.binary_search(&batch).is_err() {
                return Err(EngineError::BatchNotAllowed {
                    batch,
                    allowed: allowed.clone(),
                });
            }
        }
        let slot = self.slot(batch);
        if let Some(model) = slot.model.try_lock().ok().and_then(|m| m.clone()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(model);
        }
        // Compiled, compiling (wait on the lock), or to compile (hold it).
        let mut model = slot.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(model) = model.as_ref() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(model));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.compiles.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(batch, "compiling a new batch size");
        match self
            .template
            .with_batch(batch)
            .map_err(EngineError::from)
            .and_then(|g| self.engine.compile_sharing(&g, Some(&self.packed)))
        {
            Ok(compiled) => {
                let compiled = Arc::new(compiled);
                *model = Some(Arc::clone(&compiled));
                drop(model);
                self.evict_beyond_capacity(batch);
                Ok(compiled)
            }
            Err(e) => {
                // A size that does not compile (over the limits, say) holds
                // no place in the cache: drop its slot if it is still there.
                drop(model);
                let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if slots.get(&batch).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    slots.remove(&batch);
                }
                Err(e)
            }
        }
    }

    /// Runs on inputs of any batch size (the same for every input).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let batch = self.check(inputs)?;
        self.compiled(batch)?.run(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn model() -> BatchedModel {
        let graph = crate::test_util::graph_with_weights(
            "graph g(%x: f32[1,2,4,4]) {\n  @w = constant : f32[3,2,3,3]\n  %c = conv2d[padding=1](%x, @w) : f32[1,3,4,4]\n  %r = relu(%c) : f32[1,3,4,4]\n  return %r\n}",
        );
        BatchedModel::new(Engine::cpu(), graph, 2).unwrap()
    }

    /// New batch sizes compile once, repeats hit the cache, outputs match a static compile.
    #[test]
    fn caches_per_batch_size() {
        let model = model();
        for batch in [1, 3, 3, 1, 5] {
            let x = Tensor::randn(0f32, 1.0, (batch, 2, 4, 4), &Device::Cpu).unwrap();
            let got = model.run(std::slice::from_ref(&x)).unwrap().remove(0);
            let fixed = Engine::cpu()
                .compile(&model.template.with_batch(batch).unwrap())
                .unwrap();
            let want = fixed.run(&[x]).unwrap().remove(0);
            assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
        }
        // 1, 3 miss; 3, 1 hit; 5 misses and evicts 3, the least recently
        // used (1 was used after it; capacity 2).
        assert_eq!(
            model.stats(),
            CacheStats {
                hits: 2,
                misses: 3,
                compiles: 3,
                evictions: 1,
                entries: 2
            }
        );
        model.compiled(1).unwrap();
        assert_eq!(model.stats().hits, 3, "1 survived: it was used more recently than 3");
        model.compiled(3).unwrap();
        assert_eq!(model.stats().compiles, 4, "3 was the one evicted");
    }

    /// A batch size that does not compile (here: over the element limit)
    /// is an error that evicts nothing.
    #[test]
    fn failed_compiles_take_no_place() {
        let graph = model().template;
        let engine = Engine::cpu().with_limits(wick_ir::Limits::default().with_max_elements(32 * 16));
        let model = BatchedModel::new(engine, graph, 1).unwrap();
        model.compiled(1).unwrap();
        assert!(model.compiled(1000).is_err());
        let stats = model.stats();
        assert_eq!((stats.entries, stats.evictions), (1, 0), "{stats:?}");
        model.compiled(1).unwrap();
        assert_eq!(model.stats().compiles, 2, "batch 1 stayed compiled");
    }

    /// An allow-list compiles its sizes up front and refuses the others.
    #[test]
    fn allowed_batches_are_compiled_up_front() {
        let model = model().with_allowed_batches(&[4, 1, 4]).unwrap();
        assert_eq!(model.allowed_batches(), Some(&[1, 4][..]));
        assert_eq!((model.stats().compiles, model.stats().entries), (2, 2));
        let x = Tensor::zeros((4, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        model.run(&[x]).unwrap();
        assert_eq!(model.stats().compiles, 2);
        let x = Tensor::zeros((3, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = model.run(&[x]).unwrap_err().to_string();
        assert!(
            err.contains("batch size 3 is not served") && err.contains("[1, 4]"),
            "{err}"
        );
        assert!(BatchedModel::new(Engine::cpu(), model.template.clone(), 1)
            .unwrap()
            .with_allowed_batches(&[])
            .is_err());
    }

    /// The packed operand of each of `m`'s CPU steps that `pick` takes
    /// (a conv's, a linear layer's), by address.
    fn packed<T>(m: &CompiledModel, pick: impl Fn(&crate::cpu::CpuKernel) -> Option<&T>) -> Vec<*const T> {
        m.plan()
            .steps
            .iter()
            .filter_map(|s| match &s.kernel {
                crate::kernel::Kernel::Cpu(kernel) => pick(kernel).map(std::ptr::from_ref),
                _ => None,
            })
            .collect()
    }

    /// Batch sizes whose convs take the same algorithm share one packing.
    #[test]
    fn batch_sizes_share_packed_convs() {
        let model = model();
        let (a, b) = (model.compiled(1).unwrap(), model.compiled(2).unwrap());
        let convs = |m: &CompiledModel| {
            packed(m, |k| match k {
                crate::cpu::CpuKernel::Conv { conv, .. } => Some(&**conv),
                _ => None,
            })
        };
        assert_eq!(convs(&a).len(), 1);
        assert_eq!(convs(&a), convs(&b), "one packed conv for both sizes");
        let alone = Engine::cpu().compile(&model.template.with_batch(1).unwrap()).unwrap();
        assert_ne!(convs(&alone), convs(&a), "a plain compile packs its own");
    }

    /// Batch sizes share one packing of a linear layer too, and compute
    /// what a plain compile does.
    #[test]
    fn batch_sizes_share_packed_linears() {
        let graph = crate::test_util::graph_with_weights(
            "graph g(%x: f32[1,2,4,4]) {\n  %p = global_avg_pool2d(%x) : f32[1,2,1,1]\n  %f = flatten[start_dim=1](%p) : f32[1,2]\n  @l = constant : f32[5,2]\n  %y = linear(%f, @l) : f32[1,5]\n  return %y\n}",
        );
        let model = BatchedModel::new(Engine::cpu(), graph, 2).unwrap();
        let (a, b) = (model.compiled(1).unwrap(), model.compiled(3).unwrap());
        let linears = |m: &CompiledModel| {
            packed(m, |k| match k {
                crate::cpu::CpuKernel::Linear { linear, .. } => Some(&**linear),
                _ => None,
            })
        };
        assert_eq!(linears(&a).len(), 1);
        assert_eq!(linears(&a), linears(&b), "one packed linear for both sizes");
        let alone = Engine::cpu().compile(&model.template.with_batch(3).unwrap()).unwrap();
        assert_ne!(linears(&alone), linears(&b), "a plain compile packs its own");
        let x = Tensor::randn(0f32, 1.0, (3, 2, 4, 4), &Device::Cpu).unwrap();
        let got = model.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let fixed = alone.run(std::slice::from_ref(&x)).unwrap().remove(0);
        assert_eq!(crate::test_util::max_abs_diff(&got, &fixed), 0.0);
    }

    /// Many threads asking for one new size at once compile it once.
    #[test]
    fn concurrent_misses_compile_once() {
        let model = Arc::new(model());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let model = Arc::clone(&model);
                std::thread::spawn(move || {
                    let x = Tensor::zeros((4, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
                    model.run(&[x]).unwrap();
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = model.stats();
        assert_eq!((stats.compiles, stats.misses, stats.hits), (1, 1, 7), "{stats:?}");
    }

    /// Only the batch dimension may vary; zero batch and wrong dtype are errors too.
    #[test]
    fn other_dimensions_are_checked() {
        let model = model();
        let wrong = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = model.run(&[wrong]).unwrap_err();
        assert_eq!(err.to_string(), "input `%x` must be f32[2,2,4,4], got f32[2,3,4,4]");
        let empty = Tensor::zeros((0, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(model.run(&[empty]).is_err());
        let f64_input = Tensor::zeros((1, 2, 4, 4), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(
            model.run(&[f64_input]),
            Err(EngineError::InputMismatch { .. })
        ));
        assert_eq!(model.stats().misses, 0);
    }
}
