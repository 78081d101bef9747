//! The lane layout's product reading the conv's input where it lies: each
//! micro-tile broadcasts its pixels straight from the input planes at the
//! conv's column stride ([`lane_gemm_gathered`](crate::cpu::gemm::lane_gemm_gathered) with a step of 1 or 2),
//! through a table of where row `(c, ky, kx)` of the im2col columns lies
//! from a pixel's window; only the pixels whose window reaches into the
//! padding (the border: a stride-2 3×3 conv's top row and left column)
//! are gathered into im2col columns, and their tiles read those, in the
//! same pass over each chunk of weights.
//!
//! The phases (`phased/`) copy every input row first (9-13% of
//! ResNet18's layer3.0.conv1 and layer4.0.conv1 alone in perf, one
//! thread); here nothing is copied but the border, gathered pixel by
//! pixel through a mask of its taps inside the input (as per-row runs,
//! im2col's form, the left border's one pixel a row took 11%). Taken
//! where the border is at most a [`MAX_BORDER_SHARE`] of the pixels, at
//! a column stride the micro-tile takes ([`MAX_STEP`]), and one image's
//! input takes at most half the L2 (every task reads all of it, a
//! stride-2 product half of each line it touches: ResNet50's
//! layer3.0.downsample, 1.6 MB of input, took 1.17× the time in place
//! against its compact im2col copy; its 0.8 MB layer4.0.downsample
//! 1.02×): ResNet's 3×3 stride-2 convs at batch 1 (27 of 196 pixels at
//! 14×14, 13 of 49 at 7×7) and its 1×1 stride-2 downsamples (none).
//!
//! Per node in ResNet18 at batch 1 on the Intel Xeon VM (2 threads,
//! profiles alternating in ABBA order against the phases and im2col):
//! layer3.0.conv1 0.91×,
//! layer4.0.conv1 0.98×, the layer3 and layer4 downsamples 0.73× and
//! 0.83×; AVX2 forced 0.96×, 0.94×, 0.86×, 0.99×; ResNet34's 0.94×,
//! 1.00×, 0.77×, 0.79×: about 0.08 ms a forward, within the forwards'
//! noise (`bench` medians 0.99× ResNet18, 1.01-1.03× ResNet34 and
//! ResNet50 and AVX2's ResNet18, runs spread ±3%). ResNet's
//! 3×3 stride-1 convs on 7×7 (24 of 49 pixels on the border) took 1.22×
//! the time this way, and the 28×28 stride-2 conv and downsample on the
//! lane layout 1.15× and 1.9× (they stay on the panel layout).

use super::phased::lane_tiles;
use super::{Block, DirectConv, Run, Segment};
use crate::cpu::conv::ConvShape;
use crate::cpu::data::with_scratch;
use crate::cpu::gemm::lane_gathered::MAX_STEP;
use crate::cpu::gemm::{Gathered, LaneTile, Layout, Source};
use crate::cpu::parallel::{for_each, per_task};
use candle_core::bail;
use std::ops::Range;

/// Most border pixels, as a share of a plane's (numerator, denominator),
/// for which the input is read in place rather than copied into phases.
const MAX_BORDER_SHARE: (usize, usize) = (1, 3);

/// Where a conv's windows lie in its input: the table of the im2col rows'
/// offsets from a window's origin, and the output rows and columns whose
/// windows lie wholly inside the input.
#[derive(Debug)]
pub(super) struct Unpadded {
    /// Offset of GEMM row `(c, ky, kx)` from its pixel's window origin in
    /// image 0: `c·H·W + ky·dy·W + kx·dx`.
    table: Vec<usize>,
    /// Output rows whose windows lie inside the input's rows.
    rows: Range<usize>,
    /// Output columns whose windows lie inside the input's columns.
    cols: Range<usize>,
}

