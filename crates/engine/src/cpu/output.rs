//! A CPU kernel's output buffer whose values start on a cache line: the
//! tensor made from it is a view that skips the buffer's first few values.
//!
//! glibc's `malloc` returns large blocks 16 bytes past a page (and heap
//! blocks 16-byte aligned), so an output plane's first value sat 16 or 32
//! bytes into a cache line, and so did every 64-byte AVX-512 vector the
//! kernels store to it and the next kernel loads from it: each one touched
//! two lines. Starting the values on a line instead, on the Intel Xeon VM
//! (AVX-512, 2 threads; a noisy host, whole forwards in A B B A order,
//! against the unaligned buffers): MobileNetV2 at batch 1 0.93× (median of
//! six pairs) to 0.98× (mean of twelve runs each), at batch 10 0.95×,
//! EfficientNet-B0 at batch 1 0.94×, ResNet50 at batch 1 0.975×, ResNet18
//! at batch 1 0.95× summed over its nodes (no node slower; the 1×1 convs
//! at layer1 of ResNet50 0.75-0.94×, reading the planes in place). A `Vec<f32>`
//! cannot be allocated aligned (it frees with the layout of `f32`), so the
//! buffer holds up to [`CACHE_LINE_FLOATS`]` - 1` extra values in front.
//!
//! A fresh buffer of 2 MiB or more is advised onto transparent huge pages
//! ([`advise_huge_pages`]), as packed weights are: the kernels read and
//! write NCHW planes a plane apart (a 1×1 conv's input and output rows,
//! each 12 KiB on a 56×56 plane), one 4 KiB page per row, more pages than
//! the first-level TLB holds; recycled buffers keep their pages from one
//! forward to the next. Alternating per-node profiles on the Intel Xeon VM
//! (AVX-512, 2 threads, a noisy host): ResNet50 at batch 1 0.93-0.99× the
//! time in four runs of 4-6 rounds (its residual 1×1 convs 0.94-0.96×);
//! MobileNetV2 at batch 1 and 10, MobileNetV3-Large and EfficientNet-B0
//! at batch 1, ResNet50 at batch 10 and ResNet18 at batch 1 level
//! (0.98-1.03×, MobileNetV2 at batch 10 once 0.91×); peak RSS within 5
//! MiB (ResNet50 at batch 1: 149 -> 155 MiB, at batch 10 172 -> 170).

use super::data::{advise_huge_pages, line_offset, SharedOut, CACHE_LINE_FLOATS};
use super::recycle;
use candle_core::{bail, Device, Tensor};
use std::mem::MaybeUninit;

/// An output buffer: zeros up to the first value on a cache line
/// (`offset`), then the output's values as they are written.
#[derive(Debug)]
pub(crate) struct Output {
    /// `offset` zeros, then the values written so far; room for
    /// `offset + len` values.
    buffer: Vec<f32>,
    offset: usize,
}

impl Output {
    /// A buffer with room for `len` values on a cache line, from the
    /// current forward's pool when it holds one that fits
    /// ([`super::recycle`]), or an error naming `what` when the allocation
    /// is refused: a size that came from outside ends in an error, never
    /// in an abort.
    pub(crate) fn new(len: usize, what: &str) -> candle_core::Result<Self> {
        let Some(room) = len.checked_add(CACHE_LINE_FLOATS - 1) else {
            bail!("cannot allocate {len} f32 values for the {what}")
        };
        let mut buffer = match recycle::take(room) {
            Some(buffer) => buffer,
            None => {
                let mut buffer = Vec::new();
                if buffer.try_reserve_exact(room).is_err() {
                    bail!("cannot allocate {len} f32 values for the {what}")
                }
                advise_huge_pages(buffer.as_ptr(), room);
                buffer
            }
        };
        // Within the room reserved above (an empty allocation has none).
        let offset = match buffer.capacity() {
            0 => 0,
            _ => line_offset(buffer.as_ptr()),
        };
        buffer.clear();
        buffer.resize(offset, 0.0);
        Ok(Self { buffer, offset })
    }

    /// Where the values start in the buffer (tests).
    #[cfg(test)]
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    /// The first `len` values' places, for tasks that write disjoint parts
    /// of them; then [`Output::assume_written`]. Panics when the buffer
    /// holds fewer.
    pub(crate) fn shared(&mut self, len: usize) -> SharedOut {
        let room = self.buffer.capacity() - self.offset;
        assert!(len <= room, "{len} outputs in a buffer of {room}");
        // SAFETY: `offset + len <= capacity`: the values lie in the
        // buffer's allocation, which stays in place until the buffer grows
        // or is dropped; the kernels write through the result before
        // either (as with [`SharedOut::new`]).
        unsafe { SharedOut::from_raw(self.buffer.as_mut_ptr().add(self.offset), len) }
    }

