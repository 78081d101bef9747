//! The direct conv without im2col: a block's input rows are copied once
//! into column phases (the columns `x ≡ p (mod stride)` of each padded
//! row, side by side), so each of the `C·kh·kw` rows of the block's GEMM
//! columns is a run of one phase row, shifted by `kx·dilation / stride`,
//! and the product reads it there through a table of offsets
//! ([`panel_gemm_gathered`]). im2col writes `kh·kw` values per input
//! channel and output pixel; the phases about `stride_y` (ResNet's stem,
//! 7×7 stride 2: 49 against 2). Taken by the panel layout where im2col
//! would copy at least [`min_copy_ratio`] times as much, on output rows
//! wide enough that the 16-column granule wastes little
//! ([`Phases::applies`]); a row's last tile runs
//! past its end into the next row's columns, which come later and
//! overwrite them (the products' scratch has a granule of room at the end).
//!
//! The lane layout (few pixels: batch 1 at 14×14 and 7×7; on the SIMD
//! paths every size for kernels of more than one value at least 576
//! deep) reads phases for every kernel of more than one value that does
//! not read the input itself (`unpadded.rs`: where at most a third of the
//! pixels are on the border, so not ResNet's 3×3 stride-1 convs on 7×7)
//! ([`lane_gemm_gathered`](crate::cpu::gemm::lane_gemm_gathered)): its
//! tiles broadcast each pixel from its phase row, one or two output rows
//! per tile, and tasks owning whole lane groups finish their channels'
//! epilogue. On the Intel Xeon VM (AVX-512, 2 threads), against im2col
//! into the lane product, per-node profiles at batch 1: ResNet18's 3×3
//! stride-2 convs 0.80-0.81× the time (layer3.0.conv1 0.66 -> 0.53 ms,
//! layer4.0.conv1 0.72 -> 0.59), ResNet50's layer3.0.conv2 0.87-0.90× and
//! layer4.0.conv2 0.90-0.95× (against im2col split in depth parts);
//! whole forwards alternating in one process ResNet18 0.99×, ResNet34
//! 0.98-0.99×, ResNet50 0.997-1.0×; AVX2 forced level (1.00×). Tiles of
//! up to 14 pixels on AVX-512 (28 accumulators): ResNet18 0.99× against
//! 12. The 1×1 stride-2 convs never took the phases (one copy of the
//! pixels they read in im2col, where the phases copy every input row:
//! 1.5-1.9× slower with the fill on one thread); they read the input in
//! place now.

use super::{groups, Block, DirectConv, Run, Segment};
use crate::cpu::conv::ConvShape;
use crate::cpu::data::{gather_strided_on, CACHE_LINE_FLOATS as LINE};
use crate::cpu::gemm::{panel_gemm_gathered, Gathered, Isa, IsaBody, LaneTile, Layout, Source, PANEL_GRANULE};
use candle_core::bail;
use rayon::prelude::*;

/// Zeros past a block's phase rows: the last tile of the last row reads up
/// to a granule past them (values that only reach discarded columns).
const SLACK: usize = PANEL_GRANULE;

/// Least ratio of im2col's copies to the phases' (`kh·kw / (sy·sx)`) for
/// which the phases are taken. Alternating runs on an Emerald Rapids
/// Xeon (AVX-512, 2 threads): ResNet's 7×7 stride-2 stem (12.25) with its
/// pool 0.90x the time at batch 10 and 0.84x at batch 1, unpooled
/// 0.88-0.91x; 3×3 stride-2 convs (2.25) 1.13x (64 -> 128 channels, 28
/// wide) and 1.29x (128 -> 256, 14 wide: one half tile per row) slower,
/// MobileNet's 3 -> 32 stem level. Their im2col is a small share of the
/// time (one copy per 128 or 256 FMAs); what the phases give up (the
/// in-place store, aligned rows, whole tiles) costs more.
const MIN_COPY_RATIO: usize = 12;

/// [`MIN_COPY_RATIO`] on the AVX2 path: the phases wherever they copy
/// less than im2col (3×3 stride-2 convs, 2.25, included). On the AVX2-only
/// Zen 3 VM (2 threads, `scripts/ab-nodes.sh`, each node against the
/// model's median node) at batch 10 the 3×3 stride-2 convs onto 14-wide
/// rows took 0.87× (ResNet18's layer3.0.conv1), 0.91× (ResNet34's) and
/// 0.94× (ResNet50's layer3.0.conv2) the time, those onto 28-wide rows
/// 0.96-1.04×, MobileNetV2's 3 -> 32 stem onto 112-wide rows 0.79×;
/// EfficientNet-B0's stem at batch 1 0.86×, ResNet18's layer2.0.conv1 at
/// batch 1 level. There im2col was 16% of a direct conv's time (`perf`).
/// Other kernels and strides this admits (3×3 stride 1 where Winograd
/// does not apply, 5×5 stride 2) were not timed.
const MIN_COPY_RATIO_AVX2: usize = 2;

