//! The 1×1 conv after a channel-blocked depthwise conv (the projection of
//! a MobileNetV2-style block) fused into it: each task takes one band of
//! output rows of one image through every channel block (its input copied
//! in, or the expansion in front computed into the band's scratch,
//! [`super::expand`], then the depthwise sums), collects the band's
//! depthwise output as `[C, pixels]` rows in scratch, and multiplies the
//! projection's packed weights into them there, writing only the block's
//! output (with its bias and residual, [`planes`]). The expanded tensor
//! and the depthwise output, 6× the block's input and output on
//! MobileNetV2, are never written to memory.
//!
//! Each thread takes one run of consecutive bands ([`try_share_runs`])
//! and hands each band's last input rows (the ones the next band's window
//! starts with: two for a 3×3 stride-1 conv) to the next band of the same
//! image, which copies them rather than computing the expansion's rows
//! again: only the first band of a run computes its halo. Where the L2 is
//! small its bands are short and those rows many (a 512 KiB L2 cuts
//! MobileNetV2's 56×56 blocks into bands of 6 rows, each computing 8).
//! Intel Xeon VM, AVX2 forced with a Zen 3's caches emulated
//! (`WICK_CACHES=l1d=32K,l2=512K,l3=32M`), alternating forwards against
//! each band computing its halo (`scripts/ab_builds.py`, the fifty-fourth
//! session): MobileNetV2 at batch 10 0.952× and 0.976× the time, at batch
//! 1 0.971× and 0.980×, MobileNetV3-Large 0.997× at both; with a Zen 4's
//! (`l2=1M`, AVX-512) MobileNetV2 0.989× (batch 10) and 0.996× (batch 1);
//! with the VM's own (2 MiB L2) level: natively 0.999× at batch 1,
//! 0.989× and 1.010× at batch 10 (a third run, in a noisy minute, 1.043×,
//! quartiles 0.98-1.28), with AVX2 forced 0.996× and 0.993×.

use super::{compute, expand, pack, pad, tile, unpack, BlockedWeights, Geometry, Kernel, Source};
use crate::cpu::conv::planes::{self, PlaneRun, Product};
use crate::cpu::conv::ConvShape;
use crate::cpu::data::{with_scratch, CACHE_LINE_FLOATS};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{DepthChunks, Isa, PANEL_GRANULE, PANEL_ROWS};
use crate::cpu::output::Output;
use crate::cpu::parallel::try_share_runs;
use candle_core::bail;
use std::ops::Range;
use wick_ir::{Activation, Conv2dAttrs};

/// A fused projection's operands: its weights packed in panels
/// (`[O_pad / 8][C][8]`), input and output channels, and epilogue.
#[derive(Clone, Copy)]
pub(crate) struct Projection<'a> {
    pub(crate) packed: &'a [f32],
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) epilogue: &'a Epilogue,
    /// How its product on a band runs in depth (the 1×1 conv's
    /// [`crate::machine::Machine::depth_chunks`]).
    pub(crate) chunks: Option<DepthChunks>,
}

/// What one fused call reads besides the depthwise conv: its input (the
/// planes, or those of the expansion in front of it), the projection and
/// its residual (`[N, O, OH, OW]`).
pub(crate) struct Operands<'a> {
    pub(crate) source: Source<'a>,
    pub(crate) projection: Projection<'a>,
    pub(crate) residual: Option<&'a [f32]>,
}

/// Bands per thread the cut aims at at least (as the depthwise conv's own
/// cut, [`super::bands::band_rows`]).
const TASKS_PER_THREAD: usize = 4;

/// Bands per thread where fewer images than threads share them (one image's
/// bands): fewer, taller bands than [`TASKS_PER_THREAD`] gives, so that
/// MobileNetV2's 28×28 blocks (bands of 7 rows, not 4) fuse too and the
/// taller ones recomputed fewer halo rows (measured before the halos were
/// carried from band to band). Intel Xeon VM, 2 threads, batch 1, whole
/// forwards alternating with four bands a thread (`scripts/ab_builds.py`,
/// 30 rounds, the fifty-third session): MobileNetV2 0.990-1.007× with AVX2
/// forced in six runs (median 0.996×) and 0.981-0.991× natively in four,
/// MobileNetV3-Large 0.993× and 0.994× (AVX2), 0.990× (native); three bands
/// a thread 0.998× and 1.002×. With the halos carried (the fifty-fourth
/// session), four bands a thread measured 1.007× and 1.008× (native, AVX2);
/// one a thread (where [`band_cut`] counts one halo per thread's run, else
/// it declines) 1.039× and 1.004×.
const IMAGE_SHARED_TASKS_PER_THREAD: usize = 2;

