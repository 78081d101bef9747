//! A probe of the CPU's fp32 FMA peak per instruction-set path: independent
//! accumulator chains, enough of them to cover the FMA latency, nothing
//! loaded from memory. The roofline the kernels are measured against.

use super::gemm::Isa;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Multiply-adds per call of a path's inner loop body, per lane.
const STEPS: usize = 1 << 16;

/// fp32 FLOP/s of `isa` on one thread, over about `duration`.
pub(crate) fn fma_peak(isa: Isa, duration: Duration) -> f64 {
    let start = Instant::now();
    let mut flops = 0f64;
    while start.elapsed() < duration {
        flops += match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only handed out when the CPU has AVX-512F.
            Isa::Avx512 => unsafe { x86::avx512(STEPS) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 + FMA.
            Isa::Avx2Fma => unsafe { x86::avx2(STEPS) },
            _ => scalar(STEPS),
        };
    }
    flops / start.elapsed().as_secs_f64()
}

/// Eight independent chains of scalar multiply-adds (the compiler's own code).
fn scalar(steps: usize) -> f64 {
    let mut acc = black_box([1f32; 8]);
    let (a, b) = black_box((0.999_999f32, 1e-7f32));
    for _ in 0..steps {
        for acc in acc.iter_mut() {
            *acc = *acc * a + b;
        }
    }
    black_box(acc);
    (steps * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// 24 chains of 16-lane FMAs (of AVX-512's 32 registers).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(steps: usize) -> f64 {
        let (a, b) = (_mm512_set1_ps(black_box(0.999_999)), _mm512_set1_ps(black_box(1e-7)));
        let mut acc = [_mm512_set1_ps(black_box(1.0)); 24];
        for _ in 0..steps {
            for acc in acc.iter_mut() {
                *acc = _mm512_fmadd_ps(*acc, a, b);
            }
        }
        black_box(acc);
        (steps * 24 * 16 * 2) as f64
    }

    /// 12 chains of 8-lane FMAs (of AVX2's 16 registers).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(steps: usize) -> f64 {
        let (a, b) = (_mm256_set1_ps(black_box(0.999_999)), _mm256_set1_ps(black_box(1e-7)));
        let mut acc = [_mm256_set1_ps(black_box(1.0)); 12];
        for _ in 0..steps {
            for acc in acc.iter_mut() {
                *acc = _mm256_fmadd_ps(*acc, a, b);
            }
        }
        black_box(acc);
        (steps * 12 * 8 * 2) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path reports a positive rate (no timing is asserted).
    #[test]
    fn every_path_measures() {
        let rates: Vec<f64> = Isa::available()
            .into_iter()
            .map(|isa| fma_peak(isa, Duration::from_millis(20)))
            .collect();
        assert!(rates.iter().all(|&r| r > 0.0), "{rates:?}");
    }
}
