//! The fused max pool's rows: each pooled row from the ring of conv rows,
//! a plain vector max where the sums are provably finite, and the store
//! into the output planes.

use super::*;

impl Run<'_> {
    /// [`PoolRow`]'s body.
    #[inline(always)]
    pub(super) fn pool_row(&self, p: PoolRow<'_, '_>) {
        let PoolRow {
            image,
            r,
            ring_rows,
            scratch: [column_max, pooled_row],
            late,
            plain,
            ..
        } = p;
        let (conv, s) = (self.conv, &self.shape);
        let (pool, po, ow) = (&conv.pool, conv.padded_out(), s.out_width);
        let row_len = ow * po;
        let ring = pool.kernel[0];
        let ys = window(pool, 0, s.out_height, r);
        // Non-empty windows: padding <= half the window (`check_fused_pool`).
        let ring_row = |y: usize| &ring_rows[y % ring * row_len..][..row_len];
        let pw = self.pooled[1];
        let (biases, activation) = (conv.epilogue.biases(0..s.out_channels), conv.epilogue.activation());
        if plain {
            let mut rows = [&ring_rows[..0]; PLAIN_MAX];
            for (row, y) in rows.iter_mut().zip(ys.clone()) {
                *row = ring_row(y);
            }
            let rows = &rows[..ys.len()];
            for px in 0..pw {
                let xs = window(pool, 1, ow, px);
                let out = &mut pooled_row[px * po..][..po];
                match po / MAX_LANES {
                    1 => plain_window_max::<1>(rows, xs, out),
                    2 => plain_window_max::<2>(rows, xs, out),
                    3 => plain_window_max::<3>(rows, xs, out),
                    _ => plain_window_max::<4>(rows, xs, out),
                }
                // `plain` implies the epilogue comes after the max.
                epilogue::in_place_channels(out, biases, activation);
            }
            return self.store_pooled_row(image, r, pooled_row);
        }
        match ys.len() {
            1 => column_max.copy_from_slice(ring_row(ys.start)),
            _ => {
                for ((m, &a), &b) in column_max
                    .iter_mut()
                    .zip(ring_row(ys.start))
                    .zip(ring_row(ys.start + 1))
                {
                    *m = nan_max(a, b);
                }
            }
        }
        for y in ys.start + 2..ys.end {
            for (m, &v) in column_max.iter_mut().zip(ring_row(y)) {
                *m = nan_max(*m, v);
            }
        }
        for px in 0..pw {
            let xs = window(pool, 1, ow, px);
            let out = &mut pooled_row[px * po..][..po];
            out.copy_from_slice(&column_max[xs.start * po..][..po]);
            for x in xs.start + 1..xs.end {
                for (m, &v) in out.iter_mut().zip(&column_max[x * po..][..po]) {
                    *m = nan_max(*m, v);
                }
            }
            if late {
                epilogue::in_place_channels(out, biases, activation);
            }
        }
        self.store_pooled_row(image, r, pooled_row);
    }

    /// Pooled row `r` of image `image` (`pooled_row`, `[PW][O_pad]`) into
    /// the output's NCHW planes.
    #[inline(always)]
    pub(super) fn store_pooled_row(&self, image: usize, r: usize, pooled_row: &[f32]) {
        let (conv, s) = (self.conv, &self.shape);
        let (po, pw) = (conv.padded_out(), self.pooled[1]);
        // SAFETY: pooled row r of image `image` belongs to this task only
        // (tasks split images' rows); each channel's row is taken once.
        let out_row = |o: usize| unsafe {
            self.dst
                .slice(((image * s.out_channels + o) * self.pooled[0] + r) * pw, pw)
        };
        let mut o = 0;
        while o + 8 <= s.out_channels {
            columns_to_rows8(conv.isa, pooled_row, po, o, std::array::from_fn(|k| out_row(o + k)));
            o += 8;
        }
        for o in o..s.out_channels {
            for (px, out) in out_row(o).iter_mut().enumerate() {
                *out = pooled_row[px * po + o];
            }
        }
    }
}

