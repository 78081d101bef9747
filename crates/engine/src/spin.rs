//! Keeping rayon's other workers awake through a small CPU forward, so
//! each kernel's parallel loop finds them running instead of waking them.
//!
//! A small forward (ResNet18 at batch 1) runs on one of rayon's workers
//! (`CompiledModel::execute_scheduled`) and splits each of its ~20-70
//! kernels across the pool. Between two kernels the other workers run out
//! of work, spin briefly and go to sleep; the next kernel's tasks then
//! wait for them to be woken (a futex and, in a VM, an inter-processor
//! interrupt): ResNet50 at batch 1 made ~90 context switches a forward.
//! With spinning on, the forward first hands each other worker a job that
//! keeps taking the pool's work ([`rayon::yield_now`]) until the forward
//! ends, as ONNX Runtime's intra-op threads spin by default. Intel Xeon VM
//! (2 threads), forwards alternating in one process (a temporary switch,
//! then `cargo xtask compare MODEL --batch 1 --b-spin off`), spinning /
//! not: ResNet18 batch 1 0.93-0.95x the time, ResNet34 0.93-0.94x,
//! ResNet50 0.94-0.96x, MobileNetV2 0.88-0.91x, MobileNetV3-Large
//! 0.87-0.92x, EfficientNet-B0 0.89x; AVX2 forced, ResNet18 0.92x and
//! MobileNetV2 0.91x. (Large forwards, which run on the caller's thread,
//! gained nothing from spinners: 1.00-1.03x at batch 10.)
//!
//! After a forward from outside the pool ends, the workers keep taking
//! work for [`LINGER`], so that the next forward of a back-to-back stream
//! finds them running ([`linger`]); `WICK_SPIN=off` turns that off too.
//!
//! A spinner never holds up a forward: one that starts on a thread that
//! is itself running a forward (its own, or another forward's worker that
//! took it while waiting in a join) returns at once, and one that has
//! found no work for [`IDLE_MAX`] returns too, so two forwards sharing
//! the pool can never wait on each other's spinners for longer. The cost is CPU time
//! the waiting workers would have slept through, during forwards only;
//! `WICK_SPIN=off` (or [`crate::Engine::with_spinning`]) turns it off.

use crate::EngineError;
use std::cell::Cell;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that turns spinning `on` (the default) or
/// `off` where the engine was not told ([`crate::Engine::with_spinning`]).
pub const SPIN_ENV: &str = "WICK_SPIN";

/// How long a spinner waits without finding work before it returns. The
/// gaps between a small forward's parallel loops (a serial step, one
/// worker finishing its share before the other) reach a few hundred
/// microseconds: ResNet50 at batch 1 kept its gain with 0.5 and 2 ms
/// (0.958x, 0.951x the time) and lost most of it with 0.1 ms (0.998x;
/// 0.02 ms: 0.98x). It also bounds the one wait a spinner can cause: with
/// more than two workers, one that steals a spinner while it waits inside
/// a task of the forward holds that task until the spinner returns.
const IDLE_MAX: Duration = Duration::from_micros(500);

/// How long each of the pool's workers keeps taking work after a forward
/// from outside the pool ends ([`linger`]): the next forward, if it comes
/// within this, starts on a running worker, and its spinners find running
/// workers too, instead of each being woken. Intel Xeon VM (2 threads),
/// `cargo xtask bench MODEL --batch 1` (back-to-back forwards), six
/// alternating runs of the two builds, medians: MobileNetV3-Large 2.575
/// -> 2.49 ms, MobileNetV2 2.825 -> 2.765, EfficientNet-B0 4.715 -> 4.66,
/// ResNet18 and ResNet50 level (1.01× and 1.00×; with a switch before,
/// 0.996×); 0.1 ms gained less (MobileNetV2 0.995×), 1 ms no more
/// (MobileNetV3-Large 0.973× against 0.977×). The cost is CPU time the
/// workers would have slept through, at most this long per worker after
/// each forward. Batch 10 and larger forwards run on the caller's thread
/// without spinners, and linger not.
const LINGER: Duration = Duration::from_micros(300);

thread_local! {
    /// Whether this thread is running a forward with spinners (which a
    /// spinner must not hold up by spinning on top of it).
    static IN_FORWARD: Cell<bool> = const { Cell::new(false) };
}

/// Whether spinning is on, as `WICK_SPIN` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpinSwitch(pub(crate) bool);

impl SpinSwitch {
    /// The switch `WICK_SPIN` sets, if it is set: a typed error for
    /// anything but `on` or `off`.
    pub(crate) fn from_env() -> Result<Option<Self>, EngineError> {
        crate::machine::parse_env(SPIN_ENV)
    }
}

impl FromStr for SpinSwitch {
    type Err = EngineError;