/// Output rows per band of `height` for `batch` images on `threads`
/// threads: at most `most` ([`rows_per_band`]), few enough for
/// [`TASKS_PER_THREAD`] tasks a thread ([`IMAGE_SHARED_TASKS_PER_THREAD`]
/// with fewer images than threads); `None` (not fused: the two steps run
/// instead) with fewer images than threads at stride 2, or bands whose
/// input rows exceed their share by more than a third (as when each band
/// computed its halo; with halos carried, only each thread's first band
/// does, but a rule counting one halo per thread's run, which fuses the
/// 14×14 blocks at batch 1, measured level: 0.998× natively and with AVX2
/// forced, the fifty-fourth session). Fewer images than threads leave few
/// bands of one image to share: on the Intel Xeon VM (2 threads)
/// MobileNetV2 at batch 1 took 1.33× the time for features.4 (56 -> 28
/// rows, stride 2, 7 bands of 4 rows) and 1.02-1.04× for features.2 and .3
/// (8 bands of 7), the forward 1.02×, per-block profiles of the two builds
/// alternating (the forty-fifth session). At stride 1 (MobileNetV2's
/// features.0+1 and .3, MobileNetV3-Large's features.1 and .3 at 224×224,
/// in four bands a thread, whose halos declined the 28×28 blocks; those
/// fuse too since [`IMAGE_SHARED_TASKS_PER_THREAD`]) the fifty-third
/// session found the fused form ahead: whole forwards at batch 1
/// alternating with the build before (`scripts/ab_builds.py`, 30 rounds),
/// MobileNetV2 0.990× and 0.992× with AVX2 forced, 0.984× twice natively,
/// MobileNetV3-Large 0.993× and 0.985× (with a switch in one build:
/// MobileNetV2 0.988-0.998× in five runs; EfficientNet-B0, which has no
/// such pair, its projections reading the squeeze-and-excitation's scale,
/// 0.996-1.006×). `reach` is the input rows one output row reads
/// (`(kh − 1)·dh + 1`), `stride` the rows between output rows'.
fn band_cut(most: usize, [height, batch]: [usize; 2], [stride, reach]: [usize; 2], threads: usize) -> Option<usize> {
    // One image's bands share the threads.
    let shared = batch < threads;
    let per_thread = match shared {
        true => IMAGE_SHARED_TASKS_PER_THREAD,
        false => TASKS_PER_THREAD,
    };
    let bands = per_thread.saturating_mul(threads).div_ceil(batch.max(1));
    let rows = most.min(height.div_ceil(bands.max(1))).max(1);
    let tasks = batch.saturating_mul(height.div_ceil(rows));
    let computed = (rows - 1).saturating_mul(stride).saturating_add(reach);
    let share = rows.saturating_mul(stride);
    ((!shared || stride == 1) && tasks >= 2 * threads && computed.saturating_mul(3) <= share.saturating_mul(4))
        .then_some(rows)
}

/// Output rows per band: the band's depthwise output and products, `(C +
/// O_pad) · rows · OW` values, within `bytes`, and at most what the
/// depthwise scratch allows (`most`); at least one.
fn rows_per_band(bytes: usize, [channels, padded_out, out_width]: [usize; 3], most: usize) -> usize {
    let per_row = channels
        .saturating_add(padded_out)
        .saturating_mul(out_width)
        .saturating_mul(4);
    (bytes / per_row.max(1)).clamp(1, most.max(1))
}

