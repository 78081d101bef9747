//! F(2×2, 3×3)'s transforms: the input's 4×4 patches into `V` (tiles on
//! the lanes), the products back into 2×2 output tiles with the epilogue
//! (output channels on the lanes, as the lane product leaves them), and
//! the weights' `G g Gᵀ` at compile time.
//!
//! Both run compiled for the conv's path ([`IsaBody`]) on fixed-size lane
//! arrays written in place. Until the sixty-third session they were plain
//! loops that found each tile's place by division for every channel,
//! gathered the output transform's products one value per cache line
//! (per output channel, lane `o % 32` of each tile's row), and returned
//! their arrays by value (`memmove` calls): in `perf` of ResNet18 at batch
//! 1 (Zen 4, AVX-512) the two transforms and their copies took ~6% of the
//! forward's samples, for three convs of 16 tiles. Since (2-core Zen 4
//! VM, `scripts/ab_builds.py`, 20 rounds): ResNet18 at batch 1 0.967× the
//! time (quartiles 0.954-0.983), AVX2 forced 0.966× (0.964-0.978);
//! ResNet34 0.968×, ResNet50 0.998× (its three F(2×2) convs, in a longer
//! forward); batch 10 runs no F(2×2) conv in these models.

use super::f2::{Run, ALPHA, M, XI};
use crate::cpu::data::SharedOut;
use crate::cpu::epilogue;
use crate::cpu::gemm::{IsaBody, LANES};
use std::ops::Range;

/// Tiles transformed together in the input transform, one per lane.
const TILE_LANES: usize = 16;

/// Where one tile of a block reads and writes: its patch's top-left in the
/// padded input's channel 0 of its image, its output's top-left in
/// channel 0 of its image, and how much of its 2×2 lies inside the output.
#[derive(Debug, Clone, Copy)]
pub(super) struct Place {
    pub(super) patch: usize,
    pub(super) out: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

/// `V[ξ][c][t]` for the channels `channels` and every tile of the block
/// (`v`: `[XI][C][places.len()]`, ξ matrices `v_stride` apart).
pub(super) struct InputChannels<'a, 'r> {
    pub(super) run: &'a Run<'r>,
    pub(super) places: &'a [Place],
    pub(super) channels: Range<usize>,
    pub(super) v: SharedOut,
    pub(super) v_stride: usize,
}

impl IsaBody for InputChannels<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let InputChannels {
            run,
            places,
            channels,
            v,
            v_stride,
        } = self;
        let (count, width) = (places.len(), run.padded_width);
        let plane = run.padded_height * width;
        let (mut d, mut t) = ([[0f32; TILE_LANES]; XI], [[0f32; TILE_LANES]; XI]);
        for c in channels {
            for (t0, chunk) in places.chunks(TILE_LANES).enumerate().map(|(i, p)| (i * TILE_LANES, p)) {
                for (lane, place) in chunk.iter().enumerate() {
                    // The patch's four rows (one bounds check for all).
                    let patch = &run.padded[place.patch + c * plane..][..(ALPHA - 1) * width + ALPHA];
                    for (i, row) in d.chunks_exact_mut(ALPHA).enumerate() {
                        for (j, d) in row.iter_mut().enumerate() {
                            d[lane] = patch[i * width + j];
                        }
                    }
                }
                input_transform(&d, &mut t);
                for (xi, row) in t.iter().enumerate() {
                    // SAFETY: row (ξ, c) of V is written by this task only.
                    let dst = unsafe { v.slice(xi * v_stride + c * count + t0, chunk.len()) };
                    // A whole chunk as a copy of constant size (inline
                    // moves, no `memcpy` call): one length for all was
                    // 1.012× the ResNet18 batch-1 time (Zen 4).
                    match <&mut [f32; TILE_LANES]>::try_from(&mut *dst) {
                        Ok(whole) => *whole = *row,
                        Err(_) => dst.copy_from_slice(&row[..chunk.len()]),
                    }
                }
            }
        }
    }
}

/// Output channels `group·LANES..` (one lane group, those below the conv's
/// output channels) of the tiles `tiles` of the block, from the products
/// `m` (`[O_pad / LANES][places.len()][LANES]` per ξ, `m_stride` apart),
/// with the epilogue.
pub(super) struct OutputGroup<'a, 'r> {
    pub(super) run: &'a Run<'r>,
    pub(super) places: &'a [Place],
    pub(super) m: &'a [f32],
    pub(super) m_stride: usize,
    pub(super) group: usize,
    pub(super) tiles: Range<usize>,
}

