//! Activation buffers reused across a forward's steps and across forwards,
//! instead of a fresh allocation per step: a [`BufferPool`] per compiled
//! model, made the current thread's pool for the length of a forward
//! ([`with_pool`]); the executor hands it each dead value its CPU kernels
//! made ([`reclaim`]) and their output buffers come from it
//! ([`take`], through [`super::output::Output::new`]).
//!
//! Without it, every output past glibc's 32 MiB mmap threshold was fresh
//! mmap memory, faulted in 4 KiB at a time on every forward: MobileNetV2
//! at batch 10 took ~23 k page faults and ~30% of its time that way on
//! Zen 4 (115-130 ms a forward against 79-84 ms with glibc's threshold
//! raised by hand).
//!
//! Sound only for values no one else holds: the plan recycles a value only
//! when a CPU kernel made it and only CPU kernels read it (their outputs
//! are always fresh storage, never a view of an operand), and never a
//! graph input or output.

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use std::cell::RefCell;
use std::sync::Mutex;

/// Free f32 buffers (length 0, capacity kept), at most `cap_bytes` in all.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    buffers: Vec<Vec<f32>>,
    bytes: usize,
    cap_bytes: usize,
    /// Whether [`take`] draws from the pool now (see [`drawing`]).
    draw: bool,
    /// Requests of at least [`SMALL`] values made while drawing that found
    /// no buffer (each a fresh allocation, faulted in page by page).
    misses: usize,
}

/// The most buffers a pool keeps. A warm forward takes back what it
/// returns (a few dozen buffers); a value whose buffer came from elsewhere
/// (a kernel's own heap allocation) is given to the pool too, and a pool
/// that kept every one grew by those each forward up to its byte cap, its
/// [`BufferPool::take`] scanning them all: MobileNetV3-Large at batch 1
/// held ~280 buffers after 30 forwards, EfficientNet-B0 ~490, and past a
/// hundred forwards took 1.06-1.08x and 1.03x the time of a pool without
/// them (Zen 4, `xtask compare` with 100 warm-up forwards, 400 pairs).
const MAX_BUFFERS: usize = 128;

/// Requests under this many values (64 KiB) come from the allocator's
/// heap cheaply; they are not given buffers over four times that.
const SMALL: usize = 1 << 14;

impl BufferPool {
    /// An empty pool that keeps at most `cap_bytes` of buffers.
    pub(crate) fn new(cap_bytes: usize) -> Self {
        Self {
            buffers: Vec::new(),
            bytes: 0,
            cap_bytes,
            draw: false,
            misses: 0,
        }
    }

    /// How many buffers the pool holds (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buffers.len()
    }

    /// How many requests of at least [`SMALL`] values found no buffer while
    /// drawing, over the pool's life: on a warm pool, a forward that
    /// returns every buffer it was lent adds none.
    pub(crate) fn misses(&self) -> usize {
        self.misses
    }

    /// The smallest buffer with room for `len` values, if any; a small
    /// request (under [`SMALL`] values) only takes a small buffer. (Only
    /// buffers within a quarter of `len` left MobileNetV2 at batch 10
    /// allocating 185 MiB peak with 8.8 k page faults a forward, against
    /// 134 MiB and none: a CNN's activations shrink and grow again. But a
    /// squeeze-and-excitation vector that takes an activation's buffer
    /// leaves the next activation to fault in fresh pages.)
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        if !self.draw {
            return None;
        }
        let fits = |b: &Vec<f32>| b.capacity() >= len && (len >= SMALL || b.capacity() <= 4 * SMALL);
        let found = self
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| fits(b))
            .min_by_key(|(_, b)| b.capacity());
        let Some((index, _)) = found else {
            self.misses += usize::from(len >= SMALL);
            return None;
        };
        let buffer = self.buffers.swap_remove(index);
        self.bytes -= buffer.capacity() * 4;
        Some(buffer)
    }

    /// Keeps `buffer` (emptied) unless that would pass the cap or
    /// [`MAX_BUFFERS`].
    fn put(&mut self, mut buffer: Vec<f32>) {
        let bytes = buffer.capacity() * 4;
        if bytes == 0 || self.bytes.saturating_add(bytes) > self.cap_bytes || self.buffers.len() >= MAX_BUFFERS {
            return;
        }
        buffer.clear();
        self.bytes += bytes;
        self.buffers.push(buffer);
    }
}

thread_local! {
    /// The pool of the forward running on this thread, if any.
    static CURRENT: RefCell<Option<BufferPool>> = const { RefCell::new(None) };
}

/// Runs `f` with `pool` as this thread's pool and returns the pool as `f`
/// left it. Nested calls (a forward run by a rayon worker while it waits
/// inside another) see their own pool and restore the outer one after.
pub(crate) fn with_pool<R>(pool: BufferPool, f: impl FnOnce() -> R) -> (R, BufferPool) {
    /// Puts the outer pool back when dropped, also when `f` unwinds.
    struct Restore(Option<BufferPool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            CURRENT.with(|c| c.replace(outer));
        }
    }
    let restore = Restore(CURRENT.with(|c| c.replace(Some(pool))));
    let result = f();
    let pool = CURRENT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (result, pool)
}