/// Most output channels for which the AVX-512 path without wide FMAs
/// ([`crate::machine::Machine::wide_fma`]: each 512-bit FMA issued as two
/// halves, as on AMD Zen 4) takes the phases at [`MIN_COPY_RATIO_AVX2`]:
/// each value im2col copies feeds one FMA per output channel, so the
/// fewer the outputs, the larger the copy's share, and at half the FMA
/// rate of the wide cores that share is twice theirs. Alone on Zen 4 (2
/// threads, `xtask compare`, batch 1, phases against im2col, 3×3 stride-2
/// convs with ReLU): 3 -> 16 onto 112×112 (MobileNetV3's stem) 0.83× the
/// time, 16 -> 32 onto 56×56 0.89×, 32 -> 64 onto 56×56 0.99×, 64 -> 64
/// onto 28×28 0.92×; 64 -> 128 onto 28×28 (ResNet18's layer2.0.conv1)
/// 1.03× and 128 -> 128 (ResNet50's layer2.0.conv2) 1.00×. Whole forwards
/// alternating at batch 1: MobileNetV3 0.97× the time; MobileNetV2 and
/// EfficientNet-B0 (their 3 -> 32 stems) 1.00×; the ResNets' convs, of
/// 128 outputs and more, keep im2col. Other shapes the rule admits, alone:
/// 5×5 stride 2, 32 -> 64 onto 56×56, 0.89× the time; 3×3 stride 1 with
/// dilation 2 (no Winograd), 32 -> 32 on 56×56 0.87× and 64 -> 64 on
/// 28×28 0.90×.
const NARROW_AVX512_MAX_OUTPUTS: usize = 64;

/// The least ratio of im2col's copies to the phases' for `conv`'s panel
/// product: its path, whether that path's FMAs are wide, its outputs.
fn min_copy_ratio(conv: &DirectConv) -> usize {
    match conv.isa() {
        Isa::Avx2Fma => MIN_COPY_RATIO_AVX2,
        Isa::Avx512 if !conv.machine.wide_fma && conv.spec.out_channels <= NARROW_AVX512_MAX_OUTPUTS => {
            MIN_COPY_RATIO_AVX2
        }
        _ => MIN_COPY_RATIO,
    }
}

/// Largest column stride for which the lane layout reads phases: each
/// phase row holds the output row and the kernel's reach, so `stride`
/// phases of a padded input row hold about the row; a stride wider than
/// the kernel would copy columns no output reads (ResNet's and
/// MobileNet's strides are 1 and 2).
const MAX_LANE_STRIDE: usize = 4;

/// The phase layout of one run's input: per padded input row, `C`
/// channels of `stride` phases of `width` values.
#[derive(Debug)]
pub(super) struct Phases {
    /// Values per phase row: the output row and the kernel's reach.
    width: usize,
    /// Values of one padded input row's phases (`C · stride · width`).
    used: usize,
    /// Values from one padded input row's phases to the next's: `used`,
    /// then zeros to an odd number of cache lines, so that the rows a
    /// micro-tile reads at once (one per output row, a stride of input
    /// rows apart) fall in different sets of the L1. At `used` alone, 512
    /// channels of 2 phases of 8 values made a row 32 KiB, and a lane
    /// tile's six output rows (columns of 6 × 1 on ResNet's 7-wide rows at
    /// batch 1 on AVX2) read six lines 64 KiB apart, all in one set of an
    /// 8-way L1, with the weights' lines there too. ResNet50's
    /// layer4.0.conv2 (3×3 stride 2, 512 -> 512 onto 7×7) at batch 1 on
    /// the AVX2-only Zen 3 VM (2 threads), alternating runs: alone 0.73×
    /// the time (median of 6, 0.69-0.86), in the model 4.04 -> 3.05 ms
    /// (`scripts/ab-nodes.sh`, 0.75 against a median node of 1.05; im2col
    /// into the lane product instead of phases did as well, 0.65×). The
    /// phased convs with wider rows (ResNet50's layer2.0/3.0.conv2 and
    /// ResNet34's layer3.0.conv1 at batch 1, ResNet18's stride-2 convs and
    /// EfficientNet-B0's stem at batch 10) level with their median node.
    row: usize,
    /// Where GEMM row `(c, ky, kx)` starts, from its output row's first
    /// phase value: `ky·dy` rows, channel `c`, phase `kx·dx mod s`, `kx·dx
    /// / s` values on.
    table: Vec<usize>,
}

