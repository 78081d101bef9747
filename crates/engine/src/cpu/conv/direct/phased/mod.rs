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
//! not read the input itself (`unpadded/`: where at most a third of the
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
use crate::cpu::parallel::for_each;
use candle_core::bail;

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
        for_each(filled.chunks_mut(per_fill * phases.row).enumerate(), |(i, out)| {
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
mod tests;