/// Channels in one vector of the plain max: a multiple of every path's
/// vector, and a divisor of every block ([`block`]).
pub(super) const MAX_LANES: usize = 16;

/// Most rows and most vectors of [`MAX_LANES`] channels (the padded
/// channels over [`MAX_LANES`]) the plain max takes: ResNet's 3-row pool
/// on 64 channels, on every path.
pub(super) const PLAIN_MAX: usize = 4;

/// `out[c] = max(row[x·C + c])` over `rows` and the columns `xs` (`C` =
/// `N·`[`MAX_LANES`] = `out.len()` channels), with `a > b ? a : b` (one
/// `maxps`), which equals [`nan_max`] where no operand is NaN: for
/// finite rows ([`plain_bound`]). The window's `N` vectors stay in registers
/// across its values, each read once in order (the columns of a window
/// are contiguous).
#[inline(always)]
pub(super) fn plain_window_max<const N: usize>(rows: &[&[f32]], xs: Range<usize>, out: &mut [f32]) {
    let width = N * MAX_LANES;
    let mut m = [[f32::NEG_INFINITY; MAX_LANES]; N];
    for row in rows {
        for column in row[xs.start * width..xs.end * width].chunks_exact(width) {
            for (m, v) in m.iter_mut().zip(column.chunks_exact(MAX_LANES)) {
                for (m, &v) in m.iter_mut().zip(v) {
                    *m = if *m > v { *m } else { v };
                }
            }
        }
    }
    for (out, m) in out.chunks_exact_mut(MAX_LANES).zip(&m) {
        out.copy_from_slice(m);
    }
}

/// Whether every value's magnitude is at most `bound` (false for a NaN);
/// compiled for the conv's path by [`Isa::run`].
pub(super) struct Bounded<'a> {
    pub(super) values: &'a [f32],
    pub(super) bound: f32,
}

impl IsaBody for Bounded<'_> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        let bound = self.bound;
        // No early exit, so the comparisons vectorise.
        self.values.iter().fold(true, |ok, v| ok & (v.abs() <= bound))
    }
}

/// The largest input magnitude for which a conv of `depth` with these
/// weights cannot overflow: `f32::MAX / (2 · depth · max |w|)`, at most
/// `f32::MAX` (so an infinite input is not bounded); `None` where a
/// weight is not finite. Every partial sum is then at most half
/// `f32::MAX` in magnitude, so the convolution's values (before the bias,
/// which a max-commuting epilogue adds after the pool) are finite: never
/// NaN, where the plain max equals [`nan_max`].
pub(super) fn plain_bound(weights: &[f32], depth: usize) -> Option<f32> {
    let mut largest = 0f64;
    for &w in weights {
        if !w.is_finite() {
            return None;
        }
        largest = largest.max(f64::from(w.abs()));
    }
    // All weights zero: an infinite quotient, capped at f32::MAX.
    let bound = f64::from(f32::MAX) / (2.0 * depth.max(1) as f64 * largest);
    Some(bound.min(f64::from(f32::MAX)) as f32)
}

/// Pooled row `r` of image `image` from the convolution rows in
/// `ring_rows` (row `y` in slot `y % pool height`), through `scratch`
/// (the column maxima, `[OW][O_pad]`, and the pooled row, `[PW][O_pad]`),
/// into the output, with the epilogue when `late`; compiled for the
/// conv's path by [`Isa::run`] (the maxima vectorise across the channels).
pub(super) struct PoolRow<'a, 'r> {
    pub(super) run: &'a Run<'r>,
    pub(super) image: usize,
    pub(super) r: usize,
    pub(super) ring_rows: &'a [f32],
    pub(super) scratch: [&'a mut [f32]; 2],
    pub(super) late: bool,
    /// The task's convolution rows are finite ([`plain_bound`]) and the
    /// conv's shape fits ([`StemConv::plain_shape`]): the maxima take
    /// [`plain_window_max`].
    pub(super) plain: bool,
}

impl IsaBody for PoolRow<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.pool_row(self)
    }
}
