//! A matrix product for convolutions with few output pixels (batch 1 at
//! 7×7 or 14×14): output channels on the vector lanes, pixels broadcast.
//!
//! [`panel_gemm`](super::panel_gemm) puts pixels on the lanes;
//! with 49 pixels its 16-column granule pads a quarter of every vector, and
//! it streams the weights once per 32-pixel tile. Here the weights (the big
//! operand at batch 1: 9.4 MB for a 512-channel 3×3 conv) pass through the
//! core exactly once, in `KC`-deep chunks that stay in L1 while every pixel
//! tile uses them, and no lane is wasted when the output channels are a
//! multiple of [`LANES`] (all of ResNet's are).
//!
//! `m = w · v` with `w` `[rows, depth]` packed by [`pack_lanes`], `v`
//! `[depth, cols]` row-major (only its first `pixels` columns are read) and
//! `m` stored per lane group: `[rows / LANES][pixels][LANES]`. The packing
//! puts each depth chunk of all lane groups together, so the weights are
//! read in one sequential stream (what hardware prefetchers follow).

use super::Isa;

/// Output channels per lane group (two AVX-512 vectors).
pub(crate) const LANES: usize = 32;
/// Depth of the chunk of weights and columns kept in L1 at a time.
const KC: usize = 128;
/// The depth a product can be split at ([`lane_gemm_part`]): its chunks'.
pub(crate) const LANE_CHUNK: usize = KC;
/// Most pixels per AVX-512 micro-tile (`2·R` accumulators).
const MAX_TILE: usize = 12;

/// Packs row-major `plain` `[rows, depth]` as `[depth chunk][lane
/// group][chunk depth][LANES]` (chunks of `KC`, the last may be shorter),
/// padding missing rows with zeros; `packed` holds
/// `rows.div_ceil(LANES) · LANES · depth` values.
pub(crate) fn pack_lanes(plain: &[f32], rows: usize, depth: usize, packed: &mut [f32]) {
    let padded = rows.div_ceil(LANES) * LANES;
    assert!(plain.len() == rows * depth && packed.len() == padded * depth);
    packed.fill(0.0);
    for (row, values) in plain.chunks_exact(depth.max(1)).enumerate() {
        for (d, &value) in values.iter().enumerate() {
            packed[lane_index(padded, depth, row, d)] = value;
        }
    }
}

/// Where [`pack_lanes`] puts element (`row`, `d`) of a `[rows, depth]`
/// matrix whose rows pad to `padded`.
pub(crate) fn lane_index(padded: usize, depth: usize, row: usize, d: usize) -> usize {
    let k0 = d / KC * KC;
    let kc = KC.min(depth - k0);
    chunk_offset(k0, kc, row / LANES, padded) + (d - k0) * LANES + row % LANES
}

/// Where the `kc`-deep chunk at depth `k0` of lane group `group` starts.
pub(super) fn chunk_offset(k0: usize, kc: usize, group: usize, padded_rows: usize) -> usize {
    k0 * padded_rows + group * kc * LANES
}

/// Where the weights a task reads after lane group `g`'s chunk at depth
/// `k0` (`kc` deep) start, in weights packed by [`pack_lanes`] with
/// `padded_rows` rows: the next group's chunk in `groups`, else (past its
/// last group) its first group's next chunk, if the product's `depths`
/// (of `depth` in all) go on past this one. What the micro-tiles prefetch
/// while they compute this chunk.
pub(super) fn next_chunk_offset(
    (k0, kc): (usize, usize),
    g: usize,
    groups: &std::ops::Range<usize>,
    (end, depth): (usize, usize),
    padded_rows: usize,
) -> Option<usize> {
    match (g + 1 < groups.end, k0 + kc < end) {
        (true, _) => Some(chunk_offset(k0, kc, g + 1, padded_rows)),
        (false, true) => Some(chunk_offset(
            k0 + kc,
            KC.min(depth - k0 - kc),
            groups.start,
            padded_rows,
        )),
        (false, false) => None,
    }
}

