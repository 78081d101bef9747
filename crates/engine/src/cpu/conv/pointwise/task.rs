//! One task of a 1×1 conv: its rows of the output over its share of the
//! columns, in place where whole panels and tiles reach, through scratch
//! for the rest; whether it packs its input first.

use super::PointwiseConv;
use crate::cpu::data::with_scratch;
use crate::cpu::gemm::{
    pack_tiles, panel_columns, panel_gemm_shared, panel_gemm_shared_packing, panel_gemm_strided, scale_rows, Right,
    SharedRows, StoreEpilogue, Strided, PANEL_GRANULE, PANEL_ROWS,
};
use std::ops::Range;

/// Bytes a streamed output's in-place columns are aligned to: a cache
/// line, which holds whole AVX-512 and AVX2 vectors.
const STREAM_ALIGN: usize = 64;

/// The output and input channels that make packing a column block of the
/// input pay on any plane ([`packs`]).
const PACK_MIN: usize = 128;
/// The output channels that make packing pay on planes whose rows start
/// off the cache lines ([`packs`]).
const PACK_MIN_MISALIGNED: usize = 4 * PANEL_ROWS;

/// One image's operands for one task.
pub(in crate::cpu::conv) struct Task<'a> {
    /// The image's input plane `[C, P]`.
    pub(in crate::cpu::conv) input: &'a [f32],
    /// The image's residual plane `[O, P]`, if any.
    pub(in crate::cpu::conv) residual: Option<&'a [f32]>,
    /// The image's output `[O, P]` (rows a plane apart), which other tasks
    /// write too: this one writes `rows` × its share of the columns.
    pub(in crate::cpu::conv) out: SharedRows,
    /// Which output channels; starts on a panel boundary.
    pub(in crate::cpu::conv) rows: Range<usize>,
    /// Its share of the columns: part `k` of `parts` (`(k, parts)`).
    pub(in crate::cpu::conv) part: (usize, usize),
    /// Whether to store the output with streaming stores.
    pub(in crate::cpu::conv) stream: bool,
    /// The image's factor per input channel (`[C]`), if the input is
    /// scaled: folded into the task's weights or its copy of the input.
    pub(in crate::cpu::conv) scale: Option<&'a [f32]>,
    /// The image's input columns `0..P/16·16` packed in tiles, where the
    /// image's channel runs share one copy ([`PointwiseConv::shares_packing`]).
    pub(in crate::cpu::conv) packed: Option<Right<'a>>,
}

