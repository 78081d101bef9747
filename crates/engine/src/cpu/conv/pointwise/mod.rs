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
//! micro-tile storing what it loads ([`panel_gemm_shared_packing`](crate::cpu::gemm::panel_gemm_shared_packing)),
//! elsewhere (the scalar path, AVX2's products in depth chunks, and with
//! an input scale to fold into the copy) before the product; where
//! an image's channels are split into several runs, its input is packed
//! once for all of them, before they start.
//!
//! What the in-place product cannot cover goes through scratch: a row
//! panel with fewer than 8 output channels left (its padding rows must not
//! be written into the next channels), and, one column at a time
//! ([`panel_columns`](crate::cpu::gemm::panel_columns)), the last `H·W mod 16` columns (a whole micro-tile
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

mod task;

use task::packs;
pub(super) use task::Task;

use super::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, with_shared_scratch};
use crate::cpu::epilogue::{value, Epilogue};
use crate::cpu::gemm::{
    pack_panels, pack_tiles_parallel, panel_gemm_strided, DepthChunks, Isa, Right, SharedRows, StoreEpilogue, Strided,
    PANEL_GRANULE, PANEL_ROWS,
};
use crate::cpu::output::Output;
use crate::cpu::parallel::{try_for_each, try_shares};
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};

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
                try_for_each(0..panels.div_ceil(per_task), |task| {
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
mod tests;
