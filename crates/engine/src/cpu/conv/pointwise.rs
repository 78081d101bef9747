//! The 1×1 CPU convolution (stride 1, no padding, one group: the
//! MobileNets' and EfficientNets' expand and project convs, ResNet50's
//! bottleneck ends) as a GEMM on the NCHW planes themselves: an image's
//! input `[C, H·W]` is already the right operand `V` of `out = W · V`, and
//! its output `[O, H·W]` the product, so the panel micro-kernel reads the
//! input and writes the output in place, column block by column block, and
//! the epilogue runs on each block while it is in cache. No im2col copy
//! and no products buffer, as the direct conv needs for other kernels.
//! Where enough output channels read a block of the input, or its rows
//! start off the cache lines, the block is copied into the micro-tiles'
//! column slices ([`packs`]), which the product then reads contiguously:
//! on AVX-512 and AVX2 by the product itself, each slice's first
//! micro-tile storing what it loads ([`panel_gemm_shared_packing`]),
//! elsewhere (the scalar path, AVX2's products in depth chunks, and with
//! an input scale to fold into the copy) before the product; where
//! an image's channels are split into several runs, its input is packed
//! once for all of them, before they start.
//!
//! What the in-place product cannot cover goes through scratch: a row
//! panel with fewer than 8 output channels left (its padding rows must not
//! be written into the next channels), and, one column at a time
//! ([`panel_columns`]), the last `H·W mod 16` columns (a whole micro-tile
//! would run past the plane) and, for an output too large to stay in cache,
//! stored with streaming stores, the columns before the first aligned one.
//!
//! Tasks are (image, run of output channels, share of the columns): every
//! image writes its own contiguous output plane. Each thread takes one
//! contiguous run of them ([`try_shares`]): the same strip of the planes
//! every call, the one a band-by-band depthwise conv before it wrote on
//! the same core. Fewer images than threads
//! to keep busy are split by channels where the planes are small (each
//! task then reads the whole input plane but only its weights), by columns
//! where they hold at least twice as many pixels as the output has
//! channels (each task reads only its columns of the input, and all the
//! weights): a task's reads are smallest that way, and MobileNets' 1×1
//! convs to 24 channels on 56×56 planes at batch 1 ran no faster on two
//! threads than on one when split into three 8-channel runs that each
//! read the whole input.

use super::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, with_shared_scratch};
use crate::cpu::epilogue::{value, Epilogue};
use crate::cpu::gemm::{
    pack_panels, pack_tiles, pack_tiles_parallel, panel_columns, panel_gemm_shared, panel_gemm_shared_packing,
    panel_gemm_strided, scale_rows, DepthChunks, Isa, Right, SharedRows, StoreEpilogue, Strided, PANEL_GRANULE,
    PANEL_ROWS,
};
use crate::cpu::output::Output;
use crate::cpu::parallel::try_shares;
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Bytes a streamed output's in-place columns are aligned to: a cache
/// line, which holds whole AVX-512 and AVX2 vectors.
const STREAM_ALIGN: usize = 64;

/// How many times the output's channels a plane must hold for an image's
/// tasks to split its columns rather than its channels. A channel run
/// reads (and, where it packs, copies) the whole input plane and its rows
/// of the weights, a column share its columns of the input and all the
/// weights: per task, `C·P + O·C/k` against `C·P/k + O·C` for `k` tasks,
/// equal at `P = O` (at `P = O/2` for a packing run, whose copy doubles
/// the input's cost). Below twice, the column shares are a few
/// tiles each and the last one also takes the columns past the last
/// tile: MobileNetV3's 672 -> 112 projection on 14×14 planes at batch 1
/// (196 = 1.75 × 112) took 0.239 ms split by columns against 0.173 by
/// channels (Zen 4, before the 1×1 conv packed). At twice and more, on the
/// Intel Xeon VM (AVX-512), batch 1, two threads, alternating forwards
/// against a ratio of 4: ResNet50's 512 -> 256 on 28×28 (3.06×) 0.70-0.71×
/// the time, MobileNetV2's 384 -> 64 and 576 -> 96 projections on 14×14
/// 0.88-0.94×, MobileNetV3-Large's 240 -> 80 and 200 -> 80 0.78-0.85×;
/// whole forwards ResNet50 0.984×, MobileNetV2 0.979×, MobileNetV3-Large
/// 0.988×, EfficientNet-B0 0.995×. (At `P >= O` and `P >= 0.75·O`, also
/// taking ResNet50's 128 -> 512 + residual on 28×28 and 1024 -> 256 on
/// 14×14: the same forwards within 1%.)
const COLUMN_SPLIT_RATIO: usize = 2;

