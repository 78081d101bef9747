//! A panel product stored into a run of pixels of an image's NCHW output
//! planes with the conv's epilogue: whole panels over whole micro-tile
//! columns in place (the epilogue in registers, as the 1×1 conv stores),
//! the rows past the last whole panel and the columns past the last whole
//! tile through scratch. The direct conv's blocks within one image and
//! the fused projection's bands (`depthwise/blocked/project.rs`) store
//! their products this way.

use crate::cpu::data::SharedOut;
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{
    panel_columns, panel_gemm_shared, panel_gemm_strided, DepthChunks, Isa, SharedRows, StoreEpilogue, Strided,
};
use crate::cpu::gemm::{PANEL_GRANULE, PANEL_ROWS};

/// The most columns past the last whole tile that go through
/// [`panel_columns`] (four at once, one pass over the weights) rather
/// than a whole 16-column tile: a 14×14 plane's last 4 of 196 took a tile
/// of 16 over every row, 6% more multiplies than the plane's.
const TAIL_COLUMNS: usize = 4;

/// Where a product goes: pixels `base..base + pixels` of output channel
/// 0's plane and the same run of every other channel's, planes `plane`
/// values apart, in `dst`; the residual, if any, indexed as the output.
#[derive(Clone, Copy)]
pub(crate) struct PlaneRun<'a> {
    pub(crate) dst: SharedOut,
    pub(crate) base: usize,
    pub(crate) plane: usize,
    pub(crate) residual: Option<&'a [f32]>,
}

/// The product's operands: `packed` (panels of `PANEL_ROWS` rows over
/// `depth`, [`crate::cpu::gemm::pack_panels`]; `padded_out` rows, the
/// first `out_channels` real) times `v` (`[depth, cols]`, rows `cols`
/// apart, `cols` a multiple of the granule, its first `pixels` columns
/// the run's); the whole panels over whole tiles in `chunks` of the
/// depth, if given ([`DepthChunks`]).
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub(crate) isa: Isa,
    pub(crate) packed: &'a [f32],
    pub(crate) epilogue: &'a Epilogue,
    pub(crate) out_channels: usize,
    pub(crate) padded_out: usize,
    pub(crate) depth: usize,
    pub(crate) v: &'a [f32],
    pub(crate) cols: usize,
    pub(crate) pixels: usize,
    pub(crate) chunks: Option<DepthChunks>,
}

/// Stores `p` into `out`, `act(product + bias (+ residual))`, using `m`
/// (at least `padded_out · cols` values) for what does not go in place.
///
/// # Safety
/// No other task reads or writes the run's pixels of these planes while
/// this runs (the spans are checked against `dst`).
pub(crate) unsafe fn store(p: Product<'_>, out: PlaneRun<'_>, m: &mut [f32]) {
    let Product {
        isa,
        packed,
        epilogue,
        out_channels,
        padded_out,
        depth,
        v,
        cols,
        pixels,
        chunks,
    } = p;
    let PlaneRun {
        dst,
        base,
        plane,
        residual,
    } = out;
    let full_rows = out_channels / PANEL_ROWS * PANEL_ROWS;
    let full_cols = pixels / PANEL_GRANULE * PANEL_GRANULE;
    let columns = Strided { data: v, stride: cols };
    if full_rows > 0 && full_cols > 0 {
        let store = StoreEpilogue {
            bias: epilogue.biases(0..full_rows),
            residual: residual.map(|r| Strided {
                data: &r[base..],
                stride: plane,
            }),
            activation: epilogue.activation(),
            stream: false,
        };
        let m = SharedRows {
            out: dst,
            start: base,
            stride: plane,
        };
        let size = [full_rows, depth, full_cols];
        // SAFETY: the caller's contract: these pixels are this task's.
        unsafe { panel_gemm_shared(isa, &packed[..full_rows * depth], columns, m, size, Some(store), chunks) };
    }
    // The rest into `m` (`[O_pad, cols]`): the last partial panel's rows
    // over the whole tiles, every row over the last partial tile.
    if full_rows < out_channels && full_cols > 0 {
        let size = [PANEL_ROWS, depth, full_cols];
        let u = &packed[full_rows * depth..][..PANEL_ROWS * depth];
        panel_gemm_strided(isa, u, columns, &mut m[full_rows * cols..], cols, size, None);
    }
    if full_cols < pixels && pixels - full_cols <= TAIL_COLUMNS {
        // A few columns past the last tile, each load of the weights
        // serving all of them, stored where the tile would have put them.
        let panels = padded_out / PANEL_ROWS;
        panel_columns(
            isa,
            packed,
            panels,
            depth,
            columns,
            full_cols..pixels,
            &mut m[full_cols..],
            cols,
        );
    } else if full_cols < pixels {
        let size = [padded_out, depth, PANEL_GRANULE];
        let tail = Strided {
            data: &v[full_cols..],
            stride: cols,
        };
        panel_gemm_strided(isa, packed, tail, &mut m[full_cols..], cols, size, None);
    }
    let m = &*m;
    for o in 0..out_channels {
        let done = if o < full_rows { full_cols } else { 0 };
        if done == pixels {
            continue;
        }
        let at = base + o * plane + done;
        // SAFETY: as above: the run's own pixels of channel o.
        let out = unsafe { dst.slice(at, pixels - done) };
        let residual = residual.map(|r| &r[at..][..pixels - done]);
        epilogue.write(o, out, &m[o * cols + done..][..pixels - done], residual);
    }
}
