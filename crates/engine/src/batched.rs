//! Any batch size without re-tracing: a compiled-model cache keyed by batch.

use crate::exec::check_inputs;
use crate::{CompiledModel, Engine, EngineError};
use candle_core::Tensor;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use wick_ir::Graph;

/// Hit/miss counts of a [`BatchedModel`]'s compile cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Runs served by an already compiled batch size.
    pub hits: u64,
    /// Runs that compiled a new batch size.
    pub misses: u64,
    /// Batch sizes compiled and held now.
    pub entries: usize,
}

/// Compiled models by batch size, and the order they were compiled in.
#[derive(Debug, Default)]
struct Cache {
    models: HashMap<usize, Arc<CompiledModel>>,
    order: VecDeque<usize>,
}

/// A graph served at any batch size: each new batch size is compiled once
/// (facts re-inferred with [`Graph::with_batch`], weights shared) and kept
/// in a bounded cache; the least recently compiled size is dropped first.
/// Only the first dimension may vary: any other difference from the
/// template's input facts is an [`EngineError::InputMismatch`].
#[derive(Debug)]
pub struct BatchedModel {
    template: Graph,
    engine: Engine,
    capacity: usize,
    cache: RwLock<Cache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BatchedModel {
    /// Serves `graph` (traced at any batch size) on `engine`'s device,
    /// holding at most `capacity` compiled batch sizes (at least 1).
    pub fn new(engine: Engine, graph: Graph, capacity: usize) -> Result<Self, EngineError> {
        graph.verify()?;
        Ok(Self {
            template: graph,
            engine,
            capacity: capacity.max(1),
            cache: RwLock::new(Cache::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Cache counters.
    pub fn stats(&self) -> CacheStats {
        let entries = self.cache.read().map(|c| c.models.len()).unwrap_or(0);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
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

    /// The compiled model for `batch`, compiling it on a miss.
    pub fn compiled(&self, batch: usize) -> Result<Arc<CompiledModel>, EngineError> {
        if let Some(model) = self.cache.read().ok().and_then(|c| c.models.get(&batch).cloned()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(model);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let model = Arc::new(self.engine.compile(&self.template.with_batch(batch)?)?);
        if let Ok(mut cache) = self.cache.write() {
            let Cache { models, order } = &mut *cache;
            if models.insert(batch, Arc::clone(&model)).is_none() {
                order.push_back(batch);
            }
            while models.len() > self.capacity {
                match order.pop_front() {
                    Some(oldest) => models.remove(&oldest),
                    None => break,
                };
            }
        }
        Ok(model)
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
        // 1, 3 miss; 3, 1 hit; 5 misses and evicts 1 (capacity 2).
        assert_eq!(
            model.stats(),
            CacheStats {
                hits: 2,
                misses: 3,
                entries: 2
            }
        );
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