impl Phases {
    /// Whether `conv` on `shape` reads phases: the lane layout at a column
    /// stride of at most [`MAX_LANE_STRIDE`]; or the panel layout, a kernel
    /// wider than one column (a 1×1 conv's im2col is already one copy) and
    /// [`min_copy_ratio`] times the strides' area, and output rows that
    /// fill at least 7/8 of their 16-column granules (ResNet's 112, 56, 28
    /// and 14; not 7). Saturating: a hostile stride only says no.
    pub(super) fn applies(conv: &DirectConv, shape: &ConvShape) -> bool {
        let ow = shape.out_width;
        let ([kh, kw], [sy, sx]) = (conv.spec.kernel, conv.spec.attrs.stride);
        if conv.layout == Layout::Lanes {
            return sx <= MAX_LANE_STRIDE && kh.saturating_mul(kw) > 1 && ow > 0 && shape.channels > 0;
        }
        conv.layout == Layout::Panels
            && kh.saturating_mul(kw) >= min_copy_ratio(conv).saturating_mul(sy).saturating_mul(sx)
            && kw > 1
            && ow > 0
            && ow
                .checked_next_multiple_of(PANEL_GRANULE)
                .and_then(|tiles| tiles.checked_mul(7))
                .zip(ow.checked_mul(8))
                .is_some_and(|(padded, row)| padded <= row)
    }

    /// The layout for `conv` on `shape`; an error when a size overflows.
    pub(super) fn new(conv: &DirectConv, shape: &ConvShape) -> candle_core::Result<Self> {
        let a = &conv.spec.attrs;
        let ([kh, kw], s, dx, dy) = (conv.spec.kernel, a.stride[1], a.dilation[1], a.dilation[0]);
        let sizes = || -> Option<(usize, usize, usize)> {
            let reach = (kw - 1).checked_mul(dx)? / s;
            let width = shape.out_width.checked_add(reach)?;
            let used = shape.channels.checked_mul(s)?.checked_mul(width)?;
            // An odd number of cache lines a row ([`Phases::row`]).
            let row = (used.div_ceil(LINE) | 1).checked_mul(LINE)?;
            // The furthest entry of the table must be addressable too.
            row.checked_mul((kh - 1).checked_mul(dy)?.checked_add(1)?)?;
            Some((width, used, row))
        };
        let Some((width, used, row)) = sizes() else {
            bail!("conv input phases overflow for {shape:?}")
        };
        let mut table = Vec::new();
        table
            .try_reserve_exact(conv.depth())
            .map_err(|_| candle_core::Error::Msg("cannot allocate the conv's phase table".into()))?;
        for c in 0..shape.channels {
            for ky in 0..kh {
                for kx in 0..kw {
                    let (phase, shift) = (kx * dx % s, kx * dx / s);
                    table.push(ky * dy * row + (c * s + phase) * width + shift);
                }
            }
        }
        Ok(Phases {
            width,
            used,
            row,
            table,
        })
    }

    /// Padded input rows that `out_rows` consecutive output rows read.
    fn input_rows(&self, conv: &DirectConv, out_rows: usize) -> Option<usize> {
        let a = &conv.spec.attrs;
        let span = (conv.spec.kernel[0] - 1).checked_mul(a.dilation[0])?;
        out_rows
            .checked_sub(1)?
            .checked_mul(a.stride[0])?
            .checked_add(span.checked_add(1)?)
    }

    /// Scratch values for the phases of `out_rows` output rows of one image.
    pub(super) fn buffer_len(&self, conv: &DirectConv, out_rows: usize) -> candle_core::Result<usize> {
        match self
            .input_rows(conv, out_rows.max(1))
            .and_then(|rows| rows.checked_mul(self.row))
        {
            Some(len) => len
                .checked_add(SLACK)
                .ok_or_else(|| candle_core::Error::Msg("phases overflow".into())),
            None => bail!("conv input phases for {out_rows} rows overflow"),
        }
    }

    /// The most output rows of one image among `block`'s segments.
    pub(super) fn block_rows(block: &Block) -> usize {
        groups(&block.segments).map(|g| g.len()).max().unwrap_or(1)
    }

    /// Values from one output row's phases to the next's (`stride` padded
    /// input rows).
    pub(super) fn pitch(&self, conv: &DirectConv) -> usize {
        conv.spec.attrs.stride[0] * self.row
    }

    /// Scratch values for the phases of every image of `block`, one after
    /// the other ([`Run::lane_phased`]).
    pub(super) fn lane_buffer_len(&self, conv: &DirectConv, block: &Block) -> candle_core::Result<usize> {
        groups(&block.segments).try_fold(0usize, |sum, group| {
            let len = self.buffer_len(conv, group.len())?;
            sum.checked_add(len)
                .ok_or_else(|| candle_core::Error::Msg("conv input phases overflow".into()))
        })
    }
}