/// Runs the depthwise conv of `shape` (`blocked`, with `activation` after
/// its bias) on its input (the expansion's output, computed band by band,
/// where `ops.source` has one) and the projection into a new output (`[N,
/// O, OH, OW]`, every value written; the caller sets the length). Bands
/// are cut so that a band's depthwise output and products take about half
/// the L2 (twice the depthwise conv's band budget, a quarter of it), and
/// enough of them for the threads ([`band_cut`]); `None`, with nothing
/// allocated, where there cannot be. Sizes are checked: an overflow is an
/// error.
#[allow(clippy::too_many_arguments)]
pub(in crate::cpu::conv::depthwise) fn run(
    isa: Isa,
    blocked: &BlockedWeights,
    activation: Option<Activation>,
    shape: ConvShape,
    (kernel, attrs): ([usize; 2], Conv2dAttrs),
    ops: Operands<'_>,
) -> candle_core::Result<Option<Output>> {
    let tile = tile(shape.out_width);
    let g = Geometry::new(shape, kernel, attrs, [blocked.lanes, tile, blocked.band_bytes])?;
    let overflow = || candle_core::Error::Msg(format!("depthwise conv: the sizes of {shape:?} overflow"));
    let in_plane = shape.height.checked_mul(shape.width).ok_or_else(overflow)?;
    let out_plane = shape.out_height.checked_mul(shape.out_width).ok_or_else(overflow)?;
    // The input the bands are made from and its values per image.
    let (x, per_image) = match ops.source {
        Source::Planes(x) => (x, shape.channels.checked_mul(in_plane)),
        Source::Expanded(x, e) => {
            if e.lanes != g.lanes || e.out_channels != shape.channels {
                bail!(
                    "depthwise conv: a fused conv of {} channels in blocks of {}, not {} in {}",
                    e.out_channels,
                    e.lanes,
                    shape.channels,
                    g.lanes
                )
            }
            (x, e.image_len([shape.height, shape.width]))
        }
    };
    let image_len = per_image.ok_or_else(overflow)?;
    let budget = blocked.band_bytes.saturating_mul(2);
    let (weight, bias) = (&blocked.weight, &blocked.bias);
    let (lanes, channels) = (g.lanes, shape.channels);
    let p = ops.projection;
    let padded_out = p.out_channels.next_multiple_of(PANEL_ROWS);
    let taps = g.kernel[0] * g.kernel[1];
    let most = rows_per_band(budget, [channels, padded_out, shape.out_width], g.band_rows);
    // Input rows one output row reads.
    let reach = g.band_input_rows(1);
    let threads = rayon::current_num_threads();
    let cut = band_cut(most, [shape.out_height, shape.batch], [g.stride[0], reach], threads);
    let Some(band_rows) = cut else {
        return Ok(None);
    };
    let g = Geometry { band_rows, ..g };
    let bands = shape.out_height.div_ceil(band_rows);
    let blocks = channels.div_ceil(lanes);
    // Scratch: each of a group's blocks' padded input (from a cache line),
    // the sums, the band's depthwise output `[C][cols]` and products
    // `[O_pad][cols]`, `cols` its pixels rounded up to the GEMM's granule.
    let most_cols = (band_rows * shape.out_width).next_multiple_of(PANEL_GRANULE);
    // A band's input rows that the next band's reads start with (the
    // rows past its own stride's share): carried over to the next band of
    // the same thread, `[blocks][halo][padded_width][lanes]`, not made again.
    let halo = reach.saturating_sub(g.stride[0]);
    let row_len = g.padded_width * lanes;
    // (Whole cache lines: the blocks' inputs after it start on one.)
    let carry_len = (blocks * lanes).checked_mul(halo).and_then(|n| {
        n.checked_mul(g.padded_width)?
            .checked_next_multiple_of(CACHE_LINE_FLOATS)
    });
    let stride = g.input_len.checked_next_multiple_of(CACHE_LINE_FLOATS);
    let windows = ops.source.window_len(&g, band_rows);
    let scratch_len = stride.and_then(|s| {
        s.checked_mul(expand::BLOCKS)?
            .checked_add(g.output_len)?
            .checked_add(channels.checked_add(padded_out)?.checked_mul(most_cols)?)?
            .checked_add(windows?)?
            .checked_add(carry_len?)
    });
    let (Some(stride), Some(carry_len), Some(scratch_len)) = (stride, carry_len, scratch_len) else {
        bail!("depthwise conv: the fused projection's band of {shape:?} overflows")
    };
    let (weights, input) = (padded_out.checked_mul(channels), shape.batch.checked_mul(image_len));
    if weights.is_none_or(|n| p.packed.len() < n) || input != Some(x.len()) {
        bail!("depthwise conv: a fused projection's operands are short for {shape:?}")
    }
    let out_len = (shape.batch.checked_mul(p.out_channels))
        .and_then(|n| n.checked_mul(out_plane))
        .ok_or_else(overflow)?;
    if ops.residual.is_some_and(|r| r.len() != out_len) {
        bail!("depthwise conv: a residual of another size than the projection's output")
    }
    let mut output = Output::new(out_len, "conv output")?;
    let out = output.shared(out_len);
    // One band of one image (`task`), in `scratch`; `carry` says whether
    // the band before it ran just before on this thread (its last `halo`
    // rows wait in the carry) and whether the next one runs next.
    let body = |task: usize, [carry_in, carry_out]: [bool; 2], scratch: &mut [f32]| {
        let (image, band) = (task / bands, task % bands);
        let first_row = band * band_rows;
        let rows = band_rows.min(shape.out_height - first_row);
        let pixels = rows * shape.out_width;
        let cols = pixels.next_multiple_of(PANEL_GRANULE);
        let x = &x[image * image_len..][..image_len];
        // The carry first: the same place for every band.
        let (carried, rest) = scratch.split_at_mut(carry_len);
        let (padded, rest) = rest.split_at_mut(stride * expand::BLOCKS);
        let (sums, rest) = rest.split_at_mut(g.output_len);
        let (depthwise, rest) = rest.split_at_mut(channels * cols);
        let (products, windows) = rest.split_at_mut(padded_out * cols);
        // Scratch rows `used - halo..used` are the next band's first.
        let used = g.band_input_rows(rows);
        let carry = |block: usize| block * halo * row_len..(block + 1) * halo * row_len;
        for first_block in (0..blocks).step_by(expand::BLOCKS) {
            let count = expand::BLOCKS.min(blocks - first_block);
            let (mut span, mut r0) = (0..0, 0);
            for (j, one) in padded.chunks_exact_mut(stride.max(1)).take(count).enumerate() {
                (span, r0) = pad(&g, one, first_row, rows);
                if carry_in {
                    one[..halo * row_len].copy_from_slice(&carried[carry(first_block + j)]);
                }
            }
            if carry_in {
                // The interior rows among the carried ones are not made again.
                let skip = halo.saturating_sub(r0).min(span.len());
                (span.start, r0) = (span.start + skip, r0 + skip);
            }
            match ops.source {
                _ if span.is_empty() => {}
                Source::Planes(_) => {
                    for (j, padded) in padded.chunks_exact_mut(stride.max(1)).take(count).enumerate() {
                        let first = (first_block + j) * lanes;
                        let planes = lanes.min(channels - first);
                        let x = &x[first * in_plane..][..planes * in_plane];
                        pack(isa, &g, x, planes, padded, span.clone(), r0);
                    }
                }
                Source::Expanded(_, e) => {
                    let blocks = first_block..first_block + count;
                    expand::fill(isa, &g, e, blocks, x, (padded, stride), (span, r0), &mut *windows)
                }
            }
            for (j, padded) in padded.chunks_exact(stride.max(1)).take(count).enumerate() {
                let block = first_block + j;
                let first = block * lanes;
                if carry_out {
                    carried[carry(block)].copy_from_slice(&padded[(used - halo) * row_len..used * row_len]);
                }
                compute(
                    isa,
                    tile,
                    Kernel {
                        g,
                        rows,
                        input: padded,
                        weight: &weight[block * taps * lanes..][..taps * lanes],
                        bias: &bias[first..][..lanes],
                        fused: true,
                        activation,
                        output: &mut sums[..g.output_len],
                    },
                );
                // The block's channels' rows of the band's output.
                let planes = lanes.min(channels - first);
                let mut rows_of = depthwise[first * cols..][..planes * cols].chunks_exact_mut(cols);
                let mut outs: [&mut [f32]; 16] = std::array::from_fn(|_| match rows_of.next() {
                    Some(row) => &mut row[..pixels],
                    None => &mut [],
                });
                unpack(isa, &g, sums, &mut outs[..planes], rows);
            }
        }
        // Columns past `pixels` hold stale values: each product column
        // reads only its own, and those past `pixels` are not stored.
        let product = Product {
            isa,
            packed: p.packed,
            epilogue: p.epilogue,
            out_channels: p.out_channels,
            padded_out,
            depth: channels,
            v: &depthwise[..channels * cols],
            cols,
            pixels,
            chunks: p.chunks,
        };
        let run = PlaneRun {
            dst: out,
            base: image * p.out_channels * out_plane + first_row * shape.out_width,
            plane: out_plane,
            residual: ops.residual,
        };
        // SAFETY: tasks write disjoint bands (image, rows) of the
        // output planes; nothing else touches `out` meanwhile.
        unsafe { planes::store(product, run, products) };
    };
    // Each thread one run of bands, in order, each band after the first
    // of an image taking its first rows from the band before.
    try_share_runs(shape.batch * bands, |run: Range<usize>| {
        with_scratch(scratch_len, |scratch| {
            for task in run.clone() {
                let carry_in = task > run.start && task % bands != 0;
                let carry_out = task + 1 < run.end && (task + 1) % bands != 0;
                body(task, [carry_in, carry_out], &mut *scratch);
            }
        })
    })?;
    Ok(Some(output))
}

