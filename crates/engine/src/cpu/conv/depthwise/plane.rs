//! The plane-wise depthwise conv's pieces: a plane copied into padded
//! scratch split by column phase, and the output cut into segments of a
//! row, four at a time, summed over the taps in registers.

use crate::cpu::gemm::IsaBody;
use std::mem::MaybeUninit;
use wick_ir::Activation;

/// One input plane copied into the zero-padded scratch, its columns split
/// by phase modulo the stride: phase `p` holds padded columns `p, p + s,
/// p + 2s, ...`. Only the interior is written (the padding stays zero).
pub(super) struct Split<'a> {
    pub(super) input: &'a [f32],
    pub(super) width: usize,
    pub(super) scratch: &'a mut [f32],
    pub(super) phase_len: usize,
    pub(super) phase_width: usize,
    pub(super) padding: [usize; 2],
    pub(super) stride: usize,
}

impl IsaBody for Split<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (s, pad) = (self.stride, self.padding[1]);
        // Phase by phase, its constants worked out once (divisions per
        // row cost more than the copies of small planes): the first input
        // column of the phase (padded column x + pad ≡ phase mod stride),
        // where it goes in a padded row, and how many columns it takes.
        for phase in 0..s {
            let first = (phase + s - pad % s) % s;
            let Some(rest) = self.width.checked_sub(first) else {
                continue;
            };
            let (start, count) = (phase * self.phase_len + (first + pad) / s, rest.div_ceil(s));
            for (y, row) in self.input.chunks_exact(self.width).enumerate() {
                let row_start = (y + self.padding[0]) * self.phase_width;
                let (src, dst) = (&row[first..], &mut self.scratch[start + row_start..][..count]);
                match s {
                    1 => copy(dst, src),
                    // Every other value, as pairs: a shuffle per vector.
                    2 => {
                        let pairs = src.chunks_exact(2);
                        let odd = pairs.remainder().first().copied();
                        let n = pairs.len();
                        for (d, pair) in dst.iter_mut().zip(pairs) {
                            *d = pair[0];
                        }
                        if let Some(v) = odd {
                            dst[n] = v;
                        }
                    }
                    _ => {
                        for (d, &v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)` in 16-value pieces: inline vector moves
/// rather than a `memmove` call per row (most rows here are 7 to 56 values).
#[inline(always)]
pub(super) fn copy(dst: &mut [f32], src: &[f32]) {
    let mut dst = dst.chunks_exact_mut(16);
    let mut src = src.chunks_exact(16);
    for (d, s) in dst.by_ref().zip(src.by_ref()) {
        d.copy_from_slice(s);
    }
    for (d, &s) in dst.into_remainder().iter_mut().zip(src.remainder()) {
        *d = s;
    }
}

/// The widest output segment [`Plane`] computes at once: the scratch
/// holds this many values past its phases, so a segment's read that runs
/// past a row's end (into the next row, or the slack) stays in bounds.
pub(super) const SEGMENT_SLACK: usize = 16;

/// One plane's output, written (not accumulated) into `out` from the padded
/// plane split into column phases, and its epilogue.
pub(super) struct Plane<'a> {
    pub(super) phases: &'a [f32],
    /// Where each tap of output (0, 0) reads in `phases`.
    pub(super) offsets: &'a [usize],
    /// The plane's output segments, a whole number of groups of [`UNITS`].
    pub(super) units: &'a [Unit],
    pub(super) weight: &'a [f32],
    /// The plane's bias, activation and residual (the SIMD paths apply
    /// them as they store; the portable one leaves them to a pass after).
    pub(super) bias: f32,
    pub(super) activation: Option<Activation>,
    pub(super) residual: Option<&'a [f32]>,
    pub(super) out: &'a mut [MaybeUninit<f32>],
}

/// One output segment: where its reads start (for tap offset 0), where
/// its outputs go, and how many there are (0 for the padding units that
/// fill the last group).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unit {
    pub(super) read: usize,
    pub(super) write: usize,
    pub(super) len: usize,
}

/// The segments of an `out_height × out_width` output, `segment` columns
/// each, rows `row_step` values apart in the phases; padded with empty
/// units to a whole number of groups. The same for every plane of a call,
/// so worked out once (indices per unit cost divisions, which outweighed
/// the multiply-adds of small planes).
pub(super) fn units(out_height: usize, out_width: usize, segment: usize, row_step: usize) -> Vec<Unit> {
    let mut units: Vec<Unit> = (0..out_height)
        .flat_map(|oy| {
            (0..out_width).step_by(segment).map(move |ox| Unit {
                read: oy * row_step + ox,
                write: oy * out_width + ox,
                len: segment.min(out_width - ox),
            })
        })
        .collect();
    let empty = units.last().map_or(
        Unit {
            read: 0,
            write: 0,
            len: 0,
        },
        |u| Unit { len: 0, ..*u },
    );
    units.resize(units.len().next_multiple_of(UNITS), empty);
    units
}

/// Segments computed together: independent sums, so the multiply-adds of
/// one tap do not wait on each other (one segment at a time left the
/// kernel waiting on the add latency, one tap after another).
pub(super) const UNITS: usize = 4;

/// [`Plane`] computed `L` output columns at a time: the `L` sums of a
/// segment stay in registers over all taps (one contiguous `L`-wide read
/// and multiply-add per tap) and are stored once, [`UNITS`] segments
/// (along a row, then on to the next rows) at once; a row's last segment
/// reads past the row (harmlessly, see [`SEGMENT_SLACK`]) and stores only
/// its columns; the units padding the last group store nothing.
pub(super) struct Segments<'a, const L: usize>(pub(super) Plane<'a>);

impl<const L: usize> IsaBody for Segments<'_, L> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let p = self.0;
        debug_assert!(L <= SEGMENT_SLACK);
        for group in p.units.chunks_exact(UNITS) {
            let mut acc = [[0f32; L]; UNITS];
            for (&offset, &w) in p.offsets.iter().zip(p.weight) {
                for (acc, unit) in acc.iter_mut().zip(group) {
                    // In bounds: the last valid column of the last row is
                    // at most L - 1 values before the slack's end.
                    let src = &p.phases[unit.read + offset..][..L];
                    for (a, &s) in acc.iter_mut().zip(src) {
                        *a += w * s;
                    }
                }
            }
            for (acc, unit) in acc.iter().zip(group) {
                for (o, &v) in p.out[unit.write..unit.write + unit.len].iter_mut().zip(acc) {
                    o.write(v);
                }
            }
        }
    }
}
