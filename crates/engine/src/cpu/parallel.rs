//! How the CPU kernels share one phase of work across rayon's threads,
//! and how the thread that starts a phase waits for the others.
//!
//! Every parallel loop of the kernels goes through [`try_for_each`]: the
//! items but the first become jobs of the pool, the first runs here, and
//! this thread then takes the pool's work until every item is done,
//! spinning (not yielding its core to the OS) while none is left to take.
//! Rayon's own wait in a `join` yields the core (`sched_yield`, 32 times)
//! and then sleeps: beside another process that keeps a core busy, each
//! yield handed that process the core for a whole time slice, and the
//! sleeps let the scheduler wake rayon's two workers onto one core for
//! tens of milliseconds while the other process kept the other.
//! Only after [`YIELD_AFTER`] of waiting does this thread yield its core
//! between looks, for a pool with more threads than free cores.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the thread that started a phase waits for its other items by
/// spinning before it yields its core to the OS between looks.
const YIELD_AFTER: Duration = Duration::from_millis(2);

/// Jobs a parallel loop makes per thread at most ([`try_for_each`]):
/// enough for a thread that finishes early to take some of another's,
/// few enough that each job is worth its spawn and steal. Callers whose
/// tasks take a range of work or hold scratch hand over a few items per
/// thread themselves ([`per_task`]); the others hand over one item each
/// (a Winograd position, a packed tile, a lane group's rows), and these
/// runs are what the threads share. Runs of a quarter of a thread's
/// share (at most 4 per thread, sized up to whole items) made ResNet18
/// at batch 10 1.04× slower than one job per item (2-core Zen 4 VM).
const RUNS_PER_THREAD: usize = 8;

/// Runs `task` on every item, the items shared by the current pool's
/// threads in runs of consecutive items, at most [`RUNS_PER_THREAD`] per
/// thread and alike to within one item (in order on this thread when the
/// pool has one); returns the first error a task returned, if any, once
/// every item has run (an error does not stop the other items: none is
/// left half-done).
pub(crate) fn try_for_each<T, E, I>(items: I, task: impl Fn(T) -> Result<(), E> + Sync + Send) -> Result<(), E>
where
    T: Send,
    E: Send,
    I: IntoIterator<Item = T>,
    I::IntoIter: Send,
{
    let items = items.into_iter();
    if rayon::current_num_threads() <= 1 {
        return items.map(task).fold(Ok(()), Result::and);
    }
    let mut items: Vec<Option<T>> = items.map(Some).collect();
    let n = items.len();
    let count = n.min(RUNS_PER_THREAD * rayon::current_num_threads());
    // Run `k` of `count`: items `k·n/count..(k+1)·n/count`, so that runs
    // differ by at most one item.
    let mut rest = &mut items[..];
    let mut runs = (0..count).map(|k| {
        let (run, tail) = std::mem::take(&mut rest).split_at_mut((k + 1) * n / count - k * n / count);
        rest = tail;
        run
    });
    let Some(first) = runs.next() else {
        return Ok(());
    };
    let (failed, pending) = (Mutex::new(None), AtomicUsize::new(0));
    let run = |run: &mut [Option<T>]| {
        for item in run.iter_mut().filter_map(Option::take) {
            if let Err(e) = task(item) {
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        }
    };
    rayon::scope(|scope| {
        for items in runs {
            pending.fetch_add(1, Ordering::Relaxed);
            let (run, pending) = (&run, &pending);
            scope.spawn(move |_| {
                let _done = Done(pending);
                run(items)
            });
        }
        run(first);
        wait_for(&pending);
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// [`try_for_each`] for tasks that cannot fail.
pub(crate) fn for_each<T, I>(items: I, task: impl Fn(T) + Sync + Send)
where
    T: Send,
    I: IntoIterator<Item = T>,
    I::IntoIter: Send,
{
    let done: Result<(), std::convert::Infallible> = try_for_each(items, |item| {
        task(item);
        Ok(())
    });
    let Ok(()) = done;
}

/// How many of `units` one task takes so that each of the pool's threads
/// gets about `per_thread` tasks (at least one unit).
pub(crate) fn per_task(units: usize, per_thread: usize) -> usize {
    units.div_ceil(per_thread * rayon::current_num_threads()).max(1)
}

/// Takes the pool's work until no item counted in `pending` is left:
/// spinning while there is none to take, yielding the core between looks
/// only after [`YIELD_AFTER`].
fn wait_for(pending: &AtomicUsize) {
    let mut since: Option<Instant> = None;
    while pending.load(Ordering::Acquire) > 0 {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            continue;
        }
        match since.get_or_insert_with(Instant::now).elapsed() > YIELD_AFTER {
            true => std::thread::yield_now(),
            false => std::hint::spin_loop(),
        }
    }
}

/// Counts an item as done when dropped (also when its task panics).
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Runs `f` over `0..n`: cut into about four ranges per thread, run in
/// parallel, when `split`; as one range on this thread otherwise.
pub(crate) fn for_ranges(n: usize, split: bool, f: impl Fn(Range<usize>) + Sync + Send) {
    if !split {
        return f(0..n);
    }
    let per = per_task(n, 4);
    for_each((0..n.div_ceil(per)).map(|i| i * per..n.min((i + 1) * per)), f);
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
    try_for_each((0..threads).map(|k| k * n / threads..(k + 1) * n / threads), f)
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

    /// Every item runs once on pools of one to seven threads, items that
    /// start parallel loops of their own included; an error comes back
    /// after every item ran.
    #[test]
    fn items_run_once_on_any_pool() {
        for threads in [1, 2, 3, 7] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for n in [0, 1, 2, 5, 40] {
                let seen: Vec<AtomicUsize> = (0..n * 3).map(|_| AtomicUsize::new(0)).collect();
                let done = pool.install(|| {
                    super::try_for_each(0..n, |i| {
                        super::for_each(0..3, |k| {
                            seen[i * 3 + k].fetch_add(1, Ordering::Relaxed);
                        });
                        match i {
                            3 => Err(i),
                            _ => Ok(()),
                        }
                    })
                });
                assert_eq!(done, if n > 3 { Err(3) } else { Ok(()) }, "n={n} threads={threads}");
                assert!(
                    seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                    "n={n} threads={threads}"
                );
            }
        }
    }

    /// A panicking item's panic reaches the caller once the other items
    /// have run; nothing waits forever on the item that never finished.
    #[test]
    fn a_panicking_item_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for bad in [0, 5] {
            let ran = AtomicUsize::new(0);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| {
                    super::for_each(0..8, |i| {
                        assert_ne!(i, bad, "item {bad} fails");
                        ran.fetch_add(1, Ordering::Relaxed);
                    })
                })
            }));
            assert!(caught.is_err(), "bad={bad}");
            assert_eq!(ran.load(Ordering::Relaxed), 7, "bad={bad}");
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