    fn from_str(given: &str) -> Result<Self, EngineError> {
        crate::machine::on_off(given)
            .map(Self)
            .ok_or_else(|| EngineError::InvalidSpin { given: given.into() })
    }
}

/// Runs `forward` in a rayon scope (on a worker of the current pool) with
/// a spinner handed to each other worker for as long as it runs; also
/// when `forward` panics, the spinners stop and the panic goes on. Called
/// from outside the pool, it leaves the workers lingering for the next
/// forward ([`linger`]).
pub(crate) fn with_spinners<R: Send>(forward: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    let done = &done;
    let outside = rayon::current_thread_index().is_none();
    let result = rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| spin(done));
        }
        let _stop = Stop(done);
        let _in_forward = InForward::enter();
        forward()
    });
    if outside {
        linger(LINGER);
    }
    result
}

/// Hands each of the pool's workers a job that takes the pool's work for
/// up to `time` and returns once it has run one (the next forward, or its
/// spinner) or the time is up. Detached: the caller does not wait for it.
/// Only after forwards from outside the pool (a service's request thread,
/// a benchmark loop), whose workers would otherwise go to sleep between
/// forwards; inside the pool other work keeps them busy.
fn linger(time: Duration) {
    for _ in 0..rayon::current_num_threads() {
        rayon::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < time {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => return,
                    _ => std::hint::spin_loop(),
                }
            }
        });
    }
}

/// Takes the pool's work until `done`, unless this thread runs a forward
/// or no work came for [`IDLE_MAX`].
fn spin(done: &AtomicBool) {
    if IN_FORWARD.with(Cell::get) {
        return;
    }
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() > IDLE_MAX => return,
            _ => std::hint::spin_loop(),
        }
    }
}

/// Tells the spinners to stop when dropped (at the end of the forward, or
/// while a panic unwinds it).
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Marks this thread as running a forward until dropped (restoring what
/// it was: forwards nest when one runs inside another's task).
struct InForward(bool);

impl InForward {
    fn enter() -> Self {
        Self(IN_FORWARD.with(|f| f.replace(true)))
    }
}

impl Drop for InForward {
    fn drop(&mut self) {
        IN_FORWARD.with(|f| f.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// `on` and `off` and nothing else.
    #[test]
    fn switch_parses_on_and_off_only() {
        assert_eq!("on".parse::<SpinSwitch>().unwrap(), SpinSwitch(true));
        assert_eq!(" off ".parse::<SpinSwitch>().unwrap(), SpinSwitch(false));
        let err = "yes".parse::<SpinSwitch>().unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidSpin { given } if given == "yes"),
            "{err}"
        );
        assert!(err.to_string().contains(SPIN_ENV), "{err}");
    }

    /// The work inside runs in full, with its parallel loops, and what it
    /// returns comes back.
    #[test]
    fn runs_the_forward_and_its_parallel_work() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let sum: u64 = pool.install(|| with_spinners(|| (0..100_000u64).into_par_iter().sum()));
        assert_eq!(sum, 100_000 * 99_999 / 2);
    }

    /// Forwards from several threads outside the pool (rayon's global
    /// one), back to back, each leaving the workers lingering: every one
    /// returns its own answer, none waits on another's lingering jobs.
    #[test]
    fn forwards_from_outside_the_pool_finish_while_workers_linger() {
        let callers: Vec<_> = (1..=4u64)
            .map(|k| {
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| with_spinners(|| (0..10_000u64).into_par_iter().map(|i| i * k).sum::<u64>()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (k, caller) in (1..=4u64).zip(callers) {
            let sums = caller.join().unwrap();
            assert!(sums.iter().all(|&s| s == k * 10_000 * 9_999 / 2), "caller {k}");
        }
    }

    /// Many forwards at once on one pool, each from a worker and each
    /// with spinners, all finish (no forward waits on another's spinners),
    /// on two workers and on more than the machine has cores.
    #[test]
    fn concurrent_forwards_finish() {
        for threads in [2, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let sums: Vec<u64> = pool.install(|| {
                (0..16u64)
                    .into_par_iter()
                    .map(|k| with_spinners(|| (0..10_000u64).into_par_iter().map(|i| i * k).sum()))
                    .collect()
            });
            for (k, sum) in sums.into_iter().enumerate() {
                assert_eq!(sum, k as u64 * 10_000 * 9_999 / 2, "{threads} threads");
            }
        }
    }

    /// A forward that panics stops its spinners and passes the panic on,
    /// rather than leaving the scope waiting for them.
    #[test]
    fn a_panicking_forward_stops_its_spinners() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (caught, in_forward) = pool.install(|| {
            let caught = std::panic::catch_unwind(|| with_spinners(|| -> u32 { panic!("forward failed") }));
            (caught.is_err(), IN_FORWARD.with(Cell::get))
        });
        assert!(caught, "the panic did not come back");
        assert!(!in_forward, "the thread still counts as running a forward");
    }
}
