//! How a blocked depthwise conv's output rows are cut into bands and its
//! tasks (images × channel groups × bands) shared by the threads.

use crate::cpu::data::CACHE_LINE_FLOATS;

/// The output rows of a blocked depthwise conv, as [`band_rows`] cuts them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows {
    /// Output rows of an image.
    pub(super) height: usize,
    /// The most rows a band may take (its scratch within the budget).
    pub(super) most: usize,
    /// Input rows per output row (the stride).
    pub(super) stride: usize,
    /// Input rows each band reads past its output rows' share
    /// (`(kh − 1)·dh + 1 − sh`): computed once per band (with a fused
    /// 1×1 conv, the expansion's rows are recomputed by each band).
    pub(super) halo: usize,
}

/// Output rows per band for `per_band` tasks per band (images × channel
/// groups) on `threads` threads: at most `rows.most`, few enough for four
/// tasks per thread; then, where that leaves the threads unequal numbers
/// of equal tasks (`equal`: every channel group as many blocks), the
/// first count of bands up to twice as many that gives each thread as
/// many, cut evenly (`⌈H / bands⌉` rows, no sliver), and whose halos add
/// at most an eighth to the input rows computed. On the Intel Xeon VM (2
/// threads, batch 1), profiles of the two alternating: MobileNetV2's
/// first expand + stride-2 depthwise (3 groups, 3 bands: 9 tasks) 0.35-0.38
/// ms against 0.26 in 4 bands; EfficientNet-B0's features.2.0 (the same
/// cut) 0.59 against 0.46, features.4.1 (15 groups, 14×14) 0.18 against
/// 0.13 in two bands; its 5×5 features.5.2 in two bands 1.14× slower
/// (halos a fifth more rows: not taken), MobileNetV3-Large's 72-channel
/// (unequal groups) features.3 and .4 1.08× and 1.17× (not taken).
pub(super) fn band_rows(rows: Rows, per_band: usize, threads: usize, equal: bool) -> usize {
    let wanted = threads.saturating_mul(4).div_ceil(per_band.max(1));
    let first = rows.most.min(rows.height.div_ceil(wanted.max(1))).max(1);
    let bands = |cut: usize| rows.height.div_ceil(cut.max(1));
    let even = |cut: usize| shares_evenly(rows, cut, per_band, threads);
    // Input rows the bands compute, in all: H·sh + bands·halo.
    let computed = |cut: usize| {
        rows.height
            .saturating_mul(rows.stride)
            .saturating_add(bands(cut).saturating_mul(rows.halo))
    };
    if !equal || even(first) {
        return first;
    }
    let start = bands(first);
    (start..=start.saturating_mul(2))
        .map(|count| rows.height.div_ceil(count.max(1)).max(1))
        .take_while(|&cut| computed(cut).saturating_mul(8) <= computed(first).saturating_mul(9))
        .find(|&cut| even(cut))
        .unwrap_or(first)
}

/// Whether bands of `cut` rows, `per_band` tasks each, give every one of
/// `threads` threads as many tasks.
pub(super) fn shares_evenly(rows: Rows, cut: usize, per_band: usize, threads: usize) -> bool {
    rows.height
        .div_ceil(cut.max(1))
        .checked_mul(per_band)
        .is_some_and(|tasks| tasks.is_multiple_of(threads.max(1)))
}

/// The channel blocks a blocked depthwise conv's tasks share out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Work {
    /// Images.
    pub(super) batch: usize,
    /// Channel blocks per image.
    pub(super) blocks: usize,
    /// Whether the last block is full (every block costs the same).
    pub(super) whole: bool,
}