/// A micro-tile's share of the prefetch of the weights its task reads
/// next ([`next_chunk_offset`]), into L2 while it computes this chunk:
/// tile `t` of a chunk's `T` tiles prefetches depth steps `t`, `t + T`,
/// `t + 2T`, ... of them, one every `T` of its own steps, so the next
/// chunk is on its way over the whole chunk. Until the fifty-sixth session
/// the first tile prefetched all of it, one step per step: 256 lines in a
/// quarter or less of the chunk's time at batch 1 (4 tiles of a 7×7
/// plane on AVX-512), then nothing while the other tiles computed. On an
/// Intel Xeon VM whose reads past ~40 MiB run at memory speed (12 GB/s a
/// thread against 27 from its L3; `scripts/ab_builds.py`, 2 threads,
/// alternating chunks of forwards): ResNet18 at batch 1 0.934-0.949×
/// the time (three runs), ResNet34 0.946×, ResNet50 0.960× and 0.969×;
/// AVX2 forced ResNet18 0.952× and 0.970× (its layer4 F(2×2) convs here,
/// its 3×3 stride-2 and 7×7 direct convs in [`super::lane_gathered`]),
/// ResNet50 0.964×; at batch 10 level (ResNet18 0.997×, ResNet50
/// 0.995×), MobileNetV2 at batch 1 level (0.999×).
#[derive(Clone, Copy, Debug)]
pub(super) struct Ahead {
    /// The tile's first line: its index's depth step of the next weights.
    at: *const f32,
    /// Depth steps between two of its prefetches: the chunk's tiles.
    every: usize,
}

impl Ahead {
    /// Tile `tile` of `tiles` over a chunk whose task reads `next` next.
    pub(super) fn share(next: *const f32, tile: usize, tiles: usize) -> Ahead {
        Ahead {
            at: next.wrapping_add(tile.saturating_mul(LANES)),
            every: tiles.max(1),
        }
    }
}

/// An [`Ahead`] share as its tile walks the chunk's depth steps.
#[cfg(target_arch = "x86_64")]
pub(super) struct Prefetch {
    at: *const f32,
    every: usize,
    /// Steps until the next prefetch.
    wait: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    /// The share's prefetches, the first at the tile's first step.
    #[inline(always)]
    pub(super) fn new(ahead: Ahead) -> Prefetch {
        Prefetch {
            at: ahead.at,
            every: ahead.every,
            wait: 0,
        }
    }

    /// One depth step of the tile: every `every`-th prefetches one depth
    /// step of the next weights (`LANES` values, two cache lines) into L2.
    #[inline(always)]
    pub(super) fn step(&mut self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        if self.wait == 0 {
            // SAFETY: hints only: they access no memory architecturally and
            // never fault; past the weights' end the addresses (formed with
            // wrapping_add) are never dereferenced.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(self.at.cast::<i8>());
                _mm_prefetch::<_MM_HINT_T1>(self.at.wrapping_add(16).cast::<i8>());
            }
            self.at = self.at.wrapping_add(LANES * self.every);
            self.wait = self.every;
        }
        self.wait -= 1;
    }
}

/// The sizes of one lane product `m = w · v` (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneProduct {
    /// Rows of `w` (output channels), a multiple of [`LANES`].
    pub(crate) rows: usize,
    /// Depth of the product (rows of `v`).
    pub(crate) depth: usize,
    /// Row length of `v`.
    pub(crate) cols: usize,
    /// Columns of `v` that are computed (`pixels <= cols`).
    pub(crate) pixels: usize,
}

/// The lane groups `groups` of `m = w · v` (see the module docs): `w` packs
/// all `rows`, `m` holds just these groups (`[groups.len()][pixels][LANES]`);
/// `isa` must be one of [`Isa::available`].
pub(crate) fn lane_gemm(
    isa: Isa,
    size: LaneProduct,
    w: &[f32],
    v: &[f32],
    m: &mut [f32],
    groups: std::ops::Range<usize>,
) {
    lane_gemm_part(isa, size, w, v, m, groups, 0..size.depth)
}

/// [`lane_gemm`] over the depths `depths` only: `m` gets the sums of
/// their terms, `v` holds just their rows (`[depths.len(), cols]`).
/// `depths` starts on a chunk ([`LANE_CHUNK`]) and ends on one or at the
/// product's depth, so that it takes whole chunks of the packed weights.
pub(crate) fn lane_gemm_part(
    isa: Isa,
    size: LaneProduct,
    w: &[f32],
    v: &[f32],
    m: &mut [f32],
    groups: std::ops::Range<usize>,
    depths: std::ops::Range<usize>,
) {
    let lanes = groups.start * LANES..groups.end * LANES;
    lane_gemm_lanes(isa, size, w, v, m, lanes, depths)
}

/// Lanes of a half lane group: AVX2's micro-tile width.
const HALF: usize = LANES / 2;

/// The run of output channels tasks may split a product at on `isa`
/// without adding work ([`lane_gemm_lanes`]): half a group on AVX2, whose
/// tiles are half a group wide; a whole group on the other paths, which
/// compute whole groups.
pub(crate) fn split_unit(isa: Isa) -> usize {
    match isa {
        Isa::Avx2Fma => HALF,
        _ => LANES,
    }
}

