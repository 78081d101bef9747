//! The memory wick's CPU kernels work in: a tensor's f32 data, an output
//! buffer that tasks writing disjoint elements share, per-thread scratch
//! reused across calls (no allocation, no page fault in a steady-state
//! forward), and the advice that puts large buffers on huge pages.

use crate::cpu::gemm::Isa;
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

/// An output buffer several tasks write at once, each to elements no other
/// task touches. It knows its length: every slice it hands out is checked
/// against it, so what remains for the caller to argue (in a `SAFETY`
/// comment) is only that concurrent writes are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a `SharedOut` is only dereferenced for writes to disjoint
// elements (argued at each use) while the buffer it points into outlives
// the parallel loop, so sharing the pointer across threads races on nothing.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The first `len` elements of `buffer`'s allocation (its length may
    /// be 0: the tasks initialise them, and the owner sets the length
    /// afterwards). Panics when the allocation holds fewer.
    pub(crate) fn new(buffer: &mut Vec<f32>, len: usize) -> Self {
        assert!(
            len <= buffer.capacity(),
            "{len} outputs in a buffer of {}",
            buffer.capacity()
        );
        Self {
            ptr: buffer.as_mut_ptr(),
            len,
        }
    }

    /// The `len` values from `ptr` on.
    ///
    /// # Safety
    /// They lie inside one allocation that outlives every use of the result.
    pub(crate) unsafe fn from_raw(ptr: *mut f32, len: usize) -> Self {
        Self { ptr, len }
    }

    /// All of `slice` (scratch that tasks fill in disjoint parts).
    pub(crate) fn over(slice: &mut [f32]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// Panics unless elements `start..end` lie in the buffer: one check for
    /// a region that [`SharedOut::slice_within`] then writes piecewise.
    #[inline(always)]
    pub(crate) fn check(&self, start: usize, end: usize) {
        assert!(
            start <= end && end <= self.len,
            "output elements {start}..{end} outside a buffer of {}",
            self.len
        );
    }

    /// A pointer to element `start` (checked: at most the buffer's length),
    /// for a kernel that writes elements of a region [`SharedOut::check`]
    /// accepted through raw pointers.
    pub(crate) fn ptr_at(&self, start: usize) -> *mut f32 {
        assert!(
            start <= self.len,
            "output element {start} outside a buffer of {}",
            self.len
        );
        // SAFETY: within the allocation (or one past its end), as checked.
        unsafe { self.ptr.add(start) }
    }

    /// Elements `start..start + len` without a bounds check of its own.
    ///
    /// # Safety
    /// As [`SharedOut::slice`], and the elements lie in a range that
    /// [`SharedOut::check`] accepted (debug builds check again).
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_within(&self, start: usize, len: usize) -> &mut [f32] {
        debug_assert!(
            start + len <= self.len,
            "output elements {start}+{len} outside {}",
            self.len
        );
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Elements `start..start + len` (panics when they lie outside the buffer).
    ///
    /// # Safety
    /// No other live slice of this buffer overlaps these elements while the
    /// returned one is used, and the buffer outlives it.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // An end that overflows saturates to usize::MAX, past any real buffer.
        self.check(start, start.saturating_add(len));
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { self.slice_within(start, len) }
    }
}

/// A zeroed buffer of `len` values, or an error naming `what` when the
/// allocation is refused (see [`super::output::Output::new`]). Zeroed by the allocator
/// (fresh pages are not touched until written), as `vec![0.0; len]` is.
pub(crate) fn zeroed(len: usize, what: &str) -> candle_core::Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let Ok(layout) = std::alloc::Layout::array::<f32>(len) else {
        bail!("cannot allocate {len} f32 values for the {what}: too large")
    };
    // SAFETY: `layout` has a non-zero size (len > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    if ptr.is_null() {
        bail!("cannot allocate {len} f32 values for the {what}")
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of
    // `[f32; len]`, which is what a `Vec<f32>` of capacity `len` holds; all
    // `len` values are initialised (zero bits are 0.0).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// f32 values per 64-byte cache line.
pub(crate) const CACHE_LINE_FLOATS: usize = 16;