/// The output and input channels that make packing a column block of the
/// input pay on any plane ([`packs`]).
const PACK_MIN: usize = 128;
/// The output channels that make packing pay on planes whose rows start
/// off the cache lines ([`packs`]).
const PACK_MIN_MISALIGNED: usize = 4 * PANEL_ROWS;

/// A 1×1 convolution with its weights packed in panels.
#[derive(Debug)]
pub(crate) struct PointwiseConv {
    spec: ConvSpec,
    /// `[O_pad / 8][C][8]` ([`pack_panels`]).
    packed: WeightBuffer,
    epilogue: Epilogue,
    isa: Isa,
    /// Bytes one column block's input and output aim to fit in: the L2.
    block_bytes: usize,
    /// Bytes of operands and output past which the output is streamed
    /// ([`Machine::stream_bytes`]).
    stream_bytes: usize,
    /// How a product on its row-major input runs in depth ([`Machine::depth_chunks`]):
    /// the depthwise conv's fused projection reads its bands that way.
    chunks: Option<DepthChunks>,
}

/// One image's operands for one task.
pub(super) struct Task<'a> {
    /// The image's input plane `[C, P]`.
    pub(super) input: &'a [f32],
    /// The image's residual plane `[O, P]`, if any.
    pub(super) residual: Option<&'a [f32]>,
    /// The image's output `[O, P]` (rows a plane apart), which other tasks
    /// write too: this one writes `rows` × its share of the columns.
    pub(super) out: SharedRows,
    /// Which output channels; starts on a panel boundary.
    pub(super) rows: Range<usize>,
    /// Its share of the columns: part `k` of `parts` (`(k, parts)`).
    pub(super) part: (usize, usize),
    /// Whether to store the output with streaming stores.
    pub(super) stream: bool,
    /// The image's factor per input channel (`[C]`), if the input is
    /// scaled: folded into the task's weights or its copy of the input.
    pub(super) scale: Option<&'a [f32]>,
    /// The image's input columns `0..P/16·16` packed in tiles, where the
    /// image's channel runs share one copy ([`PointwiseConv::shares_packing`]).
    pub(super) packed: Option<Right<'a>>,
}

impl PointwiseConv {
    /// Whether `spec` is a 1×1 conv with stride 1, no padding and one group
    /// (dilation does not matter for a 1×1 kernel).
    pub(crate) fn applies(spec: &ConvSpec) -> bool {
        let a = spec.attrs;
        spec.kernel == [1, 1] && a.stride == [1, 1] && a.padding == [0, 0] && a.groups == 1
    }