/// The lane groups output channels `lanes` touch: where
/// [`lane_gemm_lanes`] puts their products in `m`.
pub(crate) fn lane_groups(lanes: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    lanes.start / LANES..lanes.end.div_ceil(LANES)
}

/// [`lane_gemm_part`] for the output channels `lanes` (whole half groups:
/// bounds multiples of [`HALF`]): `m` holds the lane groups they touch
/// (`[groups][pixels][LANES]`, from group `lanes.start / LANES`); the lanes
/// of those groups outside `lanes` are unspecified. AVX2, whose tiles are
/// half a group wide, computes only `lanes`; the other paths whole groups.
pub(crate) fn lane_gemm_lanes(
    isa: Isa,
    size: LaneProduct,
    w: &[f32],
    v: &[f32],
    m: &mut [f32],
    lanes: std::ops::Range<usize>,
    depths: std::ops::Range<usize>,
) {
    assert!(lanes.start.is_multiple_of(HALF) && lanes.end.is_multiple_of(HALF) && lanes.start <= lanes.end);
    let groups = lane_groups(&lanes);
    let LaneProduct {
        rows,
        depth,
        cols,
        pixels,
    } = size;
    assert!(rows.is_multiple_of(LANES) && groups.end <= rows / LANES && pixels <= cols);
    assert!(
        depths.start.is_multiple_of(KC)
            && depths.start <= depths.end
            && (depths.end == depth || (depths.end < depth && depths.end.is_multiple_of(KC)))
    );
    // Checked products: a wrapped length must not let a short buffer through.
    let holds =
        |buffer: usize, a: usize, b: Option<usize>| b.and_then(|b| a.checked_mul(b)).is_some_and(|n| buffer >= n);
    assert!(holds(w.len(), rows, Some(depth)) && holds(v.len(), depths.len(), Some(cols)));
    assert!(holds(m.len(), groups.len(), pixels.checked_mul(LANES)));
    if depths.is_empty() {
        // The sums of no terms (no input channels, say).
        m[..groups.len() * pixels * LANES].fill(0.0);
    }
    for k0 in depths.clone().step_by(KC) {
        let kc = KC.min(depth - k0);
        for (i, g) in groups.clone().enumerate() {
            // The group's lanes in `lanes`: whole, or one half at either end.
            let from = lanes.start.saturating_sub(g * LANES).min(LANES);
            let to = (lanes.end - g * LANES).min(LANES);
            let next = next_chunk_offset((k0, kc), g, &groups, (depths.end, depth), rows);
            let chunk = Chunk {
                wg: &w[chunk_offset(k0, kc, g, rows)..][..kc * LANES],
                next: next.map(|at| w.as_ptr().wrapping_add(at)),
                v: &v[(k0 - depths.start) * cols..],
                kc,
                cols,
                pixels,
                first: k0 == depths.start,
                halves: [from == 0, to == LANES],
            };
            let mg = &mut m[i * pixels * LANES..][..pixels * LANES];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `wg` has kc·LANES values, `mg` pixels·LANES, and `v`
                // from row k0 - depths.start has kc rows of `cols >= pixels`
                // values (checked above: `depths` ends at the depth or on a
                // chunk, so kc rows lie within it); the CPU has AVX-512F
                // (`Isa::Avx512` is only handed out when it does).
                Isa::Avx512 => unsafe { x86::chunk_avx512(&chunk, mg) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above, for AVX2 + FMA.
                Isa::Avx2Fma => unsafe { x86::chunk_avx2(&chunk, mg) },
                _ => chunk_scalar(&chunk, mg),
            }
        }
    }
}

/// One lane group's operands for one depth chunk: `wg` (`kc·LANES`
/// weights), `v` from the chunk's first row (`kc` rows of `cols`, only the
/// first `pixels` columns read); `first` starts the sums from zero;
/// `halves`: which of the group's two halves AVX2 computes (the other
/// paths compute both).
struct Chunk<'a> {
    wg: &'a [f32],
    /// Where the weights read after these start, if any (prefetched).
    next: Option<*const f32>,
    v: &'a [f32],
    kc: usize,
    cols: usize,
    pixels: usize,
    first: bool,
    halves: [bool; 2],
}

/// One lane group, one depth chunk: `mg[p][l] (+)= Σ_d wg[d][l] · v[d][p]`.
fn chunk_scalar(c: &Chunk<'_>, mg: &mut [f32]) {
    for p in 0..c.pixels {
        let acc = &mut mg[p * LANES..][..LANES];
        if c.first {
            acc.fill(0.0);
        }
        for d in 0..c.kc {
            let a = c.v[d * c.cols + p];
            for (acc, &w) in acc.iter_mut().zip(&c.wg[d * LANES..][..LANES]) {
                *acc += a * w;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