/// Runs `f` (one step of a forward) with the current pool, if any, lending
/// buffers for its output or not, as `draw` says; values are reclaimed
/// either way.
pub(crate) fn drawing<R>(draw: bool, f: impl FnOnce() -> R) -> R {
    let set = |draw: bool| {
        CURRENT.with(|c| {
            if let Some(pool) = c.borrow_mut().as_mut() {
                pool.draw = draw;
            }
        })
    };
    set(draw);
    let result = f();
    set(false);
    result
}

/// A buffer with room for `len` values from this thread's pool, if one is
/// current, lending (see [`drawing`]) and holds a fitting buffer.
pub(crate) fn take(len: usize) -> Option<Vec<f32>> {
    CURRENT.with(|c| c.borrow_mut().as_mut()?.take(len))
}

/// Gives the storage of `value` (a CPU f32 tensor nothing else holds: see
/// the module doc) to this thread's pool, if one is current; otherwise, or
/// for any other tensor, just drops it.
pub(crate) fn reclaim(value: Tensor) {
    let current = CURRENT.with(|c| c.borrow().is_some());
    if !current || !value.device().is_cpu() {
        return;
    }
    let taken = TakeStorage(Mutex::new(None));
    if value.inplace_op1(&taken).is_err() {
        return;
    }
    if let Some(buffer) = taken.0.into_inner().ok().flatten() {
        CURRENT.with(|c| {
            if let Some(pool) = c.borrow_mut().as_mut() {
                pool.put(buffer);
            }
        });
    }
}

/// Moves an f32 CPU storage's buffer out (leaving it empty).
struct TakeStorage(Mutex<Option<Vec<f32>>>);

impl InplaceOp1 for TakeStorage {
    fn name(&self) -> &'static str {
        "wick-reclaim"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        if let CpuStorage::F32(buffer) = storage {
            if let Ok(mut slot) = self.0.lock() {
                *slot = Some(std::mem::take(buffer));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A reclaimed tensor's buffer comes back for a request it fits, only
    /// while a pool is current and lending; nested pools are separate and
    /// the outer one is restored.
    #[test]
    fn buffers_come_back() {
        let t = Tensor::from_vec(vec![1f32; 1000], 1000, &Device::Cpu).unwrap();
        reclaim(t.clone());
        assert!(take(1000).is_none(), "no pool current");
        let ((), pool) = with_pool(BufferPool::new(1 << 20), || {
            let t = Tensor::from_vec(vec![1f32; 1000], 1000, &Device::Cpu).unwrap();
            reclaim(t);
            assert!(take(900).is_none(), "not lending outside a drawing step");
            let ((), inner) = with_pool(BufferPool::new(1 << 20), || {
                drawing(true, || assert!(take(900).is_none()))
            });
            assert!(inner.buffers.is_empty());
            assert!(drawing(true, || take(1001)).is_none(), "too small");
            let b = drawing(true, || take(900)).expect("the reclaimed buffer");
            assert!(b.capacity() >= 1000 && b.is_empty());
        });
        assert!(pool.buffers.is_empty() && pool.bytes == 0);
        assert!(take(900).is_none(), "the pool is gone with its forward");
    }

    /// The cap bounds what a pool keeps.
    #[test]
    fn the_cap_holds() {
        let mut pool = BufferPool::new(4000);
        pool.put(vec![0f32; 800]);
        pool.put(vec![0f32; 800]);
        assert_eq!(pool.buffers.len(), 1);
        assert_eq!(pool.bytes, 3200);
        let mut pool = BufferPool::new(usize::MAX);
        for _ in 0..MAX_BUFFERS + 5 {
            pool.put(vec![0f32; 8]);
        }
        assert_eq!(pool.len(), MAX_BUFFERS);
        assert_eq!(pool.bytes, MAX_BUFFERS * 32);
    }

    /// The smallest fitting buffer is taken; a small request never takes a
    /// large buffer (it would leave the next large output without one).
    #[test]
    fn small_requests_take_small_buffers() {
        let mut pool = BufferPool::new(usize::MAX);
        pool.draw = true;
        pool.put(vec![0f32; 8 * SMALL]);
        assert!(pool.take(100).is_none(), "a small request took a large buffer");
        pool.put(vec![0f32; 2 * SMALL]);
        assert_eq!(pool.take(100).map(|b| b.capacity()), Some(2 * SMALL));
        assert_eq!(pool.take(5 * SMALL).map(|b| b.capacity()), Some(8 * SMALL));
        assert!(pool.take(1).is_none(), "the pool is empty");
    }
}
