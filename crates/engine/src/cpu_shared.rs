//! What wick's CPU kernels share: reading a tensor's f32 data, the length of
//! a sliding-window output, a raw output pointer that tasks writing
//! disjoint elements may share, per-thread scratch reused across calls
//! (no allocation, no page fault in a steady-state forward), and buffers
//! for packed weights backed by huge pages.

use candle_core::{bail, CpuStorage, Storage, Tensor};
use std::cell::RefCell;
use wick_ir::Conv2dAttrs;

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

/// A conv's bias as `out_channels` values (zeros without one); `what`
/// names the kernel in the error when the length is wrong.
pub(crate) fn bias_values(bias: Option<&Tensor>, out_channels: usize, what: &str) -> candle_core::Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0.0; out_channels],
    };
    if bias.len() != out_channels {
        bail!("{what} bias has {} values for {out_channels} channels", bias.len())
    }
    Ok(bias)
}

/// Output height and width of a convolution with `attrs` and `kernel` on
/// an `[height, width]` input; `None` when the dilated kernel does not fit.
pub(crate) fn conv_out_size(
    attrs: &Conv2dAttrs,
    kernel: [usize; 2],
    [height, width]: [usize; 2],
) -> Option<[usize; 2]> {
    let axis =
        |len: usize, i: usize| windowed_len(len, kernel[i], attrs.stride[i], attrs.padding[i], attrs.dilation[i]);
    Some([axis(height, 0)?, axis(width, 1)?])
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

/// A zeroed buffer of `len` values for packed weights, which the kernel is
/// asked to back with transparent huge pages (Linux; THP in `madvise` mode,
/// as on the bench machine). At batch 1 a forward streams ~70 MB of packed
/// weights once; 2 MiB pages need 1/512 of the TLB entries 4 KiB pages do.
/// Only advice: where it is not taken the buffer is an ordinary `Vec`.
pub(crate) fn weight_buffer(len: usize) -> Vec<f32> {
    let buffer = vec![0f32; len];
    #[cfg(target_os = "linux")]
    if len * 4 >= HUGE_PAGE {
        // Advise the whole pages inside the allocation, before anything is
        // written (a large zeroed allocation is fresh untouched mmap memory,
        // so the first writes fault in huge pages where the kernel can).
        let start = buffer.as_ptr() as usize;
        let (first, end) = (start.next_multiple_of(PAGE), (start + len * 4) / PAGE * PAGE);
        if end > first {
            // SAFETY: [first, end) lies within `buffer`'s allocation and is
            // page-aligned; MADV_HUGEPAGE changes how pages are backed, never
            // their contents. Failure (no THP) is harmless and ignored.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    buffer
}

#[cfg(target_os = "linux")]
const PAGE: usize = 4096;
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

#[cfg(test)]
mod tests {
    /// The buffer is zeroed and writable end to end, whatever backs it.
    #[test]
    fn weight_buffer_is_zeroed() {
        for len in [0, 1, 1000, (3 << 20) + 17] {
            let mut b = super::weight_buffer(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            b.iter_mut().for_each(|v| *v = 1.0);
            assert!(b.iter().all(|&v| v == 1.0));
        }
    }
}