impl Run<'_> {
    /// The products of `block`'s pixels, `m[o·m_cols + seg.col..]` for each
    /// segment (`m` `[O_pad, m_cols]`, `m_cols` at least the block's
    /// columns plus a granule), through the phases in `buf` (at least
    /// [`Phases::buffer_len`] for [`Phases::block_rows`]). With `split`,
    /// the output channels' panels are shared by the threads.
    pub(super) fn phased(
        &self,
        phases: &Phases,
        block: &Block,
        buf: &mut [f32],
        m: &mut [f32],
        m_cols: usize,
    ) -> candle_core::Result<()> {
        let conv = self.conv;
        let pitch = phases.pitch(conv);
        for group in groups(&block.segments) {
            let y0 = group[0].y;
            let region = &mut buf[..phases.buffer_len(conv, group.len())?];
            self.fill_phases(phases, group, region, false);
            let v = Gathered {
                data: region,
                table: &phases.table,
            };
            let product = |u: &[f32], m: &mut [f32], rows: usize| {
                for seg in group {
                    let start = (seg.y - y0) * pitch + seg.x0;
                    let cols = (seg.x1 - seg.x0).next_multiple_of(PANEL_GRANULE);
                    panel_gemm_gathered(conv.isa(), u, v, start, &mut m[seg.col..], m_cols, [rows, cols]);
                }
            };
            self.panel_runs(m, m_cols, product);
        }
        Ok(())
    }

    /// The lane layout's block ([`lane_gemm_gathered`](crate::cpu::gemm::lane_gemm_gathered)): each image's
    /// phases into `buf` ([`Phases::lane_buffer_len`]), rows shared by the
    /// threads with `split`; then tasks owning whole lane groups multiply
    /// every image's pixels in tiles of one or two output rows
    /// ([`lane_tiles`]) into `m`'s second part (`[O_pad / LANES][pixels]
    /// [LANES]`), bring their groups back to rows of its first (`[O_pad,
    /// m_cols]`) and write their channels' epilogue: one parallel pass
    /// after the fill.
    pub(super) fn lane_phased(
        &self,
        phases: &Phases,
        block: &Block,
        buf: &mut [f32],
        m: &mut [f32],
        m_cols: usize,
    ) -> candle_core::Result<()> {
        let conv = self.conv;
        let pixels = block.pixels;
        let (m, partials) = m.split_at_mut(conv.padded_out * m_cols);
        let partials = &mut partials[..conv.padded_out * pixels];
        // Each image's phases: (its segments, its region of `buf`).
        let mut images = Vec::new();
        let mut rest = &mut *buf;
        for group in groups(&block.segments) {
            let len = phases.buffer_len(conv, group.len())?;
            let (region, tail) = std::mem::take(&mut rest).split_at_mut(len);
            images.push((group, region));
            rest = tail;
        }
        for (group, region) in &mut images {
            self.fill_phases(phases, group, region, self.split);
        }
        let sources: Vec<Source> = images
            .iter()
            .map(|(group, region)| {
                // In the phases, output row `y` starts `pitch` values after row `y - 1`.
                let (y0, pitch) = (group[0].y, phases.pitch(conv));
                let start = |seg: &Segment| (seg.y - y0) * pitch + seg.x0;
                Source {
                    v: Gathered {
                        data: region,
                        table: &phases.table,
                    },
                    tiles: lane_tiles(group, start, pitch, 1, conv.tile_limit()),
                }
            })
            .collect();
        self.lane_tasks(&sources, block, partials, m, m_cols);
        Ok(())
    }

    /// The phases of one image's segments (`group`, consecutive output
    /// rows) into `region` ([`Phases::buffer_len`] of their rows), the
    /// [`SLACK`] past them zeroed; with `shared`, the rows split among
    /// the threads.
    fn fill_phases(&self, phases: &Phases, group: &[Segment], region: &mut [f32], shared: bool) {
        let (image, first) = (group[0].image, group[0].y * self.conv.spec.attrs.stride[0]);
        let (filled, slack) = region.split_at_mut(region.len() - SLACK);
        let rows = filled.len() / phases.row;
        let per_fill = match shared {
            true => rows.div_ceil(2 * rayon::current_num_threads()).max(1),
            false => rows,
        };
        filled
            .par_chunks_mut(per_fill * phases.row)
            .enumerate()
            .for_each(|(i, out)| {
                self.conv.isa().run(Fill {
                    run: self,
                    phases,
                    image,
                    first: first + i * per_fill,
                    out,
                })
            });
        slack.fill(0.0);
    }

    /// The phases of image `image`'s padded input rows `first..` into
    /// `out` (whole rows of `phases.row`): zeros where a row or column
    /// lies in the padding.
    #[inline(always)]
    fn fill_body(&self, phases: &Phases, image: usize, first: usize, out: &mut [f32]) {
        let (s, a) = (&self.shape, &self.conv.spec.attrs);
        let (sx, [py, px]) = (a.stride[1], a.padding);
        for (i, row) in out.chunks_exact_mut(phases.row).enumerate() {
            let iy = (first + i).checked_sub(py).filter(|&iy| iy < s.height);
            let (row, pad) = row.split_at_mut(phases.used);
            pad.fill(0.0);
            let Some(iy) = iy else {
                row.fill(0.0);
                continue;
            };
            // Phase by phase, so that each phase's bounds (two divisions,
            // which cost more than a segment's copy) are worked out once
            // for all the channels: row `cp` is channel `cp / sx`'s phase
            // `cp % sx`.
            for p in 0..sx {
                // Phase value j is padded column j·sx + p, input column j·sx + p − px.
                let lo = px.saturating_sub(p).div_ceil(sx).min(phases.width);
                let hi = s
                    .width
                    .saturating_add(px)
                    .saturating_sub(p)
                    .div_ceil(sx)
                    .clamp(lo, phases.width);
                for (c, dst) in row.chunks_exact_mut(phases.width).skip(p).step_by(sx).enumerate() {
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let line = &self.input[(image * s.channels + c) * s.in_plane() + iy * s.width..][..s.width];
                        gather_strided_on(self.conv.isa(), &line[lo * sx + p - px..], sx, &mut dst[lo..hi]);
                    }
                }
            }
        }
    }
}