impl PointwiseConv {
    /// One task: in place over whole panels and whole micro-tile columns,
    /// then through scratch for the last partial panel and the first and
    /// last columns. Its writes are rows `t.rows` of its share of the
    /// columns: part `k` of `parts` takes the `k`-th of `parts` runs of the
    /// in-place tiles, the first part also the columns before them, the
    /// last part those after them.
    pub(in crate::cpu::conv) fn task(&self, t: Task) -> candle_core::Result<()> {
        let depth = self.spec.in_channels;
        let plane = t.out.stride;
        let (part, parts) = t.part;
        let first_panel = t.rows.start / PANEL_ROWS;
        let full_rows = t.rows.len() / PANEL_ROWS * PANEL_ROWS;
        let padded_rows = t.rows.len().div_ceil(PANEL_ROWS) * PANEL_ROWS;
        let packed = &self.packed[first_panel * PANEL_ROWS * depth..][..padded_rows * depth];
        // The task's first output row, and where each of its values lies.
        let first = t.out.start + t.rows.start * plane;
        let at = |row: usize, col: usize| first + row * plane + col;
        // Streaming stores need aligned vectors: the in-place columns
        // start where the output rows do (all alike: `P` is a multiple of
        // the tile width when streaming), the columns before go through
        // scratch. Without an aligned start the stores are just not streamed.
        let aligned = t.out.out.ptr_at(first).align_offset(STREAM_ALIGN);
        let head = match t.stream && aligned < PANEL_GRANULE && aligned <= plane {
            true => aligned,
            false => 0,
        };
        let tiles = (plane - head) / PANEL_GRANULE;
        let cols_full = head + tiles * PANEL_GRANULE;
        let (lo, hi) = (
            head + tiles * part / parts * PANEL_GRANULE,
            head + tiles * (part + 1) / parts * PANEL_GRANULE,
        );
        // Columns per block: the block's input and output within the L2.
        let per_col = (depth + padded_rows) * 4;
        let block = (self.block_bytes / per_col / PANEL_GRANULE * PANEL_GRANULE).max(PANEL_GRANULE);
        // An input scale goes into the operand the task reads less of: its
        // rows of the weights (`rows · C` values), or the image's input
        // (`C · P`) when the task has all its columns and more rows than
        // columns (MobileNetV3's 960 -> 160 on 7×7 planes: the weights
        // took 0.8 ms more than the unfused mul at batch 10, Zen 4).
        let scale_input = parts == 1 && t.rows.len() > plane;
        let pack = t.packed.is_none() && packs(padded_rows, depth, plane);
        // Where the input is copied into tiles anyway (by this task, or
        // once for the image's runs), the scale goes into that copy and
        // the columns outside the tiles are scaled on their own, a few at
        // a time: no scaled weights or input made beforehand.
        let scale_in_tiles = t.scale.filter(|_| pack || t.packed.is_some());
        // Unscaled, over whole panels, the product packs as it goes
        // ([`panel_gemm_shared_packing`]); otherwise the block is packed
        // before the product reads it.
        let pack_as_it_goes = pack && scale_in_tiles.is_none() && full_rows == t.rows.len();
        // Scratch: a partial panel's product over one block, or the first
        // or last columns' product `[padded_rows, < 16]`; before it, the
        // scaled operand, if any (whole cache lines of it, so that the
        // products' rows stay aligned), the block's input packed in
        // tiles, if it is, and those columns' scaled input.
        let scaled_len = match t.scale {
            None => 0,
            Some(_) if scale_in_tiles.is_some() => 0,
            Some(_) if scale_input => t.input.len().next_multiple_of(16),
            Some(_) => packed.len().next_multiple_of(16),
        };
        // With the image's input packed for all its runs (head 0, one
        // share of all the columns): one block of all of them.
        let block = match t.packed {
            Some(_) => block.max(hi - lo),
            None => block,
        };
        let tiles_len = if pack {
            depth.saturating_mul(block.min(hi - lo))
        } else {
            0
        };
        let edge_len = match scale_in_tiles {
            Some(_) => depth.saturating_mul(PANEL_GRANULE),
            None => 0,
        };
        let products_len = (PANEL_ROWS * block).max(padded_rows * PANEL_GRANULE);
        // Saturated: past the scratch cap, `with_scratch` refuses it.
        let scratch_len = scaled_len
            .saturating_add(tiles_len)
            .saturating_add(edge_len)
            .saturating_add(products_len);
        // SAFETY (each `slice` below): rows `t.rows` of this task's
        // columns, which no other task writes (runs and shares are disjoint).
        let write = |row: usize, cols: Range<usize>, src: &[f32]| {
            let out = unsafe { t.out.out.slice(at(row, cols.start), cols.len()) };
            let residual = t.residual.map(|r| &r[(t.rows.start + row) * plane..][cols]);
            self.epilogue.write(t.rows.start + row, out, src, residual);
        };
        with_scratch(scratch_len, |scratch| {
            let (scaled, scratch) = scratch.split_at_mut(scaled_len);
            let (tiles, scratch) = scratch.split_at_mut(tiles_len);
            let (edge, scratch) = scratch.split_at_mut(edge_len);
            let (u, input) = match t.scale {
                None => (packed, t.input),
                Some(_) if scale_in_tiles.is_some() => (packed, t.input),
                Some(scale) if scale_input => {
                    let scaled = &mut scaled[..t.input.len()];
                    scale_rows(t.input, plane, plane, scaled, scale);
                    (packed, &*scaled)
                }
                Some(scale) => {
                    let scaled = &mut scaled[..packed.len()];
                    scale_depth(packed, scale, scaled);
                    (&*scaled, t.input)
                }
            };
            for c0 in (lo..hi).step_by(block) {
                let n = block.min(hi - c0);
                let v = Strided {
                    data: &input[c0..],
                    stride: plane,
                };
                // The operand, and the tiles the product packs it into as it
                // goes, if it does.
                let (v, packing) = match (t.packed, pack) {
                    (Some(packed), _) => (packed, None),
                    (None, true) if pack_as_it_goes => (Right::Rows(v), Some(&mut *tiles)),
                    (None, true) => (pack_tiles(self.isa, v, [depth, n], tiles, scale_in_tiles), None),
                    (None, false) => (v.into(), None),
                };
                if full_rows > 0 {
                    // The epilogue as the product is stored.
                    let epilogue = StoreEpilogue {
                        bias: self.epilogue.biases(t.rows.start..t.rows.start + full_rows),
                        residual: t.residual.map(|r| Strided {
                            data: &r[t.rows.start * plane + c0..],
                            stride: plane,
                        }),
                        activation: self.epilogue.activation(),
                        stream: t.stream,
                    };
                    let m = SharedRows {
                        out: t.out.out,
                        start: at(0, c0),
                        stride: plane,
                    };
                    let size = [full_rows, depth, n];
                    let u = &u[..full_rows * depth];
                    // SAFETY: as for `write`: this task's rows and columns.
                    match (v, packing) {
                        (Right::Rows(v), Some(tiles)) => unsafe {
                            panel_gemm_shared_packing(self.isa, u, v, tiles, m, size, Some(epilogue))
                        },
                        _ => unsafe { panel_gemm_shared(self.isa, u, v, m, size, Some(epilogue), None) },
                    }
                }
                if full_rows < t.rows.len() {
                    let m = &mut scratch[..PANEL_ROWS * n];
                    let size = [PANEL_ROWS, depth, n];
                    panel_gemm_strided(self.isa, &u[full_rows * depth..], v, m, n, size, None);
                    for r in full_rows..t.rows.len() {
                        write(r, c0..c0 + n, &m[(r - full_rows) * n..][..n]);
                    }
                }
            }
            let edges = [(part == 0, 0..head), (part + 1 == parts, cols_full..plane)];
            for cols in edges.into_iter().filter_map(|(mine, cols)| mine.then_some(cols)) {
                let n = cols.len();
                if n == 0 {
                    continue;
                }
                let m = &mut scratch[..padded_rows * n];
                match scale_in_tiles {
                    None => {
                        let v = Strided {
                            data: input,
                            stride: plane,
                        };
                        panel_columns(self.isa, u, padded_rows / PANEL_ROWS, depth, v, cols.clone(), m, n);
                    }
                    Some(scale) => {
                        // These columns of the scaled input, `[C, n]`.
                        let edge = &mut edge[..depth * n];
                        scale_rows(&input[cols.start..], plane, n, edge, scale);
                        let v = Strided { data: edge, stride: n };
                        panel_columns(self.isa, u, padded_rows / PANEL_ROWS, depth, v, 0..n, m, n);
                    }
                }
                for r in 0..t.rows.len() {
                    write(r, cols.clone(), &m[r * n..][..n]);
                }
            }
        })
    }
}

