//! The memory packed weights live in: a zeroed f32 buffer that, from
//! 2 MiB on, is a fresh mapping starting on a 2 MiB boundary, so
//! transparent huge pages back all of it but its last partial page.
//!
//! At batch 1 a forward streams its packed weights once (ResNet50's take
//! ~100 MB, ResNet18's ~90 MiB with the Winograd transforms); 2 MiB pages
//! need 1/512 of the TLB entries 4 KiB pages do, and a page walk per 4 KiB
//! of weights stalls the micro-tiles. A `Vec` of a few MiB placed anywhere
//! by the allocator holds one whole aligned 2 MiB page or none: on the
//! Intel Xeon VM a third of ResNet50's weight memory was on huge pages
//! that way (76 of 223 MiB in `smaps`), and how much varied from one
//! compile to the next (two heap-placed compiles of ResNet18 in one
//! process: the second ran 0.90x the first's time; two aligned ones 1.01x).
//! Aligned against the allocator's placement, forwards of the two compiled
//! models alternating in one process, each order once (twenty-second
//! session, Intel Xeon VM, 2 threads): ResNet18 batch 1 0.87-0.91x the
//! time, ResNet34 batch 1 0.93-0.95x, ResNet50 batch 1 0.92-0.96x;
//! batch 10 0.96-0.98x (ResNet18/34/50); the mobile models, whose weights
//! lie mostly in buffers under 2 MiB, level (0.97-1.03x).
//!
//! Before it maps fresh memory, a buffer asks glibc to return the heap
//! memory freed so far (`malloc_trim`): compiling packs conv after conv
//! and drops each source weight, whose heap memory the allocator would
//! otherwise keep resident beside the new mappings (ResNet34 at batch 10:
//! peak RSS 401 MiB aligned without the trim, 309 with it, 327 as the
//! allocator placed the weights; with THP off too, so not the huge pages).
//! Compiling takes longer for it (ResNet34 at batch 1: 0.78-0.87 s against
//! 0.60-0.79 s, the memory given back faulted in again as it is reused).

use super::data::advise_huge_pages;
use candle_core::bail;
use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Bytes of a transparent huge page on x86-64 and the start alignment of
/// a weight buffer at least that large.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const HUGE_PAGE: usize = 2 << 20;
/// Bytes of a small page: what a mapping's length is rounded to.
#[cfg(target_os = "linux")]
const PAGE: usize = 4096;
/// The start alignment of a smaller weight buffer: a cache line.
const LINE: usize = 64;

/// A zeroed buffer of f32 packed weights, aligned for huge pages where it
/// spans one ([`WeightBuffer::zeroed`]); derefs to its values.
pub(crate) struct WeightBuffer {
    ptr: NonNull<f32>,
    len: usize,
    backing: Backing,
}

/// Where a [`WeightBuffer`]'s memory came from, to give it back there.
enum Backing {
    /// Nothing allocated (an empty buffer).
    None,
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping of this many bytes from `ptr` (Linux).
    #[cfg(target_os = "linux")]
    Mapped(usize),
}

// SAFETY: the buffer owns its memory exclusively, as a `Vec<f32>` does;
// shared access only reads it.
unsafe impl Send for WeightBuffer {}
// SAFETY: as above: `&WeightBuffer` hands out only `&[f32]`.
unsafe impl Sync for WeightBuffer {}