/// Micro-tiles of at most `max` pixels in at most `max_runs` runs over
/// `runs` (segments of one output row each, in the block's columns), each
/// group of runs cut in tiles of equal width (no tiny remainder): `h` rows
/// at once where the next `h − 1` runs are the next rows of the same image
/// over the same columns and that takes the most pixels a tile (the fewest
/// `h` of equals). ResNet's 7-wide rows at batch 1: one tile of 2 × 7 on
/// AVX-512; on AVX2 columns of 6 × 1 (seven tiles for six rows, against
/// nine in row pairs of 2 × 3 and 2 × 2); its 14-wide rows on AVX2 three
/// at a time in tiles of 3 × 2 (seven tiles for three rows; a pair takes
/// five). Run `seg`'s first pixel reads from `start(seg)`, the next row's
/// `pitch` on, its pixels `step` apart.
pub(super) fn lane_tiles(
    runs: &[Segment],
    start: impl Fn(&Segment) -> usize,
    pitch: usize,
    step: usize,
    (max, max_runs): (usize, usize),
) -> Vec<LaneTile> {
    let max = max.max(1);
    let mut tiles = Vec::new();
    let mut k = 0;
    while k < runs.len() {
        let seg = runs[k];
        let width = seg.x1 - seg.x0;
        let col_pitch = runs.get(k + 1).map_or(0, |next| next.col.wrapping_sub(seg.col));
        // The runs after `seg` that continue it: the next rows, same columns,
        // evenly spaced in the block.
        let follows = |j: usize| {
            runs.get(k + j).is_some_and(|r| {
                r.image == seg.image
                    && r.y == seg.y + j
                    && (r.x0, r.x1) == (seg.x0, seg.x1)
                    && r.col == seg.col.wrapping_add(j.wrapping_mul(col_pitch))
            })
        };
        let available = (1..max_runs.min(max)).take_while(|&j| follows(j)).count() + 1;
        // Tiles for `h` rows at once, and the rows with the most pixels a
        // tile (compared as h / tiles, cross-multiplied; the first on ties).
        let count = |h: usize| width.div_ceil((max / h).max(1));
        let rows = (1..=available)
            .reduce(|best, h| match h * count(best) > best * count(h) {
                true => h,
                false => best,
            })
            .unwrap_or(1);
        let (count, col_pitch) = (count(rows), if rows > 1 { col_pitch } else { 0 });
        let first = start(&seg);
        let mut x = 0;
        for t in 0..count {
            let w = (width - x).div_ceil(count - t);
            tiles.push(LaneTile {
                start: first + x * step,
                pitch,
                step,
                col: seg.col + x,
                col_pitch,
                col_step: 1,
                width: w,
                rows,
            });
            x += w;
        }
        k += rows;
    }
    tiles
}

/// [`Run::fill_body`] compiled for the conv's path (its strided gathers
/// vectorise with the path's shuffles).
struct Fill<'a, 'r> {
    run: &'a Run<'r>,
    phases: &'a Phases,
    image: usize,
    first: usize,
    out: &'a mut [f32],
}

