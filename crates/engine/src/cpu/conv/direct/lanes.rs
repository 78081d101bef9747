//! The lane layout's products on a block: im2col columns split in depth
//! parts or shared by lane groups, read through tables, and brought back
//! to rows for the epilogue.

use super::{Block, Run};
use crate::cpu::gemm::{lane_gemm, lane_gemm_gathered, lane_gemm_part, Isa, LaneProduct, Source, LANES, LANE_CHUNK};
use crate::cpu::parallel::for_each;
use crate::cpu::transpose::columns_to_block8;

/// The least depth a lane-layout product on im2col columns shared by the
/// threads is split at ([`lane_parts`]; 1×1 kernels and strides the
/// phases do not take, `phased/`). Measured when the 3×3 convs ran on
/// im2col too, alternating forwards at batch 1 on the Intel Xeon VM, two
/// threads: ResNet50's layer3.0.conv2 (2304 deep) 0.79-0.81× the time,
/// layer4.0.conv2 (4608) 0.89-0.90×, ResNet18's layer4.0.conv1 (2304)
/// 0.96-0.97×; split at every depth, its layer3.0.conv1 (1152) was level
/// and the 1×1 stride-2 downsamples (128-1024 deep) 1.12-1.52× slower (one
/// part on one thread, or the parts' sums outweighing the product).
const LANE_SPLIT_DEPTH: usize = 2048;

/// Parts of the depth a lane-layout block's product is split into
/// ([`Run::lane_products`]): with `split` (one block shared by the
/// threads) and at least [`LANE_SPLIT_DEPTH`], enough for every thread
/// twice over, at most one per chunk of the packed weights; otherwise one.
pub(super) fn lane_parts(depth: usize, split: bool) -> usize {
    match split && depth >= LANE_SPLIT_DEPTH {
        true => (2 * rayon::current_num_threads())
            .min(depth.div_ceil(LANE_CHUNK))
            .max(1),
        false => 1,
    }
}

/// Lane-layout products (`parts` sums of the depth, each
/// `[O_pad / LANES][pixels][LANES]`, one after the other) back to rows of
/// `m` (`[O_pad, cols]`, only the first `pixels` columns written), the
/// parts added in order into the first (which is left holding the sums);
/// a lane group per task, its columns moved eight at a time
/// ([`columns_to_block8`]). One by one, with a store `cols` values from the
/// last for each, they took 7.5% of the CPU time of ResNet18's
/// layer2.0.conv1 on lanes (576 deep, batch 1; Intel Xeon VM, AVX-512).
pub(super) fn lanes_to_rows(isa: Isa, partials: &mut [f32], parts: usize, pixels: usize, m: &mut [f32], cols: usize) {
    let per_group = pixels * LANES;
    let per_part = partials.len() / parts.max(1);
    let groups = per_part / per_group.max(1);
    let (sums, rest) = partials.split_at_mut(per_part);
    let tasks = sums[..groups * per_group]
        .chunks_mut(per_group.max(1))
        .zip(m[..groups * LANES * cols].chunks_mut(LANES * cols))
        .enumerate();
    for_each(tasks, |(group, (t, m))| {
        for k in 1..parts {
            let part = &rest[(k - 1) * per_part + group * per_group..][..per_group];
            t.iter_mut().zip(part).for_each(|(sum, value)| *sum += value);
        }
        for (eight, rows) in m.chunks_exact_mut(8 * cols).enumerate() {
            columns_to_block8(isa, t, LANES, 8 * eight, rows, (cols, pixels));
        }
    });
}

