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

/// Runs `f` on every task of `0..n`, `0..n` cut into one contiguous share
/// per thread (share `k` of `t`: tasks `k·n/t..(k+1)·n/t`), the first on
/// this thread and each other one as a job of its own that an idle worker
/// takes (or this thread, once its own share is done); returns the first
/// error a task returned, if any, after every share has run. Where tasks
/// are alike, each thread's share is then the same run of them from one
/// call to the next, and consecutive kernels that cut their work the same
/// way (a strip of the planes per thread) leave each core reading what it
/// wrote itself rather than lines the other core holds.
pub(crate) fn try_shares<E: Send>(n: usize, f: impl Fn(usize) -> Result<(), E> + Sync + Send) -> Result<(), E> {
    try_share_runs(n, |run| run.into_iter().try_for_each(&f))
}

/// [`try_shares`] with each share handed to `f` whole, as the range of
/// tasks it runs (in order, on one thread): a share's tasks can then hand
/// on what one computed to the next.
pub(crate) fn try_share_runs<E: Send>(
    n: usize,
    f: impl Fn(Range<usize>) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    let threads = rayon::current_num_threads().min(n);
    if threads <= 1 {
        return f(0..n);
    }
    let failed = std::sync::Mutex::new(None);
    let run = |k: usize| {
        if let Err(e) = f(k * n / threads..(k + 1) * n / threads) {
            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    };
    rayon::scope(|scope| {
        for k in 1..threads {
            let run = &run;
            scope.spawn(move |_| run(k));
        }
        run(0)
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The shares cover `0..n` exactly once on pools of one to seven
    /// threads, fewer tasks than threads included.
    #[test]
    fn shares_run_every_task_once_on_any_pool() {
        for threads in [1, 2, 3, 7] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for n in [0, 1, 2, 5, 12, 100] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let done: Result<(), ()> = pool.install(|| {
                    super::try_shares(n, |i| {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    })
                });
                assert!(done.is_ok());
                assert!(
                    seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                    "n={n} threads={threads}"
                );
            }
        }
    }

    /// A failing task's error comes back, and the other shares still run
    /// to the end (nothing is left half-written behind the caller's back).
    #[test]
    fn shares_return_an_error_after_all_ran() {
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let ran = AtomicUsize::new(0);
            let done = pool.install(|| {
                super::try_shares(40, |i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    match i {
                        37 => Err(i),
                        _ => Ok(()),
                    }
                })
            });
            assert_eq!(done, Err(37), "threads={threads}");
            // A share stops at its first error: only 38 and 39, after 37
            // in the last share, are skipped.
            assert_eq!(ran.load(Ordering::Relaxed), 38, "threads={threads}");
        }
    }

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
