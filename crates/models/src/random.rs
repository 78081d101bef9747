//! The deterministic random init shared with `scripts/make_fixtures.py`.
//!
//! Each tensor gets its own SplitMix64 stream seeded with
//! `seed ^ fnv1a64(name)`, so a parameter's values depend only on the seed and
//! its safetensors key, never on load order. The k-th element is
//! `lo + (hi - lo) * u_k` computed in f64 and rounded to f32, where
//! `u_k = (z_k >> 40) / 2^24` and `z_k` is the k-th SplitMix64 output. The
//! Python script implements the same arithmetic with numpy, bit for bit.

use candle_core::{Device, Tensor};

/// FNV-1a 64-bit hash of a tensor name.
pub fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A SplitMix64 generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The stream for tensor `name` under `seed`.
    pub fn for_tensor(seed: u64, name: &str) -> Self {
        Self {
            state: seed ^ fnv1a64(name),
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Next uniform in `[0, 1)` with 24 random bits (exact in f32 and f64).
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 40) as f64 / (1u64 << 24) as f64
    }
}

/// `count` values uniform in `[lo, hi)` for tensor `name`.
pub fn uniform_values(seed: u64, name: &str, count: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut rng = SplitMix64::for_tensor(seed, name);
    (0..count).map(|_| (lo + (hi - lo) * rng.next_unit()) as f32).collect()
}

/// An f32 tensor of `shape` uniform in `[lo, hi)`, deterministic in `(seed, name)`.
pub fn uniform(
    seed: u64,
    name: &str,
    shape: &[usize],
    lo: f64,
    hi: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let count = shape.iter().product();
    Tensor::from_vec(uniform_values(seed, name, count, lo, hi), shape, device)
}

/// Gives every constant of `graph` that has no data a deterministic random
/// tensor (uniform in [-1, 1), or [0.5, 1.5) where it is used as a batch-norm
/// running variance so the graph stays finite). Returns how many were filled.
/// Used to run hand-written IR text, which carries no weights. The graph
/// is verified against `limits` first, so no declared fact larger than the
/// limit is ever allocated.
pub fn fill_missing_constants(
    graph: &mut wick_ir::Graph,
    seed: u64,
    limits: &wick_ir::Limits,
) -> Result<usize, crate::ModelError> {
    use wick_ir::Op;
    // The declared facts size what is allocated: bounded first.
    graph.verify_with(limits)?;
    let mut variance = std::collections::HashSet::new();
    for node in graph.nodes() {
        if let (Op::BatchNorm(_), Some(&var)) = (&node.op, node.inputs.get(2)) {
            variance.insert(var);
        }
    }
    let missing: Vec<(wick_ir::NodeId, String, Vec<usize>)> = graph
        .node_ids()
        .filter_map(|id| {
            let node = graph.node(id);
            (node.op == Op::Constant && graph.constant_data(&node.name).is_none())
                .then(|| (id, node.name.clone(), node.fact.shape.clone()))
        })
        .collect();
    for (id, name, shape) in &missing {
        let (lo, hi) = if variance.contains(id) { (0.5, 1.5) } else { (-1.0, 1.0) };
        let dtype = graph.node(*id).fact.dtype;
        let data = uniform(seed, name, shape, lo, hi, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|source| crate::ModelError::Candle {
                context: name.clone(),
                source: Box::new(wick_ir::plain_candle_error(source)),
            })?;
        graph.set_constant_data(name, data)?;
    }
    Ok(missing.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the generator to published SplitMix64 / FNV-1a values so the
    /// Python twin can be checked against the same numbers.
    #[test]
    fn matches_reference_values() {
        // FNV-1a 64 of "" and "a" (from the FNV reference).
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        // SplitMix64 seeded with 0: first outputs from the reference C code.
        let mut rng = SplitMix64 { state: 0 };
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    /// Values stay inside the requested interval.
    #[test]
    fn uniform_in_range() {
        let v = uniform_values(7, "w", 1000, -0.5, 0.25);
        assert!(v.iter().all(|&x| (-0.5..0.25).contains(&x)));
        assert_ne!(v, uniform_values(8, "w", 1000, -0.5, 0.25));
    }
}
