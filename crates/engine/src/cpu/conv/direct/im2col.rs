//! A block's im2col columns: one row at a time, or a 3-wide stride-2
//! kernel row's three taps together, compiled for the path.

use super::{Block, Run, Segment};
use crate::cpu::data::{gather_stride2_taps3, gather_strided_on};
use crate::cpu::gemm::{Isa, IsaBody};
use crate::cpu::parallel::{for_each, per_task};
use crate::cpu::prefetch;

impl Run<'_> {
    /// The block's im2col columns into `v` (`[C·kh·kw, cols]`), their rows
    /// shared by the threads with `split`.
    pub(super) fn im2col_rows(&self, block: &Block, v: &mut [f32]) {
        let cols = block.cols;
        let v = &mut v[..self.conv.depth() * cols];
        if self.split {
            // im2col rows are independent: share them too.
            let per = per_task(self.conv.depth(), 4);
            for_each(v.chunks_mut(per * cols).enumerate(), |(i, v)| {
                self.im2col(block, i * per, v)
            });
        } else {
            self.im2col(block, 0, v);
        }
    }

    /// Fills rows of `v` (`[C·kh·kw, cols]`) with the block's columns;
    /// zeros for padding and for the columns past the block's pixels.
    /// `v` holds rows `first_row..` (a whole number of `cols`-long rows).
    pub(super) fn im2col(&self, block: &Block, first_row: usize, v: &mut [f32]) {
        // Compiled for the path: its stride-2 gather vectorises with the
        // path's shuffles (as baseline SSE it took a fifth of
        // MobileNetV2's stem conv).
        self.conv.isa().run(Im2col {
            run: self,
            block,
            first_row,
            v,
        })
    }

    /// The im2col rows from `first_row` into `v`: three at a time where a
    /// 3-wide stride-2 kernel row's taps start ([`Self::taps3_applies`]),
    /// else one by one.
    #[inline(always)]
    pub(super) fn im2col_body(&self, block: &Block, first_row: usize, v: &mut [f32]) {
        let cols = block.cols;
        let rows = v.len() / cols.max(1);
        let taps3 = self.taps3_applies();
        let mut r = 0;
        while r < rows {
            let row = first_row + r;
            let v = &mut v[r * cols..];
            if taps3 && row.is_multiple_of(3) && r + 3 <= rows {
                self.im2col_taps3(block, row, &mut v[..3 * cols]);
                r += 3;
            } else {
                self.im2col_row(block, row, &mut v[..cols]);
                r += 1;
            }
        }
    }

    /// Whether the im2col rows of a kernel row's three taps are gathered
    /// together ([`gather_stride2_taps3`]): a 3-wide kernel at stride 2,
    /// dilation 1 (ResNet's and the MobileNets' stride-2 convs) on
    /// AVX-512, where each tap's own gather and edge fills took half of
    /// im2col's time and im2col a quarter of ResNet18's layer2.0.conv1.
    pub(super) fn taps3_applies(&self) -> bool {
        let (a, [_, kw]) = (&self.conv.spec.attrs, self.conv.spec.kernel);
        kw == 3 && a.stride[1] == 2 && a.dilation[1] == 1 && self.conv.isa() == Isa::Avx512
    }

    /// Rows `row..row + 3` of im2col (`row` a multiple of 3: one input
    /// channel's kernel row `ky`, taps 0, 1, 2) into `v` (three rows of
    /// `block.cols`), each segment's input row read once for the three.
    #[inline(always)]
    pub(super) fn im2col_taps3(&self, block: &Block, row: usize, v: &mut [f32]) {
        let (s, a, [kh, kw]) = (&self.shape, &self.conv.spec.attrs, self.conv.spec.kernel);
        let plane = s.in_plane();
        let (c, ky) = (row / (kh * kw), row / kw % kh);
        let (v0, rest) = v.split_at_mut(block.cols);
        let (v1, v2) = rest.split_at_mut(block.cols);
        for seg in &block.segments {
            let span = seg.col..seg.col + seg.x1 - seg.x0;
            let outs = [&mut v0[span.clone()], &mut v1[span.clone()], &mut v2[span]];
            let Some(line) = self.input_line(seg, c, ky) else {
                outs.into_iter().for_each(|out| out.fill(0.0));
                continue;
            };
            // The next channel's line, as for single rows.
            prefetch::read_span(line.as_ptr().wrapping_add(plane), s.width);
            let start = (2 * seg.x0) as isize - a.padding[1] as isize;
            gather_stride2_taps3(Isa::Avx512, line, start, outs);
        }
        for v in [v0, v1, v2] {
            v[block.pixels..].fill(0.0);
        }
    }

    /// The input row that kernel row `ky` of channel `c` reads for the
    /// segment's output row, or `None` where it lies in the padding.
    #[inline(always)]
    pub(super) fn input_line(&self, seg: &Segment, c: usize, ky: usize) -> Option<&[f32]> {
        let (s, a) = (&self.shape, &self.conv.spec.attrs);
        let iy = (seg.y * a.stride[0] + ky * a.dilation[0]) as isize - a.padding[0] as isize;
        if iy < 0 || iy >= s.height as isize {
            return None;
        }
        Some(&self.input[(seg.image * s.channels + c) * s.in_plane() + iy as usize * s.width..][..s.width])
    }

    /// Row `row` of im2col into `v` (`block.cols` values).
    #[inline(always)]
    pub(super) fn im2col_row(&self, block: &Block, row: usize, v: &mut [f32]) {
        let (s, a, [kh, kw]) = (&self.shape, &self.conv.spec.attrs, self.conv.spec.kernel);
        let plane = s.in_plane();
        let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
        let dx = (kx * a.dilation[1]) as isize - a.padding[1] as isize;
        // Output columns whose input column ox·sw + dx lies in 0..W
        // (per im2col row: the divisions cost more than a segment's copy).
        let sw = a.stride[1] as isize;
        let lo_all = ((-dx).max(0) + sw - 1) / sw;
        let hi_all = ((s.width as isize - dx).max(0) + sw - 1) / sw;
        for seg in &block.segments {
            let out = &mut v[seg.col..seg.col + seg.x1 - seg.x0];
            let Some(line) = self.input_line(seg, c, ky) else {
                out.fill(0.0);
                continue;
            };
            if kx == 0 {
                // The next channel's line, which rows `kw` on read
                // (a hint: past the input's end for the last channel).
                // Each channel's lines for a block are a few KiB a
                // plane apart, too short a run for the hardware
                // prefetchers: ResNet50's 1×1 stride-2 downsample
                // 256 -> 512 onto 28×28 alone 0.95× the time at batch
                // 1, 0.93× at batch 10, its 3×3 stride-2 conv onto
                // 28×28 0.98× and 0.94× (Zen 4, `xtask compare`, 400
                // and 40 pairs); in the model at batch 1 the
                // downsample 0.92×, the forwards level.
                prefetch::read_span(line.as_ptr().wrapping_add(plane), s.width);
            }
            let (lo, hi) = (
                (lo_all as usize).clamp(seg.x0, seg.x1),
                (hi_all as usize).clamp(seg.x0, seg.x1),
            );
            let hi = hi.max(lo);
            out[..lo - seg.x0].fill(0.0);
            out[hi - seg.x0..].fill(0.0);
            let inside = &mut out[lo - seg.x0..hi - seg.x0];
            if inside.is_empty() {
                continue;
            }
            // lo..hi keeps ix = ox·sw + dx within 0..W.
            let start = (lo as isize * sw + dx) as usize;
            gather_strided_on(self.conv.isa(), &line[start..], sw as usize, inside);
        }
        v[block.pixels..].fill(0.0);
    }
}

/// [`Run::im2col`] as a body for [`crate::cpu::gemm::Isa::run`].
struct Im2col<'a, 'r> {
    run: &'a Run<'r>,
    block: &'a Block,
    first_row: usize,
    v: &'a mut [f32],
}

impl IsaBody for Im2col<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.im2col_body(self.block, self.first_row, self.v)
    }
}
