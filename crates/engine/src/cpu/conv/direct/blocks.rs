//! How a direct conv's output pixels are cut into blocks: how wide, how
//! many per image, and whether the threads share each block.

use crate::cpu::gemm::PANEL_GRANULE;

/// Smallest block worth running on its own thread rather than splitting
/// one block's phases across threads.
pub(super) const MIN_BLOCK_COLS: usize = 128;

/// Most output pixels per block in the lane layout (its product keeps one
/// block's columns for every lane group).
pub(super) const LANE_BLOCK_PIXELS: usize = 256;

/// Output pixels per block of the lane layout for `total` pixels on
/// `threads` threads: one block up to [`LANE_BLOCK_PIXELS`], past it
/// whole rounds of equal blocks across the threads (its tiles broadcast
/// pixels, so a block need not fill 16-column tiles). The SIMD paths run deep
/// convs on lanes at every size ([`crate::cpu::conv_algorithm`]):
/// ResNet18's layer2.0.conv1 at batch 1 (784 pixels) in blocks of 256 was
/// 3 blocks and a 16-pixel one, 512 pixels on one thread and 272 on the
/// other (alone, 0.84× the panel layout's time on one thread, 1.00× on
/// two); in four of 196, 0.82× on two (Intel Xeon VM, AVX2 forced,
/// alternating runs).
pub(super) fn lane_block_pixels(total: usize, threads: usize) -> usize {
    let blocks = match total.div_ceil(LANE_BLOCK_PIXELS) {
        0 | 1 => 1,
        n => n.next_multiple_of(threads.max(1)),
    };
    total.div_ceil(blocks).max(1)
}

/// Whether a plane smaller than a block takes a block of its own, stored
/// in place with the epilogue in registers, rather than sharing blocks
/// with the next image's pixels through scratch and a separate epilogue
/// pass: at least [`MIN_BLOCK_COLS`] pixels (so at most 15 of 143, a
/// tenth, pad the last granule). ResNet18's downsample convs at batch 10
/// (1×1 stride 2 onto 28×28 and 14×14) took 0.70-0.78x the time alone and
/// 0.76x and 0.67x in the model, ResNet50's layer3.0.downsample 0.84x; the
/// 3×3 stride-2 conv onto 14×14 0.89-0.93x (Emerald Rapids Xeon,
/// alternating runs).
pub(super) fn whole_plane_block(plane: usize) -> bool {
    plane >= MIN_BLOCK_COLS
}

/// The width of `total` pixels' blocks (a multiple of the granule) for
/// about `blocks` of them (a multiple of `threads`) of at most about
/// `target` pixels: that many, or a round of blocks more or fewer (within
/// twice `target`), whichever gives each thread the fewest columns, each
/// block padding its pixels to whole 16-column tiles (ties: the fewer
/// blocks, each of which reads all the weights). ResNet50's 1×1 stride-2
/// downsample onto 7×7 at batch 10 (490 pixels, 85 a block by the L2) on
/// two threads: four blocks of 128 columns (two rounds, 256 columns a
/// thread, each block 1.5 budgets) where six of 96 took three rounds, 288
/// (eight of 64 tie with four); alone 0.89× the time
/// (Zen 4, `xtask compare`, 40 pairs), the other stride-2 convs of the
/// ResNets level.
pub(super) fn block_width(total: usize, blocks: usize, target: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let asked = Cut::of(total, blocks, 1, threads);
    let mut best = asked;
    for b in [blocks.saturating_sub(threads), blocks.saturating_add(threads)] {
        let cut = Cut::of(total, b, 1, threads);
        if b >= threads
            && cut.width <= target.saturating_mul(2)
            && cut.shared == asked.shared
            && cut.per_thread < best.per_thread
        {
            best = cut;
        }
    }
    best.width
}

/// Blocks per image for output planes of `plane` pixels in blocks of at
/// most about `cols` (a multiple of the granule), `batch` images on
/// `threads` threads: the fewest that fit, or one fewer where that takes
/// fewer columns per thread (each block pads its pixels to whole 16-column
/// tiles, and the threads take the batch's blocks in rounds), with each
/// image's last block non-empty. ResNet's 14×14 planes at batch 10 on two
/// threads: one block of 208 columns an image (10 % 2 = 0: five rounds,
/// 1040 columns a thread) where two of 112 took ten rounds, 1120. The
/// larger block passes the budget (the L2) by up to twice: blocks of 1.5 to
/// 2 budgets ran level with one on Zen 4 (fortieth session). Zen 4, 2
/// threads, alone at batch 10 (`xtask compare`, 60 pairs): ResNet50's
/// layer3.0.conv2 (3×3 stride 2, 256 -> 256 onto 14×14) 0.94× the time,
/// its 1×1 stride-2 downsample 512 -> 1024 0.88× (AVX2 forced 0.99×,
/// 0.90×); whole ResNet50, ResNet34 and ResNet18 at batch 10 0.993×,
/// 0.997×, 1.005× (within the host's noise).
pub(super) fn blocks_per_image(plane: usize, cols: usize, batch: usize, threads: usize) -> usize {
    let fit = plane.div_ceil(cols.max(1)).max(1);
    let fewer = fit - 1;
    if fewer == 0 {
        return fit;
    }
    let (a, b) = (
        Cut::of(plane, fewer, batch, threads),
        Cut::of(plane, fit, batch, threads),
    );
    match (fewer - 1) * a.width < plane && a.shared == b.shared && a.per_thread < b.per_thread {
        true => fewer,
        false => fit,
    }
}

/// Whether `blocks` blocks are too few for each of `threads` threads to
/// take two, so that the threads share each block's work (`Run::split`,
/// which also needs more than one thread).
pub(super) fn shares_blocks(blocks: usize, threads: usize) -> bool {
    blocks < 2 * threads.max(1)
}