impl WeightBuffer {
    /// `len` zeros, or an error naming `what` when the size overflows or
    /// the memory is refused. On Linux a buffer of 2 MiB or more is a
    /// fresh anonymous mapping that starts on a 2 MiB boundary, advised
    /// onto huge pages ([`advise_huge_pages`]); its pages are zero until
    /// written and take no memory before. Smaller ones (and every one
    /// elsewhere) come zeroed from the global allocator, on a cache line.
    pub(crate) fn zeroed(len: usize, what: &str) -> candle_core::Result<Self> {
        let Some(bytes) = len.checked_mul(std::mem::size_of::<f32>()) else {
            bail!("cannot allocate {len} f32 values for the {what}: too large")
        };
        if bytes == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
                backing: Backing::None,
            });
        }
        #[cfg(target_os = "linux")]
        if bytes >= HUGE_PAGE {
            return Self::mapped(len, bytes, what);
        }
        let Ok(layout) = Layout::from_size_align(bytes, LINE) else {
            bail!("cannot allocate {len} f32 values for the {what}: too large")
        };
        // SAFETY: `layout` has a non-zero size.
        let Some(ptr) = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>()) else {
            bail!("cannot allocate {len} f32 values for the {what}")
        };
        Ok(Self {
            ptr,
            len,
            backing: Backing::Heap(layout),
        })
    }

    /// `len` zeros (`bytes` bytes, at least a huge page) in a mapping that
    /// starts on a huge-page boundary: a huge page more is mapped and the
    /// parts before the boundary and after the buffer's last page unmapped.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize, bytes: usize, what: &str) -> candle_core::Result<Self> {
        let too_large = || format!("cannot allocate {len} f32 values for the {what}: too large");
        let Some(kept) = bytes.checked_next_multiple_of(PAGE) else {
            bail!("{}", too_large())
        };
        let Some(asked) = kept.checked_add(HUGE_PAGE) else {
            bail!("{}", too_large())
        };
        // Give the heap's free memory back first (see the module's doc).
        #[cfg(target_env = "gnu")]
        // SAFETY: glibc's call; it returns free heap memory to the system
        // and touches no allocated block.
        unsafe {
            libc::malloc_trim(0);
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                asked,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("cannot allocate {len} f32 values for the {what}")
        }
        let start = base as usize;
        // Within the mapping, which is a huge page longer than `kept`.
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (aligned - start, asked - (aligned - start) - kept);
        // SAFETY: both ranges are page-aligned parts of the mapping made
        // above, outside `aligned..aligned + kept`, which nothing else uses.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((aligned + kept) as *mut libc::c_void, tail);
            }
        }
        let Some(ptr) = NonNull::new(aligned as *mut f32) else {
            bail!("cannot allocate {len} f32 values for the {what}")
        };
        advise_huge_pages(ptr.as_ptr(), len);
        Ok(Self {
            ptr,
            len,
            backing: Backing::Mapped(kept),
        })
    }
}

impl Deref for WeightBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` holds `len` initialised values (dangling and 0 when
        // empty, which a slice allows), owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for WeightBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for WeightBuffer {
    fn drop(&mut self) {
        match self.backing {
            Backing::None => {}
            // SAFETY: allocated in `zeroed` with this layout, freed once.
            Backing::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            // SAFETY: the part of the mapping `mapped` kept, unmapped once.
            #[cfg(target_os = "linux")]
            Backing::Mapped(bytes) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), bytes);
            },
        }
    }
}

impl std::fmt::Debug for WeightBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuffer({} values)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer is zeroed and writable end to end, whatever its size,
    /// and one spanning a huge page starts on a 2 MiB boundary (Linux),
    /// a smaller one on a cache line.
    #[test]
    fn zeroed_writable_and_aligned() {
        for len in [0, 1, 1000, HUGE_PAGE / 4 - 1, HUGE_PAGE / 4, (3 << 20) + 17] {
            let mut b = WeightBuffer::zeroed(len, "test weights").unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            b.iter_mut().for_each(|v| *v = 1.0);
            assert!(b.iter().all(|&v| v == 1.0));
            let align = match len * 4 >= HUGE_PAGE && cfg!(target_os = "linux") {
                true => HUGE_PAGE,
                false => LINE,
            };
            // (An empty buffer has no memory to align.)
            assert!(len == 0 || (b.as_ptr() as usize).is_multiple_of(align), "{len} values");
        }
    }

    /// A size past the address space is an error naming the buffer, not an
    /// abort or an overflow.
    #[test]
    fn refused_sizes_are_errors() {
        for len in [usize::MAX, usize::MAX / 4, usize::MAX / 8, usize::MAX / 16] {
            let err = WeightBuffer::zeroed(len, "test weights").unwrap_err();
            assert!(err.to_string().contains("test weights"), "{err}");
        }
    }
}