/// The outputs `o < out` whose window `o·stride − pad + k·dilation` (`k <
/// kernel`) lies inside `0..len`; `None` where a size overflows.
fn inside(len: usize, out: usize, kernel: usize, stride: usize, pad: usize, dilation: usize) -> Option<Range<usize>> {
    let lo = pad.div_ceil(stride.max(1)).min(out);
    let reach = kernel.checked_sub(1)?.checked_mul(dilation)?;
    // o·stride − pad + reach ≤ len − 1  ⇔  o ≤ (len − 1 + pad − reach) / stride.
    let hi = match len
        .checked_add(pad)?
        .checked_sub(1)
        .and_then(|top| top.checked_sub(reach))
    {
        Some(top) => (top / stride.max(1)).checked_add(1)?.clamp(lo, out),
        None => lo,
    };
    Some(lo..hi)
}

impl Unpadded {
    /// Whether `conv` on `shape` reads its input in place: the lane
    /// layout, a column stride of at most [`MAX_STEP`], at most a
    /// [`MAX_BORDER_SHARE`] of each plane's pixels on the border, and one
    /// image's input within half the block budget (the L2). Saturating: a
    /// hostile shape only says no.
    pub(super) fn applies(conv: &DirectConv, shape: &ConvShape) -> bool {
        let a = &conv.spec.attrs;
        let taps = conv.spec.kernel[0].saturating_mul(conv.spec.kernel[1]);
        if conv.layout != Layout::Lanes || !(1..=MAX_STEP).contains(&a.stride[1]) || shape.channels == 0 || taps > 64 {
            return false;
        }
        let Some((rows, cols)) = Self::inside_ranges(conv, shape) else {
            return false;
        };
        let plane = shape.out_plane();
        let border = plane - rows.len() * cols.len();
        let (num, den) = MAX_BORDER_SHARE;
        // One image's input within half the block budget (the L2): every
        // task reads all of it, lines whole where a stride-2 product uses
        // half of each.
        let input = shape.channels.saturating_mul(shape.in_plane()).saturating_mul(4);
        plane > 0 && border.saturating_mul(den) <= plane.saturating_mul(num) && input <= conv.machine.block_bytes() / 2
    }

    /// The output rows and columns whose windows lie inside the input.
    fn inside_ranges(conv: &DirectConv, shape: &ConvShape) -> Option<(Range<usize>, Range<usize>)> {
        let (a, [kh, kw]) = (&conv.spec.attrs, conv.spec.kernel);
        let rows = inside(
            shape.height,
            shape.out_height,
            kh,
            a.stride[0],
            a.padding[0],
            a.dilation[0],
        )?;
        let cols = inside(
            shape.width,
            shape.out_width,
            kw,
            a.stride[1],
            a.padding[1],
            a.dilation[1],
        )?;
        Some((rows, cols))
    }

    /// The table for `conv` on `shape`; an error when a size overflows.
    pub(super) fn new(conv: &DirectConv, shape: &ConvShape) -> candle_core::Result<Self> {
        let (a, [kh, kw]) = (&conv.spec.attrs, conv.spec.kernel);
        let Some((rows, cols)) = Self::inside_ranges(conv, shape) else {
            bail!("conv windows overflow for {shape:?}")
        };
        // The furthest entry: the last channel's plane plus the window's reach.
        let far = || {
            let plane = shape.in_plane();
            shape
                .channels
                .checked_mul(plane)?
                .checked_add((kh - 1).checked_mul(a.dilation[0])?.checked_mul(shape.width)?)?
                .checked_add((kw - 1).checked_mul(a.dilation[1])?)
        };
        if far().is_none() {
            bail!("conv input offsets overflow for {shape:?}")
        }
        let mut table = Vec::new();
        table
            .try_reserve_exact(conv.depth())
            .map_err(|_| candle_core::Error::Msg("cannot allocate the conv's offset table".into()))?;
        let plane = shape.in_plane();
        for c in 0..shape.channels {
            for ky in 0..kh {
                for kx in 0..kw {
                    table.push(c * plane + ky * a.dilation[0] * shape.width + kx * a.dilation[1]);
                }
            }
        }
        Ok(Self { table, rows, cols })
    }