#[cfg(test)]
mod tests {
    use super::{band_cut, rows_per_band};

    /// Bands give each thread four tasks where the cache allows (two where
    /// one image's bands share the threads); fewer than two a thread, halos
    /// past a third of a band's rows, or fewer images than threads at
    /// stride 2, decline.
    #[test]
    fn bands_share_the_threads_or_decline() {
        // Batch 10 on 2 threads: one band an image, as the cache allows.
        assert_eq!(band_cut(14, [14, 10], [1, 3], 2), Some(14));
        assert_eq!(band_cut(6, [14, 10], [1, 3], 2), Some(6));
        // ... but not in bands of 5 (7 rows computed for 5).
        assert_eq!(band_cut(5, [14, 10], [1, 3], 2), None);
        // Batch 2: four bands of 8 rows (the last 6), halos 10 / 8.
        assert_eq!(band_cut(30, [30, 2], [1, 3], 2), Some(8));
        // Batch 1 on two threads: two bands a thread at stride 1, four of
        // 14 rows (28 rows: four of 7, halos 9 / 7); at stride 2 it
        // declines; on one thread (as many images), four bands.
        assert_eq!(band_cut(56, [56, 1], [1, 3], 2), Some(14));
        assert_eq!(band_cut(28, [28, 1], [1, 3], 2), Some(7));
        assert_eq!(band_cut(56, [28, 1], [2, 3], 2), None);
        assert_eq!(band_cut(56, [56, 1], [1, 3], 1), Some(14));
        // 14 rows at batch 1 on two threads: bands of 4, halos 6 / 4.
        assert_eq!(band_cut(14, [14, 1], [1, 3], 2), None);
        // Bands of 2 rows (4 / 2) decline; so does one row of two images.
        assert_eq!(band_cut(14, [14, 2], [1, 3], 8), None);
        assert_eq!(band_cut(1, [1, 2], [1, 1], 2), None);
    }

    /// Bands keep the depthwise output and products within the budget,
    /// at least one row, at most what the depthwise scratch allows.
    #[test]
    fn bands_fit_the_budget() {
        // 144 channels, 24 outputs (24 padded), 56 wide: 18 KB a row.
        assert_eq!(rows_per_band(512 << 10, [144, 24, 56], 56), 13);
        assert_eq!(rows_per_band(512 << 10, [144, 24, 56], 8), 8);
        assert_eq!(rows_per_band(1, [144, 24, 56], 8), 1);
        assert_eq!(rows_per_band(1 << 30, [960, 160, 7], 7), 7);
    }
}