impl IsaBody for OutputGroup<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let OutputGroup {
            run,
            places,
            m,
            m_stride,
            group,
            tiles,
        } = self;
        let s = &run.tiles.shape;
        let (plane, count) = (s.out_plane(), places.len());
        let first = group * LANES;
        let lanes = LANES.min(s.out_channels.saturating_sub(first));
        if lanes == 0 {
            // A group past the output channels (the padding): nothing to write.
            return;
        }
        let epilogue = &run.conv.w.epilogue;
        let (biases, activation) = (epilogue.biases(first..first + lanes), epilogue.activation());
        let (mut products, mut y) = ([[0f32; LANES]; XI], [[0f32; LANES]; M * M]);
        for t in tiles {
            for (xi, row) in products.iter_mut().enumerate() {
                row.copy_from_slice(&m[xi * m_stride + (group * count + t) * LANES..][..LANES]);
            }
            output_transform(&products, &mut y);
            let place = places[t];
            for i in 0..place.rows {
                for j in 0..place.cols {
                    // Channel `first` of this pixel; channel `first + l` lies `l·plane` on.
                    let at = place.out + i * s.out_width + j + first * plane;
                    run.dst.check(at, at + (lanes - 1) * plane + 1);
                    for (l, (&value, &bias)) in y[i * M + j].iter().zip(biases).enumerate() {
                        let at = at + l * plane;
                        let residual = run.residual.map(|r| r[at]);
                        // SAFETY: checked above; (channel, pixel) belongs to
                        // one (lane group, tile) pair, which one task writes.
                        let out = unsafe { run.dst.slice_within(at, 1) };
                        out[0] = epilogue::value(value, bias, residual, activation);
                    }
                }
            }
        }
    }
}

/// `out[l] = a[l] + b[l]`.
#[inline(always)]
fn add<const N: usize>(out: &mut [f32; N], a: &[f32; N], b: &[f32; N]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// `out[l] = a[l] − b[l]`.
#[inline(always)]
fn sub<const N: usize>(out: &mut [f32; N], a: &[f32; N], b: &[f32; N]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = a - b;
    }
}

/// `v = Bᵀ d B` for `N` 4×4 patches `d` (row-major, one tile per lane),
/// with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
#[inline(always)]
pub(super) fn input_transform<const N: usize>(d: &[[f32; N]; XI], v: &mut [[f32; N]; XI]) {
    // Columns first: t = Bᵀ d (column j's rows are d[j], d[4 + j], d[8 + j], d[12 + j]).
    let mut t = [[0f32; N]; XI];
    for j in 0..ALPHA {
        let col = |i: usize| &d[i * ALPHA + j];
        sub(&mut t[j], col(0), col(2));
        add(&mut t[ALPHA + j], col(1), col(2));
        sub(&mut t[2 * ALPHA + j], col(2), col(1));
        sub(&mut t[3 * ALPHA + j], col(1), col(3));
    }
    // Then rows: v = t B.
    for i in 0..ALPHA {
        let row = |j: usize| &t[i * ALPHA + j];
        sub(&mut v[i * ALPHA], row(0), row(2));
        add(&mut v[i * ALPHA + 1], row(1), row(2));
        sub(&mut v[i * ALPHA + 2], row(2), row(1));
        sub(&mut v[i * ALPHA + 3], row(1), row(3));
    }
}

/// `[a0 + a1 + a2, a1 − a2 − a3]` of four rows `a` into two, `N` lanes.
#[inline(always)]
fn at<const N: usize>(a: [&[f32; N]; 4], top: &mut [f32; N], bottom: &mut [f32; N]) {
    for (l, (top, bottom)) in top.iter_mut().zip(bottom).enumerate() {
        *top = a[0][l] + a[1][l] + a[2][l];
        *bottom = a[1][l] - a[2][l] - a[3][l];
    }
}

/// `y = Aᵀ m A` for `N` 4×4 product tiles `m` (one per lane), with
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`; the 2×2 outputs row-major.
#[inline(always)]
pub(super) fn output_transform<const N: usize>(m: &[[f32; N]; XI], y: &mut [[f32; N]; M * M]) {
    // Columns first: t = Aᵀ m (2×4).
    let mut t = [[0f32; N]; M * ALPHA];
    let (top, bottom) = t.split_at_mut(ALPHA);
    for (j, (top, bottom)) in top.iter_mut().zip(bottom).enumerate() {
        at([&m[j], &m[4 + j], &m[8 + j], &m[12 + j]], top, bottom);
    }
    // Then rows: y = t A.
    let [y00, y01, y10, y11] = y;
    at([&t[0], &t[1], &t[2], &t[3]], y00, y01);
    at([&t[4], &t[5], &t[6], &t[7]], y10, y11);
}

/// `G g Gᵀ` in f64 for a 3×3 kernel `g` (row-major), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
pub(super) fn weight_transform(g: &[f32]) -> [f64; XI] {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let mut gg = [[0f64; 3]; 4];
    for (i, row) in G.iter().enumerate() {
        for j in 0..3 {
            gg[i][j] = (0..3).map(|k| row[k] * f64::from(g[k * 3 + j])).sum();
        }
    }
    let mut u = [0f64; XI];
    for i in 0..4 {
        for (j, row) in G.iter().enumerate() {
            u[i * 4 + j] = (0..3).map(|k| gg[i][k] * row[k]).sum();
        }
    }
    u
}