    /// Marks the first `len` values written.
    ///
    /// # Safety
    /// All `len` of them were written (through [`Output::shared`] or
    /// [`Output::spare`]), and the buffer has room for them.
    pub(crate) unsafe fn assume_written(&mut self, len: usize) {
        debug_assert!(self.offset + len <= self.buffer.capacity());
        // SAFETY: the head is initialised (zeros) and the caller wrote the rest.
        unsafe { self.buffer.set_len(self.offset + len) }
    }

    /// The uninitialised places past the values written so far.
    pub(crate) fn spare(&mut self) -> &mut [MaybeUninit<f32>] {
        self.buffer.spare_capacity_mut()
    }

    /// How many more values fit without growing the buffer.
    pub(crate) fn room(&self) -> usize {
        self.buffer.capacity() - self.buffer.len()
    }

    /// Appends `values`.
    pub(crate) fn extend_from_slice(&mut self, values: &[f32]) {
        self.buffer.extend_from_slice(values);
    }

    /// Appends the values of `values`.
    pub(crate) fn extend(&mut self, values: impl IntoIterator<Item = f32>) {
        self.buffer.extend(values);
    }

    /// Sets the values to `len` copies of `value`.
    pub(crate) fn fill(&mut self, len: usize, value: f32) {
        self.buffer.truncate(self.offset);
        self.buffer.resize(self.offset + len, value);
    }

    /// The values written so far.
    pub(crate) fn values_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[self.offset..]
    }

    /// The values as a CPU tensor of shape `dims` (which must hold as many
    /// values): a view of the buffer from the first value on.
    pub(crate) fn into_tensor(self, dims: &[usize]) -> candle_core::Result<Tensor> {
        let Self { buffer, offset } = self;
        if offset == 0 {
            return Tensor::from_vec(buffer, dims, &Device::Cpu);
        }
        let len = buffer.len() - offset;
        let all = buffer.len();
        Tensor::from_vec(buffer, all, &Device::Cpu)?
            .narrow(0, offset, len)?
            .reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values start on a cache line and the tensor holds exactly them,
    /// however they were written; a size too large is an error.
    #[test]
    fn outputs_start_on_a_cache_line() {
        for len in [0, 1, 17, 1000, 100_000] {
            let mut out = Output::new(len, "test output").unwrap();
            let shared = out.shared(len);
            if len > 0 {
                assert_eq!(shared.ptr_at(0) as usize % (CACHE_LINE_FLOATS * 4), 0, "{len}");
            }
            for i in 0..len {
                // SAFETY: one value at a time, inside the buffer.
                let value = unsafe { shared.slice(i, 1) };
                value[0] = i as f32;
            }
            // SAFETY: every value was written above.
            unsafe { out.assume_written(len) };
            let t = out.into_tensor(&[len]).unwrap();
            let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
            assert_eq!(t.to_vec1::<f32>().unwrap(), want);
            assert!(t.is_contiguous());
        }
        let mut out = Output::new(6, "x").unwrap();
        out.extend_from_slice(&[1.0, 2.0]);
        out.values_mut()[1] = 5.0;
        out.extend_from_slice(&[3.0, 4.0, 5.0, 6.0]);
        let t = out.into_tensor(&[2, 3]).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[1.0, 5.0, 3.0], [4.0, 5.0, 6.0]]);
        let mut out = Output::new(4, "x").unwrap();
        out.fill(4, 2.0);
        assert_eq!(out.into_tensor(&[4]).unwrap().to_vec1::<f32>().unwrap(), [2.0; 4]);
        let err = Output::new(usize::MAX / 2, "test output").unwrap_err();
        assert!(err.to_string().contains("test output"), "{err}");
        assert!(Output::new(usize::MAX, "test output").is_err());
    }

    /// Asking for more values than the buffer has room for panics before
    /// any write.
    #[test]
    #[should_panic(expected = "in a buffer of")]
    fn shared_needs_the_room() {
        let mut out = Output::new(4, "x").unwrap();
        let room = out.buffer.capacity() - out.offset() + 1;
        let _ = out.shared(room);
    }
}