/// Blocks per task and output rows per band: the first of `choices`
/// (blocks per task, most preferred first) whose tasks, cut into bands by
/// [`band_rows`] (the later choices in their first cut only), divide
/// evenly among `threads`, else the first choice. Two blocks a task let a
/// fused 1×1 conv compute both blocks' inputs at once; where that leaves
/// the threads unequal shares and one block a task does not, one. Intel
/// Xeon VM, batch 1, profiles of the two builds alternating:
/// EfficientNet-B0's 480-channel 5×5 depthwise on 14×14 (15 two-block
/// tasks, whose halos rule out more bands; 30 one-block tasks) 0.17 ->
/// 0.11 ms, its features.5.1 0.87×, 6.0 0.90×; MobileNetV3-Large's
/// 72-channel ones (5 blocks, 3 or 5 tasks a band) 0.92-0.94×; forwards
/// EfficientNet-B0 0.98×, MobileNetV3-Large 0.97×, MobileNetV2 level; AVX2
/// forced level.
pub(super) fn cut_tasks(rows: Rows, work: Work, choices: &[usize], threads: usize) -> (usize, usize) {
    let first = choices.first().copied().unwrap_or(1);
    let cut = |per_task: usize| {
        let per_task = per_task.max(1);
        let groups = work.blocks.div_ceil(per_task);
        // Tasks cost alike where every group has as many whole blocks;
        // the later choices keep the first cut of their bands (one block
        // a task in more bands: MobileNetV3-Large's 200-channel features.8
        // on AVX2, 25 blocks in two bands, 1.5× slower).
        let equal = work.whole && work.blocks.is_multiple_of(per_task) && per_task == first;
        let per_band = work.batch.saturating_mul(groups);
        let cut = band_rows(rows, per_band, threads, equal);
        (per_task, cut, shares_evenly(rows, cut, per_band, threads))
    };
    let (per_task, band_rows, _) = choices
        .iter()
        .map(|&p| cut(p))
        .find(|&(_, _, even)| even)
        .unwrap_or_else(|| cut(first));
    (per_task, band_rows)
}

/// Whether the tasks go band by band, each thread taking one run of them
/// ([`try_shares`](crate::cpu::parallel::try_shares): whole bands with all their channel blocks, a
/// horizontal strip of every output plane), rather than block by block
/// wherever rayon puts them: where there are several bands and their
/// boundaries fall on cache lines (`band_rows` rows of `width` and the
/// planes whole lines), so that no line is written by two threads. The 1×1
/// conv after it splits its columns the same way ([`try_shares`](crate::cpu::parallel::try_shares) over
/// runs of columns): each thread then reads the strip its own core wrote
/// instead of lines the other core holds. Intel Xeon VM, 2 threads,
/// MobileNetV2 at batch 1 (56×56 stage: bands of 28 and 14 rows),
/// alternating forwards: its 1×1 projections there 0.69-0.80× the time,
/// the depthwise convs 0.95×, the forward 0.977×; EfficientNet-B0,
/// MobileNetV3-Large and ResNet50 at batch 1, MobileNetV2 and ResNet50 at
/// batch 10 and MobileNetV2 with AVX2 forced level or 0.99×. (Band by band
/// on the 28-wide planes, whose 14-row boundary splits a line of every
/// channel, took 1.25-1.58× the time there.)
pub(super) fn by_bands(bands: usize, band_rows: usize, width: usize, plane: usize) -> bool {
    bands > 1
        && band_rows.saturating_mul(width).is_multiple_of(CACHE_LINE_FLOATS)
        && plane.is_multiple_of(CACHE_LINE_FLOATS)
}

#[cfg(test)]
mod tests {
    use super::{band_rows, by_bands, cut_tasks, Rows, Work};

    /// Rows `height` at stride `stride` with a halo of `halo` input rows.
    fn rows(height: usize, stride: usize, halo: usize) -> Rows {
        Rows {
            height,
            most: 1000,
            stride,
            halo,
        }
    }

    /// Band by band only where there are several bands and every band
    /// boundary starts a cache line: MobileNetV2's 56-wide planes in bands
    /// of 28 or 14 rows, not its 28-wide ones in bands of 14 (392 values:
    /// half a line shared) nor 14-wide ones in bands of 7.
    #[test]
    fn band_by_band_only_on_whole_lines() {
        assert!(by_bands(2, 28, 56, 56 * 56));
        assert!(by_bands(4, 14, 56, 56 * 56));
        assert!(!by_bands(1, 56, 56, 56 * 56));
        assert!(!by_bands(2, 14, 28, 28 * 28));
        assert!(!by_bands(2, 7, 14, 14 * 14));
        // Whole-line bands on planes that start mid-line: the planes'
        // first and last lines would be shared.
        assert!(!by_bands(2, 16, 17, 17 * 17));
    }

