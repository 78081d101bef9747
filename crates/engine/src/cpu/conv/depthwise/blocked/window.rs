//! The window of input rows a fused conv of a small kernel (the mobile
//! models' stems) reads per band: copied into scratch with its padding,
//! each position's values then read through a table of tap offsets.

use std::ops::Range;
use wick_ir::Conv2dAttrs;

/// The window a fused conv of more than one tap (or with a stride or
/// padding) reads for each output position: per band, the input rows its
/// output rows read are copied into scratch with their zero padding
/// (`[C][rows][W + 2·pw]`), and each position's `C·kh·kw` values are read
/// there through a table of tap offsets, a stride apart from one position
/// to the next. (Gathering each tap's values for the band's positions
/// instead, `[C·kh·kw][positions]`, wrote 27 values per position where the
/// copy writes about 2, and took 11% of MobileNetV2's first step on
/// AVX-512 and 21% with AVX2 forced, `perf`; read from the copy, that
/// step in the model took 0.84× the time on AVX-512 and 0.81× with AVX2
/// forced, Zen 4, profiles of the two builds alternating.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// The conv's input channels.
    pub(crate) channels: usize,
    /// Its input `[H, W]`.
    pub(crate) size: [usize; 2],
    /// `[kh, kw]`.
    pub(crate) kernel: [usize; 2],
    /// Its stride, padding and dilation (one group).
    pub(crate) attrs: Conv2dAttrs,
}

impl Window {
    /// The conv's output `[OH, OW]` (the depthwise conv's input), or
    /// `None` where a size overflows or the window is larger than the
    /// padded input.
    pub(super) fn output(&self) -> Option<[usize; 2]> {
        let side = |axis: usize| {
            let padded = self.size[axis].checked_add(self.attrs.padding[axis].checked_mul(2)?)?;
            let reach = (self.kernel[axis].checked_sub(1)?).checked_mul(self.attrs.dilation[axis])?;
            Some(padded.checked_sub(reach.checked_add(1)?)? / self.attrs.stride[axis].max(1) + 1)
        };
        Some([side(0)?, side(1)?])
    }

    /// Values of a padded input row in the copy: `W + 2·pw` (within
    /// `usize`: [`ExpandWeights::new`](super::ExpandWeights::new) checked the output's sizes).
    pub(super) fn pitch(&self) -> usize {
        self.size[1] + 2 * self.attrs.padding[1]
    }

    /// Values of the copy ([`Self::copy`]) for `rows` output rows, `[C]
    /// [rows_in][pitch]` with `rows_in` the input rows (padding included)
    /// they read, if that does not overflow.
    pub(super) fn copy_len(&self, rows: usize) -> Option<usize> {
        let a = self.attrs;
        let rows_in = rows
            .saturating_sub(1)
            .checked_mul(a.stride[0])?
            .checked_add(self.kernel[0].checked_sub(1)?.checked_mul(a.dilation[0])?)?
            .checked_add(1)?;
        self.channels.checked_mul(rows_in)?.checked_mul(self.pitch())
    }

    /// Copies the input rows that output rows `rows` read from `x` (one
    /// image's `channels` planes `[H, W]`) into `out` (`[C][rows_in]
    /// [pitch]`, [`Self::copy_len`] values) with zeros in the padding, and
    /// returns the values of one channel's rows there.
    pub(super) fn copy(&self, x: &[f32], rows: Range<usize>, out: &mut [f32]) -> usize {
        let [height, width] = self.size;
        let (pitch, [ph, pw]) = (self.pitch(), self.attrs.padding);
        let plane = out.len() / self.channels.max(1);
        let top = rows.start * self.attrs.stride[0];
        for (c, copy) in out.chunks_exact_mut(plane.max(1)).take(self.channels).enumerate() {
            for (r, line) in copy.chunks_exact_mut(pitch.max(1)).enumerate() {
                // Padded input row `top + r`: input row `top + r − ph`, if any.
                match (top + r).checked_sub(ph).filter(|&y| y < height) {
                    Some(y) => {
                        line[..pw].fill(0.0);
                        line[pw..pw + width].copy_from_slice(&x[(c * height + y) * width..][..width]);
                        line[pw + width..].fill(0.0);
                    }
                    None => line.fill(0.0),
                }
            }
        }
        plane
    }

    /// Where value `k` (channel, tap row, tap column) of the window at
    /// output row 0, column 0 of a copy lies, for copies of `plane` values
    /// a channel; `depth` entries of the result hold them.
    pub(super) fn taps(&self, plane: usize) -> [usize; MAX_WINDOW_DEPTH] {
        let ([kh, kw], a, pitch) = (self.kernel, self.attrs, self.pitch());
        let mut taps = [0; MAX_WINDOW_DEPTH];
        let all = (0..self.channels).flat_map(|c| (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (c, ky, kx))));
        for (tap, (c, ky, kx)) in taps.iter_mut().zip(all) {
            *tap = c * plane + ky * a.dilation[0] * pitch + kx * a.dilation[1];
        }
        taps
    }
}

/// Most values a [`Window`] reads per position (`C·kh·kw`): the stems
/// of the MobileNets and EfficientNets read 27.
pub(crate) const MAX_WINDOW_DEPTH: usize = 64;