    /// `block`'s pixels split into runs whose windows lie inside the
    /// input (segments of the block's own columns) and the border's
    /// pixels, in block order.
    fn split(&self, block: &Block) -> (Vec<Segment>, Vec<Edge>) {
        let (mut inner, mut border) = (Vec::new(), Vec::new());
        let mut edge = |seg: &Segment, xs: Range<usize>| {
            border.extend(xs.map(|x| Edge {
                image: seg.image,
                y: seg.y,
                x,
                col: seg.col + x - seg.x0,
            }))
        };
        for seg in &block.segments {
            let (a, b) = match self.rows.contains(&seg.y) {
                true => (
                    self.cols.start.clamp(seg.x0, seg.x1),
                    self.cols.end.clamp(seg.x0, seg.x1),
                ),
                false => (seg.x1, seg.x1),
            };
            let b = b.max(a);
            edge(seg, seg.x0..a);
            if a < b {
                inner.push(Segment {
                    x0: a,
                    x1: b,
                    col: seg.col + a - seg.x0,
                    ..*seg
                });
            }
            edge(seg, b..seg.x1);
        }
        (inner, border)
    }
}

/// A border pixel: image, output row and column, its column in the block.
#[derive(Debug, Clone, Copy)]
struct Edge {
    image: usize,
    y: usize,
    x: usize,
    col: usize,
}

