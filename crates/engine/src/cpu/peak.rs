//! Probes of the roofline the kernels are measured against: the CPU's fp32
//! FMA peak per instruction-set path (independent accumulator chains,
//! enough of them to cover the FMA latency, nothing loaded from memory;
//! also the ratio of two paths' rates that the conv policy reads,
//! [`crate::machine::Machine::wide_fma`]), the rate at which a thread
//! reads a working set of a given size (the caches' and memory's side), and
//! the rate of the panel micro-kernel on operands of a given shape (the
//! kernel's side: how much of the FMA peak the product under the convs
//! reaches before any conv's layout, epilogue or memory traffic).

use super::gemm::{panel_gemm, Isa, IsaBody, PANEL_GRANULE, PANEL_ROWS};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The sum of `probe`'s rates on `threads` threads (at least one) running
/// it at once, each on its own data: `None` when any thread's is (or its
/// thread panicked).
pub(crate) fn on_threads(threads: usize, probe: impl Fn() -> Option<f64> + Sync) -> Option<f64> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(&probe)).collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .sum::<Option<f64>>()
    })
}

/// Multiply-adds per call of a path's inner loop body, per lane.
const STEPS: usize = 1 << 16;

/// fp32 FLOP/s of `isa` on one thread, over about `duration` (at least one
/// call of the inner loop).
pub(crate) fn fma_peak(isa: Isa, duration: Duration) -> f64 {
    let start = Instant::now();
    let mut flops = 0f64;
    while flops == 0.0 || start.elapsed() < duration {
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

/// The ratio of `wide`'s fp32 FMA rate to `narrow`'s on this thread: the
/// best of three alternating rounds of one inner loop each (about 0.2-0.8
/// ms a round), so that a round the thread lost to another does not decide.
pub(crate) fn fma_ratio(wide: Isa, narrow: Isa) -> f64 {
    let (mut fast, mut slow) = (0f64, 0f64);
    for _ in 0..3 {
        fast = fast.max(fma_peak(wide, Duration::ZERO));
        slow = slow.max(fma_peak(narrow, Duration::ZERO));
    }
    fast / slow
}

/// Floats the read probe sums per step: four cache lines.
const READ_STEP: usize = 64;

/// Bytes per second one thread reads, summing its own buffer of about
/// `bytes` (whole steps) over and over with `isa`'s vectors for about
/// `duration`, after a first pass that brings its pages in; `None` when
/// the buffer cannot be allocated.
pub(crate) fn read_rate(isa: Isa, bytes: usize, duration: Duration) -> Option<f64> {
    let len = (bytes / 4).max(READ_STEP) / READ_STEP * READ_STEP;
    let mut buffer: Vec<f32> = Vec::new();
    buffer.try_reserve_exact(len).ok()?;
    buffer.resize(len, 1.0);
    let mut acc = [0f32; 16];
    isa.run(Sum {
        buffer: &buffer,
        acc: &mut acc,
    });
    let start = Instant::now();
    let mut passes = 0u64;
    while passes == 0 || start.elapsed() < duration {
        isa.run(Sum {
            buffer: black_box(&buffer),
            acc: &mut acc,
        });
        passes += 1;
    }
    black_box(acc);
    Some(passes as f64 * (len * 4) as f64 / start.elapsed().as_secs_f64())
}

/// fp32 FLOP/s of the panel micro-kernel on one thread
/// ([`panel_gemm`]: `m = u · v`, `u` `[rows, depth]` in 8-row panels, `v`
/// `[depth, cols]` row-major, no epilogue), the product repeated for about
/// `duration` after one that brings the operands into the caches; `rows`
/// rounded up to whole panels and `cols` to whole 16-column granules (and
/// each size at least 1). `None` when the operands cannot be allocated
/// (their sizes overflowing included).
pub(crate) fn panel_rate(isa: Isa, [rows, depth, cols]: [usize; 3], duration: Duration) -> Option<f64> {
    let rows = rows.max(1).checked_next_multiple_of(PANEL_ROWS)?;
    let cols = cols.max(1).checked_next_multiple_of(PANEL_GRANULE)?;
    let depth = depth.max(1);
    // Small values that neither overflow nor turn denormal as products
    // repeat (each one overwrites `m`).
    let filled = |len: Option<usize>| -> Option<Vec<f32>> {
        let len = len?;
        let mut values = Vec::new();
        values.try_reserve_exact(len).ok()?;
        values.extend((0..len).map(|i| (i % 7) as f32 * 0.01));
        Some(values)
    };
    let u = filled(rows.checked_mul(depth))?;
    let v = filled(depth.checked_mul(cols))?;
    let mut m = filled(rows.checked_mul(cols))?;
    panel_gemm(isa, &u, &v, &mut m, rows, depth, cols);
    let start = Instant::now();
    let mut products = 0u64;
    while products == 0 || start.elapsed() < duration {
        panel_gemm(isa, black_box(&u), black_box(&v), &mut m, rows, depth, cols);
        products += 1;
    }
    black_box(&m);
    let flops = 2.0 * rows as f64 * depth as f64 * cols as f64;
    Some(products as f64 * flops / start.elapsed().as_secs_f64())
}

/// `acc[i] += Σ` of every value of `buffer` at `i` mod 16 (whole
/// [`READ_STEP`]s): four independent vector adds a step, each a cache
/// line's values, compiled for the path by [`Isa::run`].
struct Sum<'a> {
    buffer: &'a [f32],
    acc: &'a mut [f32; 16],
}

impl IsaBody for Sum<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        // A local copy stays in registers (through the reference, the
        // sums went back to memory every step: 0.4x the rate from L2).
        let mut acc = *self.acc;
        for step in self.buffer.chunks_exact(READ_STEP) {
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc += (step[i] + step[i + 16]) + (step[i + 32] + step[i + 48]);
            }
        }
        *self.acc = acc;
    }
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

    /// Defines `$name(steps)`: `$chains` independent chains of `$lanes`-lane
    /// FMAs on the `$feature` path, as many as its register file holds
    /// beside the two operands; returns the FLOPs done.
    macro_rules! chains {
        ($name:ident, $feature:literal, $chains:literal, $lanes:literal, $splat:ident, $fmadd:ident) => {
            /// # Safety
            /// The CPU has the path's features.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(steps: usize) -> f64 {
                let (a, b) = ($splat(black_box(0.999_999)), $splat(black_box(1e-7)));
                let mut acc = [$splat(black_box(1.0)); $chains];
                for _ in 0..steps {
                    for acc in acc.iter_mut() {
                        *acc = $fmadd(*acc, a, b);
                    }
                }
                black_box(acc);
                (steps * $chains * $lanes * 2) as f64
            }
        };
    }

    chains!(avx512, "avx512f", 24, 16, _mm512_set1_ps, _mm512_fmadd_ps);
    chains!(avx2, "avx2,fma", 12, 8, _mm256_set1_ps, _mm256_fmadd_ps);
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

    /// The read probe's sums are the buffer's on every path, and its rate
    /// is positive and finite (no rate is asserted).
    #[test]
    fn reads_sum_the_buffer() {
        let buffer: Vec<f32> = (0..4 * READ_STEP).map(|i| i as f32).collect();
        for isa in Isa::available() {
            let mut acc = [0f32; 16];
            isa.run(Sum {
                buffer: &buffer,
                acc: &mut acc,
            });
            for (i, &a) in acc.iter().enumerate() {
                let want: f32 = buffer.iter().skip(i).step_by(16).sum();
                assert_eq!(a, want, "{isa:?} lane {i}");
            }
            let rate = read_rate(isa, 1 << 16, Duration::from_millis(1)).unwrap();
            assert!(rate.is_finite() && rate > 0.0, "{isa:?}: {rate}");
        }
    }

    /// The panel probe runs on every path, on shapes it must round up
    /// (rows to a panel, columns to a granule, a zero depth to one), and
    /// gives a positive finite rate (no rate is asserted); sizes whose
    /// product overflows are refused, not allocated.
    #[test]
    fn panel_probe_measures() {
        for isa in Isa::available() {
            for shape in [[8, 64, 16], [6, 0, 49], [1, 1, 1]] {
                let rate = panel_rate(isa, shape, Duration::from_millis(1)).unwrap();
                assert!(rate.is_finite() && rate > 0.0, "{isa:?} {shape:?}: {rate}");
            }
            assert!(panel_rate(isa, [usize::MAX / 2, 1 << 40, 16], Duration::ZERO).is_none());
            assert!(panel_rate(isa, [8, 1, usize::MAX], Duration::ZERO).is_none());
        }
    }

    /// The threads' rates are summed; one thread without a rate leaves
    /// none.
    #[test]
    fn threads_sum_their_rates() {
        assert_eq!(on_threads(3, || Some(2.0)), Some(6.0));
        assert_eq!(on_threads(0, || Some(2.0)), Some(2.0));
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let first_fails = || (calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0).then_some(1.0);
        assert_eq!(on_threads(2, first_fails), None);
    }

    /// Every pair of paths gives a finite positive ratio (no timing is
    /// asserted).
    #[test]
    fn ratios_measure() {
        for wide in Isa::available() {
            for narrow in Isa::available() {
                let ratio = fma_ratio(wide, narrow);
                assert!(ratio.is_finite() && ratio > 0.0, "{wide:?} / {narrow:?}: {ratio}");
            }
        }
    }
}