/// How many values from `ptr` the next cache line starts (0 to
/// [`CACHE_LINE_FLOATS`]` - 1`; 0 where it cannot be reached by whole values).
pub(crate) fn line_offset(ptr: *const f32) -> usize {
    match ptr.align_offset(CACHE_LINE_FLOATS * 4) {
        skip if skip < CACHE_LINE_FLOATS => skip,
        _ => 0,
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A second buffer, for an operand a kernel prepares once and shares
    /// with the tasks it then runs in parallel ([`with_shared_scratch`]).
    static SHARED_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The most scratch one thread may hold in each of its two buffers
/// ([`with_scratch`], [`with_shared_scratch`]): 2^28 values (1 GiB). The kernels'
/// blocks are sized from the caches (about an L2 each); a Winograd F(2×2)
/// conv also copies its padded input here (ResNet18's largest at batch 256:
/// 2^23.5 values). A conv asking for more (a hostile weight of millions of
/// channels, say) gets an error, not an allocation it cannot survive.
pub(crate) const SCRATCH_MAX_VALUES: usize = 1 << 28;

/// Runs `f` on this thread's scratch buffer, grown to at least `len` values
/// (contents unspecified). Re-entrant: a nested call on the same thread
/// (rayon work stealing inside `f`) gets a buffer of its own. An error when
/// `len` exceeds [`SCRATCH_MAX_VALUES`] or the allocation is refused.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> candle_core::Result<R> {
    with_buffer(&SCRATCH, len, f)
}

/// [`with_scratch`] on a second buffer of this thread's, for an operand
/// shared with parallel tasks that take scratch themselves: those that
/// run on this thread find their usual buffer, not an empty slot that a
/// fresh allocation (and its page faults) would fill each call.
pub(crate) fn with_shared_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> candle_core::Result<R> {
    with_buffer(&SHARED_SCRATCH, len, f)
}

/// [`with_scratch`] on the buffer `key` holds; inlined, so that each of
/// the two reaches its own thread-local directly, as `with_scratch` did
/// before there were two.
#[inline(always)]
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> candle_core::Result<R> {
    if len > SCRATCH_MAX_VALUES {
        bail!("a kernel needs {len} f32 values of scratch, more than the {SCRATCH_MAX_VALUES} wick allows per thread")
    }
    let mut scratch = key.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    // Room to start on a cache line: the kernels' matrices in scratch are
    // whole lines long, so their rows then start on lines too, and a
    // micro-tile's row of 16 (or 32) floats is one (or two) lines, not two (three).
    let room = len + CACHE_LINE_FLOATS;
    if scratch.len() < room {
        scratch = zeroed(room, "kernel scratch")?;
    }
    let skip = line_offset(scratch.as_ptr());
    let result = f(&mut scratch[skip..skip + len]);
    key.with(|cell| {
        let mut cell = cell.borrow_mut();
        // Keep the larger buffer when a nested call put one back meanwhile.
        if cell.len() < scratch.len() {
            *cell = scratch;
        }
    });
    Ok(result)
}

/// Asks the kernel to back the whole pages of the allocation of `len`
/// values at `start` with transparent huge pages (Linux, THP in `madvise`
/// mode, as on the bench machine), if it spans at least one: before
/// anything is written to fresh memory, its first writes then fault in
/// huge pages where the kernel can. Only advice, which changes how pages
/// are backed, never their contents; where it is not taken (another OS,
/// THP off, an allocation under 2 MiB) the memory is as allocated.
pub(super) fn advise_huge_pages(start: *const f32, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let (start, bytes) = (start as usize, len.saturating_mul(4));
        if bytes < HUGE_PAGE {
            return;
        }
        let (Some(first), Some(end)) = (start.checked_next_multiple_of(PAGE), start.checked_add(bytes)) else {
            return;
        };
        let end = end / PAGE * PAGE;
        if end > first {
            // SAFETY: [first, end) lies within the allocation and is
            // page-aligned; MADV_HUGEPAGE changes how pages are backed,
            // never their contents. Failure (no THP) is harmless and ignored.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

#[cfg(target_os = "linux")]
const PAGE: usize = 4096;
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// [`gather_strided`] on `isa`'s path: on AVX-512, stride 2 in vectors
/// of 16 to the last value (two loads and one permute a vector, the row's
/// end through masks), where LLVM's vectorisation of the pairs took 8
/// values a step and the last `n mod 8` one by one: ResNet's stride-2
/// convs gather rows of 14, 28 or 56 values for im2col, much of each in
/// that tail. Zen 4, 2 threads, `xtask compare` (A B B A): alone, 3×3
/// stride 2 64 -> 128 onto 28×28 (ResNet18's layer2.0.conv1) at batch 1
/// 0.944× the time, 256 -> 256 onto 14×14 (ResNet50's layer3.0.conv2) at
/// batch 10 0.93×, ResNet50's 1×1 stride-2 downsample onto 14×14 at batch
/// 10 0.96×, other shapes 0.99-1.0×; whole models level (ResNet50,
/// ResNet18, ResNet34, the mobile models 0.99-1.01×, a null test 1.005×).
/// AVX2 keeps the plain loop: its masked loads and stores (`vmaskmovps`)
/// for the end made ResNet18's layer2.0.conv1 1.018× slower there.
#[inline(always)]
pub(crate) fn gather_strided_on(isa: Isa, src: &[f32], stride: usize, out: &mut [f32]) {
    let n = out.len();
    // The last value read: (n − 1)·2, within `src` (checked here, so the
    // SIMD loops below read and write in bounds).
    let fits = n
        .checked_sub(1)
        .is_none_or(|last| last.checked_mul(2).is_some_and(|at| at < src.len()));
    match (isa, stride) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `src` holds the 2(n − 1) + 1 values read (`fits`), `out`
        // the n written; the path's features come with `isa`.
        (Isa::Avx512, 2) if fits => unsafe { x86::stride2_avx512(src, out) },
        _ => gather_strided(src, stride, out),
    }
}

/// The three taps of a 3-wide, stride-2 kernel row (dilation 1) in one
/// pass over an input `line`: `outs[k][i] = line[start + 2i + k]` where
/// that index lies in `0..line.len()`, else 0 (the zero padding), for
/// `k < 3` and every `i` (the outs of equal length). On AVX-512 every 16
/// outputs of all three come from three masked loads (the padding masked
/// off) and three permutes, where three [`gather_strided_on`] calls and
/// their edge fills each read the line and cut its ends again; elsewhere
/// value by value.
pub(crate) fn gather_stride2_taps3(isa: Isa, line: &[f32], start: isize, outs: [&mut [f32]; 3]) {
    let n = outs[0].len();
    assert!(
        outs.iter().all(|out| out.len() == n),
        "the three taps' outputs differ in length"
    );
    // Every index formed below, `start + 2i + k` for `i <= n + 16`, fits
    // an isize (slices hold at most isize::MAX bytes; `start` is a column).
    let reach = n
        .checked_add(16)
        .and_then(|i| isize::try_from(i).ok())
        .and_then(|i| i.checked_mul(2))
        .and_then(|i| i.checked_add(start.checked_abs()?))
        .and_then(|i| i.checked_add(48));
    assert!(reach.is_some(), "tap offsets overflow");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path's features come with `isa`; the loads read only
        // lanes within `line` (masks), the stores only the outs' lanes.
        Isa::Avx512 => unsafe { x86::stride2_taps3_avx512(line, start, outs) },
        _ => {
            let len = line.len() as isize;
            for (k, out) in outs.into_iter().enumerate() {
                for (i, out) in out.iter_mut().enumerate() {
                    let at = start + 2 * i as isize + k as isize;
                    *out = if (0..len).contains(&at) { line[at as usize] } else { 0.0 };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// `out[k] = src[k·stride]` for every `k` of `out` (`src` holds at least
/// `(out.len() − 1)·stride + 1` values); stride 2 as pairs, which
/// vectorises with the path's shuffles where a plain step does not.
#[inline(always)]
pub(crate) fn gather_strided(src: &[f32], stride: usize, out: &mut [f32]) {
    let Some((last, head)) = out.split_last_mut() else {
        return;
    };
    let n = head.len();
    match stride {
        0 => head.fill(src[0]),
        1 => head.copy_from_slice(&src[..n]),
        2 => {
            for (value, pair) in head.iter_mut().zip(src[..2 * n].chunks_exact(2)) {
                *value = pair[0];
            }
        }
        _ => {
            for (value, &x) in head.iter_mut().zip(src.iter().step_by(stride)) {
                *value = x;
            }
        }
    }
    *last = src[n * stride];
}

#[cfg(test)]
mod tests;
