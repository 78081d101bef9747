//! How the CPU kernels share one phase of work across rayon's threads.

use rayon::prelude::*;
use std::ops::Range;

/// Runs `f` over `0..n`: cut into about four ranges per thread, run in
/// parallel, when `split`; as one range on this thread otherwise.
pub(crate) fn for_ranges(n: usize, split: bool, f: impl Fn(Range<usize>) + Sync + Send) {
    if !split {
        return f(0..n);
    }
    let per = n.div_ceil(4 * rayon::current_num_threads()).max(1);
    (0..n.div_ceil(per))
        .into_par_iter()
        .for_each(|i| f(i * per..n.min((i + 1) * per)));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The ranges cover `0..n` exactly once, split or not.
    #[test]
    fn ranges_cover_everything_once() {
        for n in [0, 1, 7, 100] {
            for split in [false, true] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                super::for_ranges(n, split, |range| {
                    for i in range {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                    "n={n} split={split}"
                );
            }
        }
    }
}