/// Whether a task with `rows` output channels (whole panels) from `depth`
/// input channels on planes of `plane` pixels packs each column block of
/// its input in tiles ([`pack_tiles`]) before the product reads it: where
/// the rows of the input start off the cache lines (planes not a multiple
/// of 16 pixels: ResNet50's and the MobileNets' 14×14 and 7×7; most vector
/// loads of the in-place operand split across two lines) and at least four
/// panels read the copy; or where a tile's slice of the input is deep
/// (its rows a plane apart, too many streams for the prefetchers) and at
/// least [`PACK_MIN`] rows read it. The copy is not overlapped with the
/// product (its reads wait on memory), so it takes fewer rows to pay for
/// it on misaligned planes. Alone on the Intel Xeon VM (AVX-512), ResNet50
/// at batch 10, alternating runs: 1024 -> 256 on 14×14 0.93× the time,
/// 512 -> 2048 + residual on 7×7 0.84×, 2048 -> 512 0.80×, 512 -> 128 on
/// 28×28 0.87×, 128 -> 512 + residual 0.93-0.96×; MobileNetV2's 576 -> 96
/// on 14×14 0.95×, 960 -> 160 + residual on 7×7 0.84×; AVX2 forced there
/// (16-column slices) 0.79-1.03×. Packed on every aligned plane with 16
/// rows or more, the projections lost (256 -> 64 on 56×56 1.31×, 144 ->
/// 24 1.28×), and so did MobileNetV2's shallow expansions (24 -> 144 on
/// 56×56 1.06×); at batch 1, tasks of three panels on misaligned planes
/// (576 -> 96 + residual on 14×14, 24 rows a task) 1.11×. In all,
/// alternating forwards: ResNet50 0.96× at batch 10, 0.90-0.99× at batch
/// 1, MobileNetV2 0.95-0.98× at batch 10, MobileNetV3-Large and
/// EfficientNet-B0 0.95-0.99× at batch 10 and 0.97-1.04× (noise) at batch
/// 1; AVX2 forced, batch 10: 0.94-0.99×.
pub(super) fn packs(rows: usize, depth: usize, plane: usize) -> bool {
    let misaligned = !plane.is_multiple_of(PANEL_GRANULE);
    (misaligned && rows >= PACK_MIN_MISALIGNED) || (rows >= PACK_MIN && depth >= PACK_MIN)
}

/// `scaled` = panel-packed weights `packed` (`[panels][C][8]`, `C` =
/// `scale.len()`) with depth `d` (input channel) multiplied by `scale[d]`.
fn scale_depth(packed: &[f32], scale: &[f32], scaled: &mut [f32]) {
    let rows_of_8 = packed.chunks_exact(PANEL_ROWS).zip(scaled.chunks_exact_mut(PANEL_ROWS));
    // The `k`-th 8 values are panel `k / C`, depth `k mod C`.
    for (k, (from, to)) in rows_of_8.enumerate() {
        let factor = scale[k % scale.len()];
        for (to, from) in to.iter_mut().zip(from) {
            *to = from * factor;
        }
    }
}