/// `groups` runs of `pixels` pixels (the images, or the whole batch as one
/// run) cut into `k` blocks each, on `threads` threads: what
/// [`block_width`] and [`blocks_per_image`] weigh.
#[derive(Clone, Copy)]
pub(super) struct Cut {
    /// A block's columns: its pixels in whole 16-column tiles.
    pub(super) width: usize,
    /// Columns each thread computes, taking the blocks in rounds.
    per_thread: usize,
    /// Whether the threads share each block ([`shares_blocks`]).
    shared: bool,
}

impl Cut {
    pub(super) fn of(pixels: usize, k: usize, groups: usize, threads: usize) -> Cut {
        let blocks = groups.saturating_mul(k);
        let width = pixels.div_ceil(k.max(1)).next_multiple_of(PANEL_GRANULE);
        Cut {
            width,
            per_thread: blocks.div_ceil(threads.max(1)).saturating_mul(width),
            shared: shares_blocks(blocks, threads),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Blocks per image: the fewest that fit in `cols`, or one fewer where
    /// the threads then take fewer padded columns each; the last block of
    /// an image never empty.
    #[test]
    fn blocks_per_image_pads_less() {
        use super::{blocks_per_image, PANEL_GRANULE};
        // 14×14 at batch 10 on 2 threads: one block of 208 (five rounds)
        // rather than two of 112 (ten rounds).
        assert_eq!(blocks_per_image(196, 112, 10, 2), 1);
        // At batch 1, one block would leave a thread idle; at batch 2, one
        // block an image would share each block between the threads.
        assert_eq!(blocks_per_image(196, 112, 1, 2), 2);
        assert_eq!(blocks_per_image(196, 112, 2, 2), 2);
        // 28×28 at batch 1: four of 208 in two rounds, not three of 272.
        assert_eq!(blocks_per_image(784, 208, 1, 2), 4);
        // Whole tiles already: nothing to gain.
        assert_eq!(blocks_per_image(256, 128, 10, 2), 2);
        for plane in 1..600 {
            for cols in (16..400).step_by(16) {
                for (batch, threads) in [(1, 1), (1, 2), (3, 2), (10, 2), (7, 4)] {
                    let k = blocks_per_image(plane, cols, batch, threads);
                    let block = plane.div_ceil(k).next_multiple_of(PANEL_GRANULE);
                    assert!(
                        k >= 1 && (k - 1) * block < plane && k * block >= plane,
                        "{plane} {cols} {batch} {threads}"
                    );
                    assert!(k + 1 >= plane.div_ceil(cols) && k <= plane.div_ceil(cols));
                }
            }
        }
    }

    /// Lane blocks: one up to 256 pixels; past it at most 256 each, as
    /// many as a whole number of rounds across the threads, none empty,
    /// sizes within one of each other.
    #[test]
    fn lane_blocks_share_the_threads_evenly() {
        use super::{lane_block_pixels, LANE_BLOCK_PIXELS};
        assert_eq!(lane_block_pixels(784, 2), 196);
        assert_eq!(lane_block_pixels(256, 2), 256);
        assert_eq!(lane_block_pixels(49, 2), 49);
        for total in 1usize..2000 {
            for threads in 1..5 {
                let width = lane_block_pixels(total, threads);
                let blocks = total.div_ceil(width);
                let last = total - (blocks - 1) * width;
                assert!(width <= LANE_BLOCK_PIXELS || blocks == 1, "{total} {threads}");
                assert!(
                    total <= LANE_BLOCK_PIXELS || blocks.is_multiple_of(threads),
                    "{total} {threads}"
                );
                assert!(
                    last >= 1 && width - last < blocks,
                    "{total} {threads}: {width} × {blocks}, last {last}"
                );
            }
        }
    }

    /// Block widths: the budget's count of blocks, or a round more or
    /// fewer where each thread then pads fewer columns, never past twice
    /// the target; every width covers the pixels in whole tiles.
    #[test]
    fn block_width_pads_less() {
        use super::{block_width, PANEL_GRANULE};
        // 490 pixels, 85 a block, 2 threads: 4 of 128, not 6 of 96
        // (8 of 64 tie with 4: the fewer blocks).
        assert_eq!(block_width(490, 6, 85, 2), 128);
        // 784 pixels, 196 a block: 4 of 208 (2 rounds) beat 6 of 144 (3 rounds).
        assert_eq!(block_width(784, 4, 196, 2), 208);
        // Fewer, wider blocks only within twice the target.
        assert_eq!(block_width(1000, 8, 64, 2), 128);
        // Not from two blocks a thread down to one (shared by the threads).
        assert_eq!(block_width(490, 4, 85, 2), 128);
        for total in 1..700usize {
            for target in (16..300usize).step_by(16) {
                for threads in [1, 2, 3, 4usize] {
                    let blocks = total.div_ceil(target).next_multiple_of(threads);
                    let asked = total.div_ceil(blocks).next_multiple_of(PANEL_GRANULE);
                    let w = block_width(total, blocks, target, threads);
                    assert!(
                        w.is_multiple_of(PANEL_GRANULE) && w > 0,
                        "{total} {target} {threads}: {w}"
                    );
                    assert!(
                        w == asked || w <= 2 * target,
                        "{total} {target} {threads}: {w} past twice the target"
                    );
                }
            }
        }
    }

    /// Plane sizes that take a block of their own: at least 128 pixels.
    #[test]
    fn whole_plane_blocks() {
        for (plane, whole) in [
            (784, true),
            (196, true),
            (129, true),
            (128, true),
            (127, false),
            (49, false),
        ] {
            assert_eq!(super::whole_plane_block(plane), whole, "{plane}");
        }
    }
}