impl IsaBody for Fill<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.fill_body(self.phases, self.image, self.first, self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::{lane_tiles, Phases, LINE};
    use crate::cpu::conv::direct::{DirectConv, Segment};
    use crate::cpu::conv::tests::{random_case, RandomCase};
    use crate::cpu::gemm::LaneTile;
    use crate::cpu::gemm::{Isa, Layout, PANEL_GRANULE};
    use crate::cpu::pool::max_pool2d;
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

    /// A random conv case ([`random_case`]: candle's output with the
    /// residual, if any, added before the activation) and its attributes:
    /// `[batch, channels, outputs, oh, ow]` with a `[kh, kw]` kernel at
    /// `[stride, dilation]` on both axes and padding `[py, px]`; `None`
    /// where the padding is wider than the input.
    fn case(
        [batch, channels, outputs, oh, ow]: [usize; 5],
        [kh, kw]: [usize; 2],
        [stride, dilation]: [usize; 2],
        [py, px]: [usize; 2],
        residual: bool,
        activation: Option<usize>,
    ) -> Option<(RandomCase, Conv2dAttrs)> {
        let extent =
            |out: usize, k: usize, pad: usize| ((out - 1) * stride + (k - 1) * dilation + 1).checked_sub(2 * pad);
        let (height, width) = (extent(oh, kh, py)?, extent(ow, kw, px)?);
        if height == 0 || width == 0 {
            return None;
        }
        let attrs = Conv2dAttrs {
            stride: [stride; 2],
            padding: [py, px],
            dilation: [dilation; 2],
            groups: 1,
        };
        let case = random_case(
            [batch, channels, height, width],
            [outputs, channels, kh, kw],
            attrs,
            activation,
            residual,
        );
        assert_eq!(case.want.dims(), [batch, outputs, oh, ow]);
        Some((case, attrs))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Convs that read phases (wide kernels for their stride, output
        /// rows of 14 to 48, which leave a row's last tile partial or not;
        /// kernels from twice the strides' area, 3×3 stride 2 included, on
        /// the AVX2 path, from 12 times elsewhere, im2col below)
        /// equal candle's conv on every path: dilation, padding per axis,
        /// several images, small blocks (segments that start and end
        /// inside rows, blocks across images), a residual and an
        /// activation, and with ResNet's max pool fused, the conv then the
        /// engine's pool. Two threads: few blocks split their panels.
        #[test]
        fn equals_candle(
            batch in 1usize..3, channels in 1usize..4, outputs in 1usize..20,
            [kh, kw] in [3usize..8, 3usize..8], stride in 1usize..3, dilation in 1usize..3,
            [py, px] in [0usize..4, 0usize..4],
            ow in prop::sample::select(vec![14usize, 15, 16, 28, 30, 32, 48]), oh in 2usize..5,
            block_tiles in proptest::option::of(1usize..6),
            activation in proptest::option::of(0usize..6), residual in any::<bool>(), pooled in any::<bool>(),
        ) {
            prop_assume!(kh * kw >= super::MIN_COPY_RATIO_AVX2 * stride * stride);
            let sizes = [batch, channels, outputs, oh, ow];
            let Some((RandomCase { x, w, b, residual: r, activation, mut want }, attrs)) = case(sizes, [kh, kw], [stride, dilation], [py, px], residual, activation) else {
                return Err(TestCaseError::reject("padding wider than the input"));
            };
            let pool = pooled.then_some(MaxPool2dAttrs { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ceil_mode: false });
            if let Some(pool) = &pool {
                want = max_pool2d(Isa::Scalar, &want, pool).unwrap();
            }
            let threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let depth = channels * kh * kw;
            for isa in Isa::available() {
                let mut conv = DirectConv::for_test(&w, Some(&b), attrs, activation, pool, Layout::Panels, isa).unwrap();
                if let Some(tiles) = block_tiles {
                    conv = conv.with_block_bytes(tiles * PANEL_GRANULE * (depth + outputs) * 4);
                }
                let shape = conv.spec.check(&x, r.as_ref()).unwrap().shape;
                // On paths with a higher ratio, im2col: equal all the same.
                let phased = kh * kw >= super::min_copy_ratio(&conv) * stride * stride;
                prop_assert_eq!(Phases::applies(&conv, &shape), phased);
                let got = threads.install(|| conv.run(&x, r.as_ref())).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// The lane layout's convs that may read phases (kernels of more
        /// than one value, column strides up to MAX_LANE_STRIDE; those with
        /// few border pixels at strides 1-2 read the input in place
        /// instead, `unpadded.rs`, tested there too) equal candle's
        /// conv on every path: dilation, padding per axis, partial lane
        /// groups, output rows narrower and wider than a tile (one- and
        /// two-row tiles), several images and more pixels than a block
        /// (segments that start inside rows, blocks across images), a
        /// residual and an activation. Two threads: one block splits its
        /// lane groups and fill.
        #[test]
        fn lanes_equal_candle(
            batch in 1usize..3, channels in 1usize..6, outputs in 1usize..70,
            [kh, kw] in [1usize..6, 1usize..6], stride in 1usize..=super::MAX_LANE_STRIDE, dilation in 1usize..3,
            [py, px] in [0usize..3, 0usize..3], ow in 1usize..30, oh in 1usize..12,
            activation in proptest::option::of(0usize..6), residual in any::<bool>(),
        ) {
            prop_assume!(kh * kw > 1);
            let sizes = [batch, channels, outputs, oh, ow];
            let Some((RandomCase { x, w, b, residual: r, activation, want }, attrs)) = case(sizes, [kh, kw], [stride, dilation], [py, px], residual, activation) else {
                return Err(TestCaseError::reject("padding wider than the input"));
            };
            let threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let depth = channels * kh * kw;
            for isa in Isa::available() {
                let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Lanes, isa).unwrap();
                let shape = conv.spec.check(&x, r.as_ref()).unwrap().shape;
                prop_assert!(Phases::applies(&conv, &shape));
                let got = threads.install(|| conv.run(&x, r.as_ref())).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    /// Tiles: ResNet's 7-wide rows two at a time on AVX-512 (the last row
    /// alone) and on AVX2 (in three tiles), 14-wide rows one tile each on
    /// AVX-512, 30-wide rows in equal tiles, rows a whole number of tiles
    /// wide one at a time, a segment that starts inside a row alone.
    #[test]
    fn lane_tiles_pair_narrow_rows() {
        let seg = |y, x0, x1, col| Segment {
            image: 0,
            y,
            x0,
            x1,
            col,
        };
        let rows = |width: usize, n: usize| (0..n).map(|y| seg(y, 0, width, y * width)).collect::<Vec<_>>();
        let shapes = |tiles: Vec<LaneTile>| tiles.iter().map(|t| (t.col, t.width, t.rows)).collect::<Vec<_>>();
        // Output row `y` 100 values after row `y - 1` from the first run's.
        // AVX-512's limits: two runs a tile.
        let lane_tiles = |runs: &[Segment], max| lane_tiles(runs, |s| (s.y - runs[0].y) * 100 + s.x0, 100, 1, (max, 2));
        assert_eq!(shapes(lane_tiles(&rows(7, 3), 14)), [(0, 7, 2), (14, 7, 1)]);
        let pair = lane_tiles(&rows(7, 2), 14)[0];
        assert_eq!((pair.start, pair.pitch, pair.col_pitch), (0, 100, 7));
        assert_eq!(shapes(lane_tiles(&rows(14, 2), 14)), [(0, 14, 1), (14, 14, 1)]);
        // AVX2's 6-pixel tiles: 7-wide rows as 2 × 3, 2 × 2, 2 × 2.
        assert_eq!(shapes(lane_tiles(&rows(7, 2), 6)), [(0, 3, 2), (3, 2, 2), (5, 2, 2)]);
        assert_eq!(
            shapes(lane_tiles(&rows(12, 2), 6)),
            [(0, 6, 1), (6, 6, 1), (12, 6, 1), (18, 6, 1)]
        );
        assert_eq!(
            shapes(lane_tiles(&rows(30, 1), 14)),
            [(0, 10, 1), (10, 10, 1), (20, 10, 1)]
        );
        // AVX2's: up to six runs of a pixel; a 7 × 7 plane in columns of
        // six rows and the last row in two; 14-wide rows in threes.
        let avx2 = |runs: &[Segment]| shapes(super::lane_tiles(runs, |s| s.y * 100 + s.x0, 100, 1, (6, 6)));
        let mut want: Vec<_> = (0..7).map(|x| (x, 1, 6)).collect();
        want.extend([(42, 4, 1), (46, 3, 1)]);
        assert_eq!(avx2(&rows(7, 7)), want);
        assert_eq!(avx2(&rows(14, 3)), (0..7).map(|x| (2 * x, 2, 3)).collect::<Vec<_>>());
        let column = super::lane_tiles(&rows(7, 6), |s| s.y * 100 + s.x0, 100, 1, (6, 6))[3];
        assert_eq!(
            (column.start, column.pitch, column.col, column.col_pitch),
            (3, 100, 3, 7)
        );
        // Rows of another width or image, or not the next row, end a group.
        let broken = [seg(0, 0, 7, 0), seg(1, 0, 7, 7), seg(3, 0, 7, 14)];
        assert_eq!(avx2(&broken), [(0, 3, 2), (3, 2, 2), (5, 2, 2), (14, 4, 1), (18, 3, 1)]);
        let tiles = lane_tiles(&[seg(3, 2, 7, 0), seg(4, 0, 7, 5)], 14);
        assert_eq!(shapes(tiles.clone()), [(0, 5, 1), (5, 7, 1)]);
        assert_eq!((tiles[0].start, tiles[1].start), (2, 100));
    }

    /// ResNet's 3×3 stride-2 convs (onto 28- and 14-wide rows) read phases
    /// in the panel layout on the AVX2 path only; MobileNetV3's 3 -> 16
    /// stem on AVX2 and on AVX-512 without wide FMAs; the 7×7 stride-2
    /// stem on every path; a 1×1 stride-2 downsample and 7-wide rows on
    /// none.
    #[test]
    fn three_by_three_stride_two_reads_phases_where_copies_cost() {
        let applies = |isa: Isa, [k, channels, outputs, width, out_width]: [usize; 5]| {
            let w = Tensor::zeros((outputs, channels, k, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let attrs = Conv2dAttrs {
                stride: [2, 2],
                padding: [k / 2; 2],
                ..Default::default()
            };
            let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, isa).unwrap();
            let shape = crate::cpu::conv::ConvShape {
                batch: 1,
                channels,
                height: width,
                width,
                out_channels: outputs,
                out_height: out_width,
                out_width,
            };
            (Phases::applies(&conv, &shape), conv.machine.wide_fma)
        };
        // [kernel, channels, outputs, input width, output width].
        let (conv_28, conv_14) = ([3, 64, 128, 56, 28], [3, 128, 256, 28, 14]);
        let (small_stem, stem) = ([3, 3, 16, 224, 112], [7, 3, 64, 224, 112]);
        let (downsample, conv_7) = ([1, 64, 128, 56, 28], [3, 256, 512, 14, 7]);
        // Packing runs on the path: only the paths this CPU has.
        for isa in Isa::available() {
            let avx2 = isa == Isa::Avx2Fma;
            let (small, wide) = applies(isa, small_stem);
            assert_eq!(
                small,
                avx2 || (isa == Isa::Avx512 && !wide),
                "{isa:?}, wide FMAs {wide}"
            );
            assert_eq!(
                (applies(isa, conv_28).0, applies(isa, conv_14).0),
                (avx2, avx2),
                "{isa:?}"
            );
            assert!(applies(isa, stem).0, "{isa:?}");
            assert!(!applies(isa, downsample).0 && !applies(isa, conv_7).0, "{isa:?}");
        }
    }

    /// Strides and widths near the integer range only make the phases not
    /// apply (no overflow, in debug builds too).
    #[test]
    fn huge_attributes_say_no() {
        let w = Tensor::zeros((4, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (stride, out_width) in [
            (usize::MAX / 2, 16),
            (1 << 40, 112),
            (1, usize::MAX - 3),
            (2, usize::MAX / 8 + 1),
        ] {
            let attrs = Conv2dAttrs {
                stride: [stride; 2],
                ..Default::default()
            };
            let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, Isa::Scalar).unwrap();
            let shape = crate::cpu::conv::ConvShape {
                batch: 1,
                channels: 3,
                height: 224,
                width: 224,
                out_channels: 4,
                out_height: 1,
                out_width,
            };
            assert!(!Phases::applies(&conv, &shape), "stride {stride}, width {out_width}");
        }
    }

    /// Every padded input row's phases take an odd number of cache lines,
    /// less than two of them padding, so that the phases of six
    /// consecutive output rows (a stride of padded rows apart) start in
    /// six different L1 sets (64 of them, a line each), whatever the
    /// channel count: ResNet50's layer4.0.conv2 (512 channels, 14×14,
    /// stride 2) made rows of exactly 32 KiB before (2 phases of 8 values).
    #[test]
    fn rows_take_an_odd_number_of_lines() {
        for channels in [1, 3, 64, 128, 256, 512, 1024] {
            for (in_width, stride) in [(14, 2), (28, 2), (7, 1), (56, 2)] {
                let w = Tensor::zeros((8, channels, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
                let attrs = Conv2dAttrs {
                    stride: [stride, stride],
                    padding: [1, 1],
                    ..Default::default()
                };
                let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Lanes, Isa::Scalar).unwrap();
                let x =
                    Tensor::zeros((1, channels, in_width, in_width), candle_core::DType::F32, &Device::Cpu).unwrap();
                let shape = conv.spec.check(&x, None).unwrap().shape;
                let phases = Phases::new(&conv, &shape).unwrap();
                let lines = phases.row / LINE;
                assert_eq!(phases.used, channels * stride * phases.width, "{channels} {in_width}");
                assert!(
                    phases.row % LINE == 0 && lines % 2 == 1,
                    "{channels} {in_width}: {lines} lines"
                );
                assert!(phases.used <= phases.row && phases.row < phases.used + 2 * LINE);
                let sets: std::collections::HashSet<usize> =
                    (0..6).map(|j| j * phases.pitch(&conv) / LINE % 64).collect();
                assert_eq!(sets.len(), 6, "{channels} {in_width} stride {stride}");
            }
        }
    }

    /// The rows and columns the phases hold: ResNet's stem (3 channels,
    /// 224 wide, 7×7 stride 2, padding 3, 112 out) reads 2 phases of 115
    /// values per channel (the 112 outputs and a reach of 3), 7 padded
    /// rows for one output row and 2 more per further row; 690 values a
    /// row, padded to 45 cache lines.
    #[test]
    fn stem_layout() {
        let w = Tensor::zeros((64, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let attrs = Conv2dAttrs {
            stride: [2, 2],
            padding: [3, 3],
            ..Default::default()
        };
        let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, Isa::Scalar).unwrap();
        let x = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
        let shape = conv.spec.check(&x, None).unwrap().shape;
        let phases = Phases::new(&conv, &shape).unwrap();
        assert_eq!((phases.width, phases.used, phases.row), (115, 3 * 2 * 115, 45 * 16));
        assert_eq!(phases.input_rows(&conv, 1), Some(7));
        assert_eq!(phases.input_rows(&conv, 4), Some(13));
        // (c, ky, kx) = (1, 2, 5): 2 rows down, channel 1's phase 1, 2 on.
        assert_eq!(phases.table[(7 + 2) * 7 + 5], 2 * 720 + (2 + 1) * 115 + 2);
    }
}
