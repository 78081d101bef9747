//! What the CPU kernels share for parallel writes and temporary buffers: a
//! raw output pointer that tasks writing disjoint elements may share, and
//! per-thread scratch reused across calls (no allocation, no page fault in
//! a steady-state forward).

use std::cell::RefCell;

/// A buffer several tasks write at once, each to elements no other task
/// touches. Every user states in a `SAFETY` comment why its writes are
/// disjoint and in bounds.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: a `SharedOut` is only dereferenced for writes to disjoint
// elements (argued at each use) while the buffer it points into outlives
// the parallel loop, so sharing the pointer across threads races on nothing.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, grown to at least `len` values
/// (contents unspecified). Re-entrant: a nested call on the same thread
/// (rayon work stealing inside `f`) gets a buffer of its own.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut scratch = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    if scratch.len() < len {
        scratch = vec![0f32; len];
    }
    let result = f(&mut scratch[..len]);
    SCRATCH.with(|cell| {
        let mut cell = cell.borrow_mut();
        // Keep the larger buffer when a nested call put one back meanwhile.
        if cell.len() < scratch.len() {
            *cell = scratch;
        }
    });
    result
}
