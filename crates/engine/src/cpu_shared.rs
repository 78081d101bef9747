//! What wick's CPU kernels share: reading a tensor's f32 data, the length of
//! a sliding-window output, a raw output pointer that tasks writing
//! disjoint elements may share, and per-thread scratch reused across calls
//! (no allocation, no page fault in a steady-state forward).

use candle_core::{bail, CpuStorage, Storage, Tensor};
use std::cell::RefCell;

/// Runs `f` on the f32 data of the contiguous CPU tensors `x` and
/// `residual` (each exactly its elements); `what` names the kernel in the
/// error when either is not f32 on the CPU.
pub(crate) fn with_cpu_f32<R>(
    what: &str,
    x: &Tensor,
    residual: Option<&Tensor>,
    f: impl FnOnce(&[f32], Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        bail!("the {what} takes f32 tensors on the CPU")
    };
    let input = &data[layout.start_offset()..][..x.elem_count()];
    let guard = residual.map(|r| (r.elem_count(), r.storage_and_layout()));
    let residual = match &guard {
        None => None,
        Some((len, (storage, layout))) => match &**storage {
            Storage::Cpu(CpuStorage::F32(r)) => Some(&r[layout.start_offset()..][..*len]),
            _ => bail!("the residual of the {what} must be f32 on the CPU"),
        },
    };
    f(input, residual)
}

/// Length of a sliding-window output along one axis (convolution or pool,
/// floor mode); `None` when the dilated window does not fit the padded input.
pub(crate) fn windowed_len(len: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> Option<usize> {
    let span = dilation * (kernel.checked_sub(1)?) + 1;
    (len + 2 * padding).checked_sub(span).map(|v| v / stride + 1)
}

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