impl Run<'_> {
    /// [`Run::products`] in the lane layout. A deep product shared by the
    /// threads runs in parts of the depth (whole chunks of the packed
    /// weights, [`lane_parts`]): each part's task writes its rows of the
    /// im2col columns and multiplies them by every lane group's weights for
    /// those depths, so the columns a task reads are the ones it wrote (in
    /// its core's cache) and the weights still pass once; the parts' sums
    /// are added, in part order, as the products go back to `[O_pad,
    /// cols]` for the epilogue. Otherwise the im2col rows, then the lane
    /// groups, are shared by the threads: every task reads all the
    /// columns, half of them written by the other core (the deep 3×3
    /// stride-2 convs at batch 1 took 1.5-1.7× the CPU time in their
    /// products on two threads as on one).
    pub(super) fn lane_products(&self, block: &Block, v: &mut [f32], m: &mut [f32]) {
        let conv = self.conv;
        let (depth, cols, pixels) = (conv.depth(), block.cols, block.pixels);
        let parts = lane_parts(depth, self.split);
        let per_part = conv.padded_out * pixels;
        let (m, partials) = m.split_at_mut(conv.padded_out * cols);
        // Each `[O_pad / LANES][pixels][LANES]`.
        let partials = &mut partials[..parts * per_part];
        let size = LaneProduct {
            rows: conv.padded_out,
            depth,
            cols,
            pixels,
        };
        let groups = conv.padded_out / LANES;
        let per_group = pixels * LANES;
        if parts > 1 {
            let chunks = depth.div_ceil(LANE_CHUNK);
            let bound = |p: usize| (chunks * p / parts * LANE_CHUNK).min(depth);
            // Each part's rows of the columns.
            let mut rows = Vec::with_capacity(parts);
            let mut rest = &mut v[..depth * cols];
            for p in 0..parts {
                let (part, tail) = std::mem::take(&mut rest).split_at_mut((bound(p + 1) - bound(p)) * cols);
                rows.push(part);
                rest = tail;
            }
            for_each(
                rows.into_iter().zip(partials.chunks_mut(per_part)).enumerate(),
                |(p, (v, t))| {
                    self.im2col(block, bound(p), v);
                    lane_gemm_part(conv.isa(), size, &conv.packed, v, t, 0..groups, bound(p)..bound(p + 1));
                },
            );
        } else {
            self.im2col_rows(block, v);
            let v = &*v;
            // Tasks own whole lane groups.
            let per_task = match self.split {
                true => groups.div_ceil(2 * rayon::current_num_threads()),
                false => groups,
            };
            for_each(partials.chunks_mut(per_task * per_group).enumerate(), |(i, t)| {
                let first = i * per_task;
                lane_gemm(conv.isa(), size, &conv.packed, v, t, first..first + t.len() / per_group);
            });
        }
        lanes_to_rows(conv.isa(), partials, parts, pixels, m, cols);
    }

    /// The lane layout's product of `block` read through `sources`, in
    /// tasks owning whole lane groups (shared by the threads with `split`):
    /// each multiplies its groups into `partials` (`[O_pad / LANES][pixels]
    /// [LANES]`), brings them back to rows of `m` (`[O_pad, m_cols]`) and
    /// writes its channels' epilogue.
    pub(super) fn lane_tasks(
        &self,
        sources: &[Source],
        block: &Block,
        partials: &mut [f32],
        m: &mut [f32],
        m_cols: usize,
    ) {
        let (conv, pixels) = (self.conv, block.pixels);
        let lane_groups = conv.padded_out / LANES;
        let per_task = match self.split {
            true => lane_groups.div_ceil(2 * rayon::current_num_threads()).max(1),
            false => lane_groups,
        };
        let tasks = partials[..conv.padded_out * pixels]
            .chunks_mut(per_task * pixels * LANES)
            .zip(m.chunks_mut(per_task * LANES * m_cols))
            .enumerate();
        for_each(tasks, |(i, (t, m))| {
            let first = i * per_task;
            let groups = first..first + t.len() / (pixels * LANES);
            let w = (&conv.packed[..], conv.padded_out);
            lane_gemm_gathered(conv.isa(), w, sources, (&mut *t, pixels), groups.clone());
            lanes_to_rows(conv.isa(), t, 1, pixels, m, m_cols);
            let channels = groups.start * LANES..(groups.end * LANES).min(self.shape.out_channels);
            self.epilogue(m, m_cols, block, channels);
        });
    }
}