    /// Packs `weight` (`[O, C, 1, 1]`, f32) for `spec` on `machine`'s path.
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        let (rows, depth) = (spec.out_channels, spec.in_channels);
        let plain = Self::plain_weights(&spec, weight)?;
        let mut packed = WeightBuffer::zeroed(rows.div_ceil(PANEL_ROWS) * PANEL_ROWS * depth, "packed weights")?;
        pack_panels(&plain, rows, depth, &mut packed);
        Ok(Self {
            spec,
            packed,
            epilogue,
            isa: machine.isa,
            block_bytes: machine.block_bytes(),
            stream_bytes: machine.stream_bytes(),
            chunks: machine.depth_chunks(depth, rows.next_multiple_of(PANEL_ROWS)),
        })
    }

    /// Its packed weights, channels and epilogue, for a depthwise conv that
    /// runs it on its own output ([`super::depthwise::Projection`]).
    pub(crate) fn projection(&self) -> super::depthwise::Projection<'_> {
        super::depthwise::Projection {
            packed: &self.packed,
            in_channels: self.spec.in_channels,
            out_channels: self.spec.out_channels,
            epilogue: &self.epilogue,
            chunks: self.chunks,
        }
    }

    /// `weight` (`[O, C, 1, 1]`, f32) as `O` rows of `C` values, for a
    /// `spec` this conv [applies](Self::applies) to (either form); an error
    /// that says what was expected otherwise.
    pub(super) fn plain_weights(spec: &ConvSpec, weight: &Tensor) -> candle_core::Result<Vec<f32>> {
        if !Self::applies(spec) {
            bail!(
                "a pointwise conv needs a 1x1 kernel, stride 1, no padding and one group, got {:?} {:?}",
                spec.kernel,
                spec.attrs
            )
        }
        let (rows, depth) = (spec.out_channels, spec.in_channels);
        let plain = weight.flatten_all()?.to_vec1::<f32>()?;
        if Some(plain.len()) != rows.checked_mul(depth) {
            bail!(
                "pointwise conv weight {:?} does not match {rows} x {depth}",
                weight.dims()
            )
        }
        Ok(plain)
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// output's shape) before the activation.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.run_scaled(x, residual, None)
    }

    /// [`Self::run`] on `x · scale` (`scale` `[N, C, 1, 1]`, one factor per
    /// image and input channel: squeeze-and-excitation's). Where the input
    /// is copied into the micro-tiles' slices anyway ([`packs`], or once
    /// per image for all its runs), the factors go into that copy (and
    /// into the few columns outside the tiles); otherwise each task
    /// scales, into its scratch, its rows of the weights by the image's
    /// factors (`rows·C` products), or, with more rows than pixels, the
    /// image's input (`C·H·W`, as the unfused `mul` would): the scaled
    /// input is never a value of its own, written to memory and read back.
    /// In the copy, against the weights scaled per task: MobileNetV3-Large
    /// at batch 10 (Intel Xeon VM, 2 threads, alternating profiles), its
    /// scaled projections 0.94-0.96× the time (672 -> 112 and 960 -> 160
    /// on 14×14), EfficientNet-B0's level, both at batch 1 level.
    /// Batches of 1×1 planes, which run as one product over all images,
    /// scale their input first.
    pub(crate) fn run_scaled(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        scale: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let (plane, out_channels) = (shape.out_plane(), shape.out_channels);
        let out_len = shape.out_len();
        let scale = match scale {
            Some(s) if s.dims() != [shape.batch, shape.channels, 1, 1] => bail!(
                "the scale of a {:?} conv input must be [{}, {}, 1, 1], got {:?}",
                call.x.dims(),
                shape.batch,
                shape.channels,
                s.dims()
            ),
            Some(s) if plane == 1 && shape.batch > 1 => {
                let residual = call.residual.as_ref();
                return super::super::plane::on_channel_scaled(self.isa, &call.x, s, |x| {
                    self.run_scaled(x, residual, None)
                });
            }
            Some(s) => Some(s.contiguous()?),
            None => None,
        };
        if out_len == 0 {
            return output(Vec::new(), shape.out_dims());
        }
        if plane == 1 && shape.batch > 1 {
            // A scaled input took the branch above.
            return self.images_as_columns(&call);
        }
        let mut out = Output::new(out_len, "conv output")?;
        let dst = out.shared(out_len);
        // Enough tasks for every thread twice over: images, then channel
        // runs or column shares (see the module's note).
        let threads = rayon::current_num_threads();
        let panels = out_channels.div_ceil(PANEL_ROWS);
        let per_image = (2 * threads).div_ceil(shape.batch);
        let (runs, parts) = match plane >= COLUMN_SPLIT_RATIO * out_channels {
            true => (1, per_image.clamp(1, (plane / PANEL_GRANULE).max(1))),
            false => (per_image.clamp(1, panels), 1),
        };
        let run_rows = panels.div_ceil(runs) * PANEL_ROWS;
        let runs = out_channels.div_ceil(run_rows);
        let (in_image, out_image) = (shape.channels * plane, out_channels * plane);
        let stream = self.streams(shape.batch * in_image, out_len, call.residual.is_some(), plane);
        let channels = shape.channels;
        // Columns of each image packed once for all its runs, if shared.
        let shared_cols = match self.shares_packing(runs, run_rows, plane, stream) {
            true => plane / PANEL_GRANULE * PANEL_GRANULE,
            false => 0,
        };
        // Saturated: past the scratch cap, `with_scratch` refuses it.
        let shared_len = shape.batch.saturating_mul(channels).saturating_mul(shared_cols);
        with_cpu_f32("pointwise conv", &call.x, call.residual.as_ref(), |input, residual| {
            with_optional_f32("pointwise conv's input scale", scale.as_ref(), |scale| {
                with_shared_scratch(shared_len, |shared| {
                    let image_tiles = channels * shared_cols;
                    // Each image's packed input, if shared (none: no allocation).
                    let packed: Vec<Right> = match shared_cols {
                        0 => Vec::new(),
                        _ => shared
                            .chunks_mut(image_tiles)
                            .enumerate()
                            .map(|(image, tiles)| {
                                let v = Strided {
                                    data: &input[image * in_image..][..in_image],
                                    stride: plane,
                                };
                                // An input scale goes into the copy.
                                let scale = scale.map(|s| &s[image * channels..][..channels]);
                                pack_tiles_parallel(self.isa, v, [channels, shared_cols], tiles, scale)
                            })
                            .collect(),
                    };
                    let body = |task: usize| {
                        let (image, run, part) = (task / (runs * parts), task / parts % runs, task % parts);
                        let rows = run * run_rows..out_channels.min((run + 1) * run_rows);
                        self.task(Task {
                            input: &input[image * in_image..][..in_image],
                            residual: residual.map(|r| &r[image * out_image..][..out_image]),
                            out: SharedRows {
                                out: dst,
                                start: image * out_image,
                                stride: plane,
                            },
                            rows,
                            part: (part, parts),
                            stream,
                            scale: scale.map(|s| &s[image * channels..][..channels]),
                            packed: packed.get(image).copied(),
                        })
                    };
                    // Each thread one run of tasks: a contiguous strip of
                    // columns, the one the depthwise conv before it wrote
                    // on the same core where it goes band by band.
                    try_shares(shape.batch * runs * parts, body)
                })?
            })
        })?;
        // SAFETY: the tasks cover every channel of every image, and each
        // writes all `P` columns of its channels (in place or from scratch).
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }

    /// Whether a call reading `input` values (and a residual of the
    /// output's size, if `residual`) and writing `output` values on planes
    /// of `plane` stores its output with streaming stores: when all of it
    /// cannot stay in cache ([`Machine::stream_bytes`]: its first rows are evicted
    /// before its last are written, so its reader finds none of it there
    /// anyway and the stores' reads for ownership are wasted traffic),
    /// and when every output row can start aligned (planes of whole 16-value
    /// tiles). MobileNetV3's
    /// 16 -> 64 expansion on 112 x 112 planes at batch 10 (40 MB) on Zen 4
    /// (32 MiB L3), alone: 3.3-4.3 -> 1.6-1.9 ms.
    fn streams(&self, input: usize, output: usize, residual: bool, plane: usize) -> bool {
        let values = input.saturating_add(output.saturating_mul(1 + usize::from(residual)));
        plane.is_multiple_of(PANEL_GRANULE) && values.saturating_mul(4) > self.stream_bytes
    }

    /// Whether each image's input is packed once, before its tasks start,
    /// for all `runs` runs of `run_rows` output channels to read
    /// ([`pack_tiles_parallel`]), rather than by each run for itself: where
    /// the runs pack ([`packs`]) and are several (fewer images than the
    /// threads twice over: ResNet50's 1024 -> 256 on 14×14 at batch 1 on
    /// two threads packed its 0.8 MB input four times), on planes of a
    /// tile or more, without streamed stores (whose aligned start differs
    /// per task). An input scale goes into that copy.
    /// ResNet50 at batch 1 on the Intel Xeon VM (AVX-512, 2 threads), two
    /// alternating per-node profiles of 5 rounds, each node against the
    /// median node: 1024 -> 256 on 14×14 0.90-0.93× the time, 128 -> 512 +
    /// residual on 28×28 0.92-0.94×, 1024 -> 512 on 14×14 0.95×, 256 ->
    /// 1024 + residual on 14×14 (a 0.2 MB input) level; alone, after the
    /// caches were flushed, 0.91-0.96×.
    fn shares_packing(&self, runs: usize, run_rows: usize, plane: usize, stream: bool) -> bool {
        runs > 1
            && !stream
            && plane >= PANEL_GRANULE
            && self.spec.in_channels > 0
            && packs(run_rows, self.spec.in_channels, plane)
    }

    /// A batch of 1×1 planes (squeeze-and-excitation's excitation) as one
    /// product with the images as its columns: per image, a plane is one
    /// column of a 16-column tile, the other 15 padding. Runs of output
    /// channels in parallel, the epilogue applied in registers as the
    /// product is stored (its bias, residual and activation per channel
    /// row), then each run's rows written out as the images' columns.
    /// (One task with the epilogue value by value afterwards: 43 / 105 us
    /// with ReLU6 / sigmoid for EfficientNet-B0's 48 -> 1152 at batch 10
    /// on Zen 4, alone, most of it the scalar sigmoids; 18 / 22 us now.)
    fn images_as_columns(&self, call: &super::ConvCall) -> candle_core::Result<Tensor> {
        let shape = call.shape;
        let (batch, depth, outs) = (shape.batch, shape.channels, shape.out_channels);
        let cols = batch.next_multiple_of(PANEL_GRANULE);
        let panels = outs.div_ceil(PANEL_ROWS);
        let out_len = shape.out_len();
        let mut out = Output::new(out_len, "conv output")?;
        let dst = out.shared(out_len);
        let activation = self.epilogue.activation();
        // Panels per task: enough tasks for every thread twice over.
        let per_task = panels.div_ceil(2 * rayon::current_num_threads()).max(1);
        with_cpu_f32("pointwise conv", &call.x, call.residual.as_ref(), |input, residual| {
            let transposed_residual = residual.map_or(0, |_| outs * cols);
            with_scratch(depth * cols + transposed_residual, |scratch| {
                let (v, rt) = scratch.split_at_mut(depth * cols);
                // `v[c][n] = x[n][c]`, `rt[o][n] = residual[n][o]`, the
                // padding columns (and rows) zero.
                transpose_into(input, batch, depth, v, cols);
                if let Some(r) = residual {
                    transpose_into(r, batch, outs, rt, cols);
                }
                let (v, rt) = (&*v, &*rt);
                (0..panels.div_ceil(per_task)).into_par_iter().try_for_each(|task| {
                    let rows = task * per_task * PANEL_ROWS..outs.min((task + 1) * per_task * PANEL_ROWS);
                    let full = rows.len() / PANEL_ROWS * PANEL_ROWS;
                    let padded = rows.len().div_ceil(PANEL_ROWS) * PANEL_ROWS;
                    let u = &self.packed[rows.start * depth..][..padded * depth];
                    let v = Strided { data: v, stride: cols };
                    with_scratch(padded * cols, |m| {
                        if full > 0 {
                            let epilogue = StoreEpilogue {
                                bias: self.epilogue.biases(rows.start..rows.start + full),
                                residual: residual.map(|_| Strided {
                                    data: &rt[rows.start * cols..],
                                    stride: cols,
                                }),
                                activation,
                                stream: false,
                            };
                            let size = [full, depth, cols];
                            panel_gemm_strided(self.isa, &u[..full * depth], v, m, cols, size, Some(epilogue));
                        }
                        if full < rows.len() {
                            // The last channels, fewer than a panel: their
                            // padding rows have no bias.
                            let m = &mut m[full * cols..];
                            panel_gemm_strided(
                                self.isa,
                                &u[full * depth..],
                                v,
                                m,
                                cols,
                                [PANEL_ROWS, depth, cols],
                                None,
                            );
                            for (i, o) in (rows.start + full..rows.end).enumerate() {
                                for (n, m) in m[i * cols..][..batch].iter_mut().enumerate() {
                                    let r = residual.map(|_| rt[o * cols + n]);
                                    *m = value(*m, self.epilogue.bias(o), r, activation);
                                }
                            }
                        }
                        for n in 0..batch {
                            // SAFETY: tasks write disjoint channels (`rows`)
                            // of each image; nothing else touches `out`.
                            let out = unsafe { dst.slice(n * outs + rows.start, rows.len()) };
                            for (i, out) in out.iter_mut().enumerate() {
                                *out = m[i * cols + n];
                            }
                        }
                    })
                })
            })?
        })?;
        // SAFETY: the tasks cover every channel of every image, each written above.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }

    /// One task: in place over whole panels and whole micro-tile columns,
    /// then through scratch for the last partial panel and the first and
    /// last columns. Its writes are rows `t.rows` of its share of the
    /// columns: part `k` of `parts` takes the `k`-th of `parts` runs of the
    /// in-place tiles, the first part also the columns before them, the
    /// last part those after them.
    pub(super) fn task(&self, t: Task) -> candle_core::Result<()> {
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
fn packs(rows: usize, depth: usize, plane: usize) -> bool {
    let misaligned = !plane.is_multiple_of(PANEL_GRANULE);
    (misaligned && rows >= PACK_MIN_MISALIGNED) || (rows >= PACK_MIN && depth >= PACK_MIN)
}

/// `to[c][n] = from[n][c]` for `from` `[rows, width]`, `to` `[width][cols]`
/// (`cols >= rows`), the columns past `rows` zero.
fn transpose_into(from: &[f32], rows: usize, width: usize, to: &mut [f32], cols: usize) {
    for (c, to) in to.chunks_exact_mut(cols).take(width).enumerate() {
        for (n, to) in to.iter_mut().enumerate() {
            *to = if n < rows { from[n * width + c] } else { 0.0 };
        }
    }
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

/// Runs `f` on the f32 data of `tensor`, if any (a contiguous CPU tensor).
pub(super) fn with_optional_f32<R>(
    what: &str,
    tensor: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match tensor {
        Some(tensor) => with_cpu_f32(what, tensor, None, |data, _| f(Some(data))),
        None => f(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::{random_case, reference_with_residual, RandomCase};
    use crate::cpu::conv::ConvSpec;
    use crate::cpu::gemm::PANEL_TILES;
    use candle_core::Device;
    use proptest::prelude::*;
    use wick_ir::{Activation, Conv2dAttrs};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals candle's conv + bias + residual + activation:
        /// channel counts off the panel size (a partial last panel), planes
        /// off the micro-tile width (scratch columns), blocks of a few
        /// micro-tiles (several column blocks per task), batches of 1..3,
        /// batches of 6..18 1×1 planes (the images as columns), and
        /// outputs streamed past the caches (columns before the first
        /// aligned one through scratch). With an input scale, the same on
        /// the scaled input (the weights scaled per task and image; the
        /// input itself on 1×1 planes).
        #[test]
        fn matches_candle(
            batch in 1usize..4,
            channels in 1usize..20,
            out_channels in 1usize..30,
            [height, width] in [1usize..12, 1usize..40],
            block_tiles in 1usize..4,
            residual in any::<bool>(),
            activation in proptest::option::of(0usize..6),
            one_by_one in any::<bool>(),
            stream in any::<bool>(),
            scaled in any::<bool>(),
        ) {
            // 1×1 planes at batch > 1 take the images-as-columns path;
            // streamed outputs need planes of whole tiles.
            let [batch, height, width] = match (one_by_one, stream) {
                (true, _) => [batch * 6, 1, 1],
                (false, true) => [batch, height, width.next_multiple_of(PANEL_GRANULE)],
                (false, false) => [batch, height, width],
            };
            let attrs = Conv2dAttrs::default();
            let dims = [batch, channels, height, width];
            let case = random_case(dims, [out_channels, channels, 1, 1], attrs, activation, residual);
            let RandomCase { x, w, b, residual: r, activation, .. } = &case;
            let (r, activation) = (r.as_ref(), *activation);
            let scale = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &Device::Cpu).unwrap();
            let scale = scaled.then_some(&scale);
            let want = case.want_scaled(attrs, scale);
            let spec = ConvSpec::of(w, attrs).unwrap();
            for isa in Isa::available() {
                let epilogue = Epilogue::new(Some(b), out_channels, activation).unwrap().on(isa);
                let mut conv = PointwiseConv::new(spec, w, epilogue, Machine::with_isa(isa)).unwrap();
                conv.block_bytes = block_tiles * PANEL_GRANULE * (channels + out_channels.next_multiple_of(PANEL_ROWS)) * 4;
                conv.stream_bytes = if stream { 0 } else { usize::MAX };
                let got = conv.run_scaled(x, r, scale).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * channels as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    /// The blocks packed in tiles before the product ([`packs`]) give
    /// candle's values on every path: many channels on an aligned plane,
    /// four panels or more on misaligned planes (14×14 and 7×7, as
    /// ResNet50's), several column blocks per task, split by channels and
    /// by columns, streamed or not, with a residual, an activation and an
    /// input scale (multiplied into the tiles' copy and into the columns
    /// outside them); each image's input packed once for the runs of its
    /// channels ([`PointwiseConv::shares_packing`]: batches of 2-3 in two
    /// runs, batch 1 in four), scaled or not. On two threads, as the shapes
    /// are chosen for: each task keeps enough rows to pack.
    #[test]
    fn packed_blocks_match_candle() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let d = Device::Cpu;
            // (batch, in, out, height, width, stream, rows a task): split by
            // channels in two runs (batches of 2-3), by columns (batch 1).
            for (batch, channels, outs, h, w, stream, task_rows) in [
                (2, 130, 264, 4, 16, false, 128),
                (1, 129, 128, 16, 32, true, 128),
                (3, 24, 104, 14, 14, false, 48),
                (3, 40, 75, 7, 7, false, 40),
                (1, 8, 37, 13, 15, false, 40),
                (1, 100, 128, 10, 10, false, 32),
            ] {
                assert!(packs(task_rows, channels, h * w), "{task_rows} x {channels} on {h}x{w}");
                let x = Tensor::randn(0f32, 1.0, (batch, channels, h, w), &d).unwrap();
                let wt = Tensor::randn(0f32, 1.0, (outs, channels, 1, 1), &d).unwrap();
                let b = Tensor::randn(0f32, 1.0, outs, &d).unwrap();
                let r = Tensor::randn(0f32, 1.0, (batch, outs, h, w), &d).unwrap();
                let s = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &d).unwrap();
                let scaled = x.broadcast_mul(&s).unwrap();
                let attrs = Conv2dAttrs::default();
                let spec = ConvSpec::of(&wt, attrs).unwrap();
                let relu = Some(Activation::Relu);
                for (scale, residual) in [(None, None), (Some(&s), Some(&r))] {
                    let input = if scale.is_some() { &scaled } else { &x };
                    let want = reference_with_residual(input, &wt, Some(&b), attrs, residual, relu);
                    for isa in Isa::available() {
                        let epilogue = Epilogue::new(Some(&b), outs, relu).unwrap().on(isa);
                        let mut conv = PointwiseConv::new(spec, &wt, epilogue, Machine::with_isa(isa)).unwrap();
                        // Two tiles of columns per block.
                        conv.block_bytes = 2 * PANEL_TILES * (channels + outs.next_multiple_of(PANEL_ROWS)) * 4;
                        conv.stream_bytes = if stream { 0 } else { usize::MAX };
                        let got = conv.run_scaled(&x, residual, scale).unwrap();
                        let diff = crate::test_util::max_abs_diff(&got, &want);
                        assert!(
                            diff <= 1e-5 * channels as f64 * 4.0,
                            "{isa:?} {:?} -> {outs}: {diff}",
                            x.dims()
                        );
                    }
                }
            }
        });
    }

    /// The input is packed once per image where several runs of channels
    /// would each pack it, and by each task otherwise: one run, streamed
    /// stores, planes under a tile, runs too short to pack.
    #[test]
    fn shares_packing_only_where_runs_would_each_pack() {
        let d = Device::Cpu;
        let w = Tensor::zeros((256, 1024, 1, 1), candle_core::DType::F32, &d).unwrap();
        let b = Tensor::zeros(256, candle_core::DType::F32, &d).unwrap();
        let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
        let isa = Isa::detect();
        let epilogue = Epilogue::new(Some(&b), 256, None).unwrap().on(isa);
        let conv = PointwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
        // ResNet50's 1024 -> 256 on 14×14 at batch 1: four runs of 64.
        assert!(conv.shares_packing(4, 64, 196, false));
        assert!(!conv.shares_packing(1, 256, 196, false));
        assert!(!conv.shares_packing(4, 64, 196, true));
        assert!(!conv.shares_packing(4, 64, 8, false));
        assert!(!conv.shares_packing(4, 8, 196, false));
    }

    /// Each way of taking an input scale, on every path: tasks with more
    /// rows than pixels scale the input (the same values as running on the
    /// scaled input, bit for bit), the others their weights (within f32
    /// rounding of it, and not bit for bit: the weights were scaled),
    /// split by channels or by columns.
    #[test]
    fn input_scale_on_either_operand() {
        let d = Device::Cpu;
        // (batch, in, out, height, width): 24 rows > 6 pixels; 40 rows on
        // 64-pixel planes split by channels; 8 rows on 20×20 split by columns.
        for (batch, channels, outs, h, wd) in [(1, 5, 24, 2, 3), (3, 5, 24, 2, 3), (1, 9, 40, 8, 8), (2, 7, 8, 20, 20)]
        {
            let x = Tensor::randn(0f32, 1.0, (batch, channels, h, wd), &d).unwrap();
            let s = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (outs, channels, 1, 1), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, outs, &d).unwrap();
            let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
            let scaled = x.broadcast_mul(&s).unwrap();
            for isa in Isa::available() {
                let epilogue = Epilogue::new(Some(&b), outs, None).unwrap().on(isa);
                let conv = PointwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
                let want = conv.run(&scaled, None).unwrap();
                let got = conv.run_scaled(&x, None, Some(&s)).unwrap();
                let case = format!("{isa:?} {:?}", x.dims());
                if outs > h * wd {
                    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(values(&got), values(&want), "{case}");
                } else {
                    let diff = crate::test_util::max_abs_diff(&got, &want);
                    assert!(diff > 0.0 && diff <= 1e-5 * channels as f64 * 4.0, "{case}: {diff}");
                }
            }
        }
    }

    /// Other kernels, strides, paddings and groups are refused, and the
    /// operands are checked: wrong channels, a residual of another shape.
    #[test]
    fn refuses_what_it_does_not_compute() {
        let d = Device::Cpu;
        let machine = Machine::with_isa(Isa::Scalar);
        let epilogue = || Epilogue::new(None, 4, None).unwrap();
        let w = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &d).unwrap();
        for attrs in [
            Conv2dAttrs {
                stride: [2, 1],
                ..Default::default()
            },
            Conv2dAttrs {
                padding: [0, 1],
                ..Default::default()
            },
        ] {
            let spec = ConvSpec::of(&w, attrs).unwrap();
            assert!(PointwiseConv::new(spec, &w, epilogue(), machine).is_err(), "{attrs:?}");
        }
        let w3 = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &d).unwrap();
        let spec = ConvSpec::of(&w3, Conv2dAttrs::default()).unwrap();
        assert!(PointwiseConv::new(spec, &w3, epilogue(), machine).is_err());
        let conv = PointwiseConv::new(
            ConvSpec::of(&w, Conv2dAttrs::default()).unwrap(),
            &w,
            epilogue(),
            machine,
        )
        .unwrap();
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, None).is_err(), "3 channels for 2");
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &d).unwrap();
        let r = Tensor::zeros((1, 4, 4, 3), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, Some(&r)).is_err(), "residual of another shape");
        let empty = conv.run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
        assert_eq!(empty.dims(), [0, 4, 4, 4]);
        for dims in [&[1, 3, 1, 1][..], &[2, 2, 1, 1], &[1, 2, 2, 1], &[2, 1]] {
            let s = Tensor::ones(dims, candle_core::DType::F32, &d).unwrap();
            assert!(conv.run_scaled(&x, None, Some(&s)).is_err(), "scale {dims:?}");
        }
    }
}