    /// Bands hold at most what the cache allows, make about four tasks a
    /// thread, and are cut smaller (to at most twice as many, evenly)
    /// where that gives each thread as many equal tasks for few rows more.
    #[test]
    fn bands_share_evenly() {
        // MobileNetV2's features.2 at batch 1, 2 threads: 3 groups of
        // blocks, 56 rows, 3×3 stride 2 (halo 1). Three bands of 19 (9
        // tasks) become four of 14 (12 tasks).
        assert_eq!(band_rows(rows(56, 2, 1), 3, 2, true), 14);
        // Unequal groups: the first cut stays.
        assert_eq!(band_rows(rows(56, 2, 1), 3, 2, false), 19);
        // 28 rows in four bands of 7, not three of 9 and a sliver of 1.
        assert_eq!(band_rows(rows(28, 2, 1), 3, 2, true), 7);
        // 14 rows, 15 groups, 3×3 stride 1 (halo 2): two bands of 7 (16 ->
        // 18 input rows); a 5×5 (halo 4: 18 -> 22) keeps one.
        assert_eq!(band_rows(rows(14, 1, 2), 15, 2, true), 7);
        assert_eq!(band_rows(rows(14, 1, 4), 15, 2, true), 14);
        // Already even, or one thread: the first cut stays.
        assert_eq!(band_rows(rows(56, 2, 1), 2, 2, true), 14);
        assert_eq!(band_rows(rows(56, 2, 1), 3, 1, true), 28);
        // Batch 10 with 2 threads: one band, 30 tasks.
        assert_eq!(band_rows(rows(56, 2, 1), 30, 2, true), 56);
        // The cache's bound comes first.
        assert_eq!(
            band_rows(
                Rows {
                    most: 5,
                    ..rows(56, 2, 1)
                },
                30,
                2,
                true
            ),
            5
        );
        // No even count within twice the bands (one row): the first cut.
        assert_eq!(band_rows(rows(1, 2, 1), 3, 2, true), 1);
        // Seven threads, 3 groups: 10 bands of 6 rows (30 tasks) become
        // 14 bands of 4 (42 tasks, 6 a thread).
        assert_eq!(band_rows(rows(56, 2, 1), 3, 7, true), 4);
    }

    /// Two blocks a task where their tasks share evenly; else one block a
    /// task where those do in their first cut; else the first choice.
    #[test]
    fn one_block_a_task_where_two_cannot_share_evenly() {
        let work = |batch, blocks, whole| Work { batch, blocks, whole };
        // EfficientNet-B0's 480 channels (30 blocks), 5×5 on 14×14 rows:
        // 15 two-block tasks, more bands ruled out by the halos; 30 one-block tasks.
        assert_eq!(cut_tasks(rows(14, 1, 4), work(1, 30, true), &[2, 1], 2), (1, 14));
        // MobileNetV2's features.2 (6 blocks): two a task, in 4 bands.
        assert_eq!(cut_tasks(rows(56, 2, 1), work(1, 6, true), &[2, 1], 2), (2, 14));
        // Five blocks, the last partial (72 channels): one a task, 2 bands.
        assert_eq!(cut_tasks(rows(28, 2, 3), work(1, 5, false), &[2, 1], 2), (1, 14));
        // One block a task only in its first cut: 25 blocks on 14 rows
        // (3×3, halo 2) would need two bands; two blocks a task stay.
        assert_eq!(cut_tasks(rows(14, 1, 2), work(1, 25, true), &[2, 1], 2), (2, 14));
        // A fixed choice stays, even and all.
        assert_eq!(cut_tasks(rows(14, 1, 4), work(1, 30, true), &[2], 2), (2, 14));
        // Nothing even (one row, five blocks: 3 or 5 tasks on two
        // threads): the first choice.
        assert_eq!(cut_tasks(rows(1, 1, 2), work(1, 5, true), &[2, 1], 2), (2, 1));
        // Batch 10: two a task.
        assert_eq!(cut_tasks(rows(14, 1, 4), work(10, 30, true), &[2, 1], 2), (2, 14));
    }
}