impl Run<'_> {
    /// The lane layout's block read in place ([`Unpadded`]): the border's
    /// im2col columns into scratch (rows shared by the threads with
    /// `split`), then tasks owning whole lane groups multiply the pixels
    /// inside (from the input) and the border's (from its columns) into
    /// scratch products (`[O_pad / LANES][pixels][LANES]`), bring their
    /// groups back to rows (`[O_pad, block.cols]`) and write their
    /// channels' epilogue.
    pub(super) fn lane_unpadded(&self, u: &Unpadded, block: &Block) -> candle_core::Result<()> {
        let conv = self.conv;
        let (depth, pixels, m_cols) = (conv.depth(), block.pixels, block.cols);
        let (inner, border) = u.split(block);
        // Saturated: past the scratch cap, `with_scratch` refuses it.
        let len = depth
            .saturating_mul(border.len())
            .saturating_add(conv.padded_out.saturating_mul(m_cols.saturating_add(pixels)));
        with_scratch(len, |scratch| {
            self.unpadded_products(u, block, (&inner, &border), scratch)
        })
    }

    /// [`Run::lane_unpadded`] with its runs inside the input, border pixels
    /// and scratch.
    fn unpadded_products(
        &self,
        u: &Unpadded,
        block: &Block,
        (inner, border): (&[Segment], &[Edge]),
        scratch: &mut [f32],
    ) {
        let conv = self.conv;
        let (s, a) = (&self.shape, &conv.spec.attrs);
        let (depth, pixels, m_cols) = (conv.depth(), block.pixels, block.cols);
        let (v, rest) = scratch.split_at_mut(depth * border.len());
        let (m, rest) = rest.split_at_mut(conv.padded_out * m_cols);
        let partials = &mut rest[..conv.padded_out * pixels];
        if !border.is_empty() {
            self.border_columns(u, border, v);
        }
        let limit = conv.tile_limit();
        // Inside the input, each run's window origin lies in its image.
        let origin = |seg: &Segment| self.window_origin(seg.image, seg.y, seg.x0)[2] as usize;
        let inner_tiles = lane_tiles(inner, origin, a.stride[0] * s.width, a.stride[1], limit);
        let border_cols: Vec<usize> = border.iter().map(|e| e.col).collect();
        let border_tiles = column_tiles(&border_cols, limit.0);
        let border_table: Vec<usize> = (0..depth).map(|d| d * border.len()).collect();
        let sources = [
            Source {
                v: Gathered {
                    data: self.input,
                    table: &u.table,
                },
                tiles: inner_tiles,
            },
            Source {
                v: Gathered {
                    data: v,
                    table: &border_table,
                },
                tiles: border_tiles,
            },
        ];
        self.lane_tasks(&sources, block, partials, m, m_cols);
    }

    /// Pixel (`image`, `y`, `x`)'s window origin: the input row and column
    /// of its first tap (negative in the padding) and where that would lie
    /// in the input (an offset, in bounds where the tap is inside). The
    /// sizes are the input's own (`applies` bounds the padding by them).
    fn window_origin(&self, image: usize, y: usize, x: usize) -> [isize; 3] {
        let (s, a) = (&self.shape, &self.conv.spec.attrs);
        let iy = (y * a.stride[0]) as isize - a.padding[0] as isize;
        let ix = (x * a.stride[1]) as isize - a.padding[1] as isize;
        let image_len = s.channels * s.in_plane();
        [iy, ix, (image * image_len) as isize + iy * s.width as isize + ix]
    }

    /// The im2col columns of the border pixels `border` into `v` (`[C·kh·kw,
    /// border.len()]`): zeros where a window reaches into the padding; rows
    /// shared by the threads with `split`. Row by row over the pixels (a
    /// stride-2 conv's left border is one pixel a row: per-row runs took a
    /// tenth of the conv).
    fn border_columns(&self, u: &Unpadded, border: &[Edge], v: &mut [f32]) {
        let (s, a, [kh, kw]) = (&self.shape, &self.conv.spec.attrs, self.conv.spec.kernel);
        // Per pixel: where its window's origin would be, and which of its
        // taps lie inside the input (bit ky·kw + kx; `applies` keeps kh·kw
        // within 64).
        let taps: Vec<(isize, u64)> = border
            .iter()
            .map(|e| {
                let [iy, ix, origin] = self.window_origin(e.image, e.y, e.x);
                let inside = |at: isize, len: usize| at >= 0 && (at as usize) < len;
                let mut mask = 0u64;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (y, x) = (iy + (ky * a.dilation[0]) as isize, ix + (kx * a.dilation[1]) as isize);
                        mask |= u64::from(inside(y, s.height) && inside(x, s.width)) << (ky * kw + kx);
                    }
                }
                (origin, mask)
            })
            .collect();
        let fill = |first: usize, v: &mut [f32]| {
            for (row, v) in (first..).zip(v.chunks_exact_mut(border.len())) {
                let (offset, tap) = (u.table[row] as isize, row % (kh * kw));
                for (&(origin, mask), v) in taps.iter().zip(v) {
                    *v = match mask >> tap & 1 {
                        // An inside tap: its value lies within the input.
                        1 => self.input[(origin + offset) as usize],
                        _ => 0.0,
                    };
                }
            }
        };
        let depth = self.conv.depth();
        if self.split {
            let per = per_task(depth, 2);
            let tasks = v[..depth * border.len()].chunks_mut(per * border.len()).enumerate();
            for_each(tasks, |(i, v)| fill(i * per, v));
        } else {
            fill(0, &mut v[..depth * border.len()]);
        }
    }
}

/// Micro-tiles of at most `max` pixels over consecutive columns of an
/// im2col copy (`cols[k]`: the block column of copied column `k`), each
/// over copied columns whose block columns are evenly spaced (a stride-2
/// conv's left border: one a row), cut in tiles of equal width.
fn column_tiles(cols: &[usize], max: usize) -> Vec<LaneTile> {
    let mut tiles = Vec::new();
    let mut k = 0;
    while k < cols.len() {
        let step = cols.get(k + 1).map_or(1, |&next| next - cols[k]);
        let mut end = k + 1;
        while end < cols.len() && cols[end] - cols[end - 1] == step {
            end += 1;
        }
        let (len, count) = (end - k, (end - k).div_ceil(max.max(1)));
        let mut x = 0;
        for t in 0..count {
            let w = (len - x).div_ceil(count - t);
            tiles.push(LaneTile {
                start: k + x,
                pitch: 0,
                step: 1,
                col: cols[k + x],
                col_pitch: 0,
                col_step: step,
                width: w,
                rows: 1,
            });
            x += w;
        }
        k = end;
    }
    tiles
}

#[cfg(test)]
mod tests;
