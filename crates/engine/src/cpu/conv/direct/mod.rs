//! Direct CPU f32 convolution for one group (any kernel, stride, padding,
//! dilation), as an implicit GEMM in cache-sized blocks: the output pixels
//! of the whole batch are cut into blocks of a few hundred; each block's
//! im2col columns (`[C·kh·kw, block]`, fits L2) are multiplied by the
//! weights packed once at compile time (panel or lane micro-kernel), and the
//! epilogue is applied while the block is still in cache. No whole-image
//! im2col buffer, no per-call packing. On planes of at least a block (and
//! on smaller ones of at least [`MIN_BLOCK_COLS`], [`whole_plane_block`]), in
//! the panel layout, blocks stay within one image, so a block's pixels are
//! one run of each output channel's plane: the product is stored there
//! with the epilogue in registers (as the 1×1 conv does), and only the
//! last partial panel and tile go through scratch. With a fused max pool
//! (`pooled.rs`) the convolution's rows stay in scratch and only the pooled
//! output is written. The lane layout reads the input itself where few
//! pixels' windows reach into the padding (`unpadded.rs`: strides 1 and
//! 2), else the input's phases in place of im2col for kernels of more
//! than one value (`phased.rs`).

mod phased;
mod pooled;
mod unpadded;

pub(crate) use pooled::{check_fused_pool, pooled_dims, task_rows, window as pool_window};

use super::planes::{self, PlaneRun, Product};
use super::{output, ConvShape, ConvSpec};
use crate::cpu::data::{gather_stride2_taps3, gather_strided_on, with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::lane_gathered::{max_runs, max_tile};
use crate::cpu::gemm::{
    chunks_depth, lane_gemm, lane_gemm_gathered, lane_gemm_part, panel_gemm_chunked, DepthChunks, Isa, IsaBody,
    LaneProduct, Layout, Source, LANES, LANE_CHUNK, PANEL_GRANULE, PANEL_ROWS,
};
use crate::cpu::output::Output;
use crate::cpu::parallel::for_ranges;
use crate::cpu::prefetch;
use crate::cpu::transpose::columns_to_block8;
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use phased::Phases;
use rayon::prelude::*;
use std::ops::Range;
use unpadded::Unpadded;
use wick_ir::MaxPool2dAttrs;

/// Smallest block worth running on its own thread rather than splitting
/// one block's phases across threads.
const MIN_BLOCK_COLS: usize = 128;

/// Most output pixels per block in the lane layout (its product keeps one
/// block's columns for every lane group).
const LANE_BLOCK_PIXELS: usize = 256;

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
fn lane_block_pixels(total: usize, threads: usize) -> usize {
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
fn whole_plane_block(plane: usize) -> bool {
    plane >= MIN_BLOCK_COLS
}

/// A one-group convolution with its weights packed for one of the two GEMM
/// micro-kernels.
#[derive(Debug)]
pub(crate) struct DirectConv {
    spec: ConvSpec,
    /// Output channels rounded up to a whole panel (or lane group).
    padded_out: usize,
    layout: Layout,
    packed: WeightBuffer,
    epilogue: Epilogue,
    /// A max pool applied to the convolution's output, if fused.
    pool: Option<MaxPool2dAttrs>,
    /// The path and caches it runs on: blocks (im2col columns and products)
    /// aim to fit [`Machine::block_bytes`], the L2.
    machine: Machine,
}

/// A run of output pixels in one output row: image, row, columns
/// `x0..x1`, stored from column `col` of the block.
#[derive(Clone, Copy)]
struct Segment {
    image: usize,
    y: usize,
    x0: usize,
    x1: usize,
    col: usize,
}

/// The least depth a lane-layout product on im2col columns shared by the
/// threads is split at ([`lane_parts`]; 1×1 kernels and strides the
/// phases do not take, `phased.rs`). Measured when the 3×3 convs ran on
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
fn lane_parts(depth: usize, split: bool) -> usize {
    match split && depth >= LANE_SPLIT_DEPTH {
        true => (2 * rayon::current_num_threads())
            .min(depth.div_ceil(LANE_CHUNK))
            .max(1),
        false => 1,
    }
}

/// Runs of segments in one image: consecutive output rows, which a
/// block's segments (in pixel order) cover without gaps, so one run is
/// also one contiguous range of each output channel's plane and of the
/// block's columns.
fn groups(segments: &[Segment]) -> impl Iterator<Item = &[Segment]> {
    segments.chunk_by(|a, b| a.image == b.image)
}

/// Lane-layout products (`parts` sums of the depth, each
/// `[O_pad / LANES][pixels][LANES]`, one after the other) back to rows of
/// `m` (`[O_pad, cols]`, only the first `pixels` columns written), the
/// parts added in order into the first (which is left holding the sums);
/// a lane group per task, its columns moved eight at a time
/// ([`columns_to_block8`]). One by one, with a store `cols` values from the
/// last for each, they took 7.5% of the CPU time of ResNet18's
/// layer2.0.conv1 on lanes (576 deep, batch 1; Intel Xeon VM, AVX-512).
fn lanes_to_rows(isa: Isa, partials: &mut [f32], parts: usize, pixels: usize, m: &mut [f32], cols: usize) {
    let per_group = pixels * LANES;
    let per_part = partials.len() / parts.max(1);
    let groups = per_part / per_group.max(1);
    let (sums, rest) = partials.split_at_mut(per_part);
    sums[..groups * per_group]
        .par_chunks_mut(per_group.max(1))
        .zip(m[..groups * LANES * cols].par_chunks_mut(LANES * cols))
        .enumerate()
        .for_each(|(group, (t, m))| {
            for k in 1..parts {
                let part = &rest[(k - 1) * per_part + group * per_group..][..per_group];
                t.iter_mut().zip(part).for_each(|(sum, value)| *sum += value);
            }
            for (eight, rows) in m.chunks_exact_mut(8 * cols).enumerate() {
                columns_to_block8(isa, t, LANES, 8 * eight, rows, (cols, pixels));
            }
        });
}

/// One forward's context, shared by its blocks.
struct Run<'a> {
    conv: &'a DirectConv,
    input: &'a [f32],
    residual: Option<&'a [f32]>,
    dst: SharedOut,
    shape: ConvShape,
    /// Whether each block's phases are split across threads (few blocks).
    split: bool,
    /// Whether blocks lie within one image and store their products in
    /// place ([`Run::in_place`]).
    in_place: bool,
    /// The input's phase layout, where the product reads the input in
    /// place of im2col columns ([`Phases::applies`]).
    phases: Option<Phases>,
    /// Where the lane product reads the input itself ([`Unpadded::applies`];
    /// then no phases).
    unpadded: Option<Unpadded>,
}

/// One block of output pixels.
struct Block {
    segments: Vec<Segment>,
    /// Output pixels in the block.
    pixels: usize,
    /// GEMM columns: `pixels` rounded up to the panel granule.
    cols: usize,
}

impl DirectConv {
    /// Packs `weight` (`[O, C, kh, kw]`, f32) for `layout`; `spec` must have
    /// one group. `pool`, if given, is applied last (panel layout only).
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        pool: Option<MaxPool2dAttrs>,
        layout: Layout,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        if let Some(p) = &pool {
            check_fused_pool(p)?;
            if layout == Layout::Lanes {
                bail!("the fused max pool runs on the panel layout")
            }
        }
        if spec.attrs.groups != 1 {
            bail!("the direct conv takes one group, got {}", spec.attrs.groups)
        }
        let out_channels = spec.out_channels;
        let depth = spec.in_channels * spec.kernel[0] * spec.kernel[1];
        let plain = weight.flatten_all()?.to_vec1::<f32>()?;
        if plain.len() != out_channels * depth {
            bail!(
                "direct conv weight {:?} does not match {out_channels} x {depth}",
                weight.dims()
            )
        }
        let padded_out = layout.padded_rows(out_channels);
        let mut packed = WeightBuffer::zeroed(padded_out * depth, "packed weights")?;
        layout.pack(&plain, out_channels, depth, &mut packed);
        Ok(Self {
            spec,
            padded_out,
            layout,
            packed,
            epilogue,
            pool,
            machine,
        })
    }

    /// The instruction-set path it runs on.
    fn isa(&self) -> crate::cpu::gemm::Isa {
        self.machine.isa
    }

    /// The weights' layout.
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// The most pixels and runs (output rows) of the lane layout's
    /// micro-tiles that read in place ([`phased::lane_tiles`]): runs down
    /// the rows past two only for kernels of more than one value, whose
    /// taps share the lines a tile reads (ResNet18's 1×1 stride-2
    /// downsample onto 7×7 took 1.18× the time in columns of 6 × 1 on
    /// AVX2, each broadcast from a line of its own for each of its 256
    /// channels; its 3×3 stride-2 conv onto 14×14 in 3 × 2 tiles took
    /// 0.94-0.96× the time: Intel Xeon VM, AVX2 forced, per node in the
    /// model, ABBA).
    fn tile_limit(&self) -> (usize, usize) {
        let runs = match self.spec.kernel[0] * self.spec.kernel[1] {
            1 => max_runs(self.isa()).min(2),
            _ => max_runs(self.isa()),
        };
        (max_tile(self.isa()), runs)
    }

    fn depth(&self) -> usize {
        self.spec.in_channels * self.spec.kernel[0] * self.spec.kernel[1]
    }

    /// How the panel product on a block's im2col columns is cut in depth
    /// ([`Machine::depth_chunks`]); the lane layout cuts its own.
    fn chunks(&self) -> Option<DepthChunks> {
        match self.layout {
            Layout::Panels => self.machine.depth_chunks(self.depth(), self.padded_out),
            Layout::Lanes => None,
        }
    }

    /// The form the debug log names: `depth-chunks` where the product on
    /// im2col columns runs in depth chunks ([`Self::chunks`]; the input
    /// phases' gathered product, where taken, runs whole).
    pub(crate) fn form(&self) -> &'static str {
        match self.chunks() {
            Some(_) => "depth-chunks",
            None => "",
        }
    }

    /// Output pixels per block: a multiple of the GEMM granule, columns and
    /// products together within the block budget (the L2), blocks of even
    /// size; at least [`MIN_BLOCK_COLS`] where the product runs in depth
    /// chunks ([`chunks_depth`]: only a chunk's rows of the columns need
    /// the L2). Every block streams all the weights, and pads its pixels to
    /// whole tiles: ResNet50's layer4.0.conv2 (4608 deep) at batch 10 took
    /// 20 blocks of 25 pixels in 32 columns, 189 MB of weights read per
    /// forward; with 4 blocks of 123, 0.64× the time (its 1024-deep
    /// downsample 0.69×, ResNet18's layer4.0.conv1 0.78×; Zen 3,
    /// alternating forwards).
    fn block_cols(&self, total: usize) -> usize {
        if self.layout == Layout::Lanes {
            return lane_block_pixels(total, rayon::current_num_threads());
        }
        let per_col = (self.depth() + self.padded_out) * 4;
        let least = match chunks_depth(self.isa(), self.depth(), false) {
            true => MIN_BLOCK_COLS,
            false => PANEL_GRANULE,
        };
        let target = (self.machine.block_bytes() / per_col).max(least);
        // At least two blocks per thread where each keeps MIN_BLOCK_COLS
        // columns: whole blocks in parallel keep each block's columns in one
        // core's cache, where splitting one block across threads makes every
        // thread stream all of its columns.
        let threads = rayon::current_num_threads();
        let target = target.min(total.div_ceil(2 * threads).max(MIN_BLOCK_COLS));
        // Whole rounds of blocks across the threads: 5 blocks on 2 threads
        // take as long as 6 smaller ones (ResNet18's layer2.0.conv1 at
        // batch 1, 784 pixels: 5 → 6 blocks).
        let blocks = total.div_ceil(target).max(1).next_multiple_of(threads);
        block_width(total, blocks, target, threads)
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`; `residual` (the
    /// convolution's output shape) is added before the optional ReLU, and
    /// the fused pool, if any, comes last.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let final_dims = match &self.pool {
            None => shape.out_dims(),
            Some(p) => pooled_dims(p, &shape)?,
        };
        let out_len: usize = final_dims.iter().product();
        if out_len == 0 {
            // An empty batch: nothing to compute (and no block size to pick).
            return output(Vec::new(), final_dims);
        }
        let mut out = Output::new(out_len, "conv output")?;
        // Disjoint writes: blocks (row chunks when pooled) cover disjoint
        // output pixels, and one task writes every channel of its pixels once.
        let dst = out.shared(out_len);
        with_cpu_f32("direct conv", &call.x, call.residual.as_ref(), |input, residual| {
            let threads = rayon::current_num_threads();
            let unpadded = Unpadded::applies(self, &shape)
                .then(|| Unpadded::new(self, &shape))
                .transpose()?;
            let mut run = Run {
                conv: self,
                input,
                residual,
                dst,
                shape,
                split: false,
                in_place: false,
                phases: (unpadded.is_none() && Phases::applies(self, &shape))
                    .then(|| Phases::new(self, &shape))
                    .transpose()?,
                unpadded,
            };
            if let Some(pool) = &self.pool {
                return run.pooled(pool, [final_dims[2], final_dims[3]]);
            }
            let (plane, total) = (shape.out_plane(), shape.batch * shape.out_plane());
            let cols = self.block_cols(total);
            // Blocks within one image where each image has a block's worth
            // of pixels, or a plane a block of its own stores well
            // ([`whole_plane_block`]); smaller planes share blocks. Each
            // image's last block is non-empty ([`blocks_per_image`]).
            let within_images = self.layout == Layout::Panels && (plane >= cols || whole_plane_block(plane));
            let per_image = blocks_per_image(plane, cols, shape.batch, threads);
            let (blocks, cols) = match within_images {
                true => (
                    shape.batch * per_image,
                    Cut::of(plane, per_image, shape.batch, threads).width,
                ),
                false => (total.div_ceil(cols), cols),
            };
            run.split = shares_blocks(blocks, threads) && threads > 1;
            run.in_place = within_images && !run.split && run.phases.is_none();
            let run_block = |b: usize| match within_images {
                true => {
                    let (image, k) = (b / per_image, b % per_image);
                    run.block(image * plane + k * cols, cols.min(plane - k * cols))
                }
                false => run.block(b * cols, cols.min(total - b * cols)),
            };
            if run.split {
                (0..blocks).try_for_each(run_block)
            } else {
                (0..blocks).into_par_iter().try_for_each(run_block)
            }
        })?;
        // SAFETY: the blocks cover all N·OH·OW output pixels (`pooled`: all
        // pooled pixels) and each writes every channel of its pixels, so all
        // `out_len` values are set.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&final_dims)
    }

    /// Scratch [`Run::products`] needs for its `m`: `[O_pad, cols]`, and
    /// for the lane layout as much again per part of its depth
    /// ([`lane_parts`]; saturated: past the scratch cap, `with_scratch`
    /// refuses it).
    fn products_len(&self, cols: usize) -> usize {
        match self.layout {
            Layout::Panels => self.padded_out * cols,
            Layout::Lanes => (1 + lane_parts(self.depth(), true))
                .saturating_mul(self.padded_out)
                .saturating_mul(cols),
        }
    }
}

impl Run<'_> {
    /// The block of output pixels `first..first + pixels` (numbered over the
    /// batch, row-major), as runs within one output row.
    fn block_of(&self, first: usize, pixels: usize) -> Block {
        let s = &self.shape;
        let mut segments = Vec::new();
        let (mut p, end) = (first, first + pixels);
        while p < end {
            let (image, within) = (p / s.out_plane(), p % s.out_plane());
            let (y, x0) = (within / s.out_width, within % s.out_width);
            let x1 = s.out_width.min(x0 + (end - p));
            segments.push(Segment {
                image,
                y,
                x0,
                x1,
                col: p - first,
            });
            p += x1 - x0;
        }
        Block {
            segments,
            pixels,
            cols: pixels.div_ceil(PANEL_GRANULE) * PANEL_GRANULE,
        }
    }

    /// im2col, product and epilogue for pixels `first..first + pixels`.
    fn block(&self, first: usize, pixels: usize) -> candle_core::Result<()> {
        let block = self.block_of(first, pixels);
        let out_channels = self.shape.out_channels;
        if let Some(unpadded) = &self.unpadded {
            return self.lane_unpadded(unpadded, &block);
        }
        if let Some(phases) = &self.phases {
            // Products with a granule of room past the block's columns
            // for the last row's last tile.
            let m_cols = block.cols + PANEL_GRANULE;
            if self.conv.layout == Layout::Lanes {
                // The products before they go back to rows too.
                let buf_len = phases.lane_buffer_len(self.conv, &block)?;
                let m_len = self.conv.padded_out * (m_cols + block.pixels);
                return with_scratch(buf_len.saturating_add(m_len), |scratch| {
                    let (buf, m) = scratch.split_at_mut(buf_len);
                    self.lane_phased(phases, &block, buf, m, m_cols)
                })?;
            }
            let buf_len = phases.buffer_len(self.conv, Phases::block_rows(&block))?;
            let m_len = self.conv.padded_out * m_cols;
            return with_scratch(buf_len + m_len, |scratch| {
                let (buf, m) = scratch.split_at_mut(buf_len);
                self.phased(phases, &block, buf, m, m_cols)?;
                let m = &*m;
                for_ranges(out_channels, self.split, |channels| {
                    self.epilogue(&m[channels.start * m_cols..], m_cols, &block, channels)
                });
                Ok(())
            })?;
        }
        let (v_len, m_len) = (self.conv.depth() * block.cols, self.conv.products_len(block.cols));
        with_scratch(v_len.saturating_add(m_len), |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            if self.in_place {
                return self.in_place(first, &block, v, m);
            }
            self.products(&block, v, m);
            let m = &*m;
            // Split: channels in parallel, each writing its own output rows.
            for_ranges(out_channels, self.split, |channels| {
                self.epilogue(&m[channels.start * block.cols..], block.cols, &block, channels)
            });
        })
    }

    /// A block within one image (pixels `first..`, one run of each output
    /// plane): the product of whole panels and tiles stored in the output
    /// with the epilogue in registers; through scratch `m`, the rows past
    /// the last whole panel and the columns past the last whole tile.
    fn in_place(&self, first: usize, block: &Block, v: &mut [f32], m: &mut [f32]) {
        let (conv, s) = (self.conv, &self.shape);
        let plane = s.out_plane();
        self.im2col(block, 0, v);
        let product = Product {
            isa: conv.isa(),
            packed: &conv.packed[..],
            epilogue: &conv.epilogue,
            out_channels: s.out_channels,
            padded_out: conv.padded_out,
            depth: conv.depth(),
            v,
            cols: block.cols,
            pixels: block.pixels,
            chunks: conv.chunks(),
        };
        let out = PlaneRun {
            dst: self.dst,
            // Output channel 0's value of the block's first pixel.
            base: (first / plane * s.out_channels) * plane + first % plane,
            plane,
            residual: self.residual,
        };
        // SAFETY: this block alone writes its pixels' columns of the
        // image's output planes (blocks are disjoint runs of pixels).
        unsafe { planes::store(product, out, m) }
    }

    /// The epilogue for output channels `channels` of a block (products
    /// `m`, `[channels, m_cols]` from the first of them), written to the
    /// block's output pixels.
    /// Each image's pixels of the block are written in one call
    /// ([`groups`]), not an output row at a time (14 or 7 values, most of
    /// them in scalar tails, on ResNet's 14×14 and 7×7 planes at batch 1:
    /// its 3×3 stride-2 convs onto them took 0.97-0.99× the time this way,
    /// alone, alternating, on the Intel Xeon VM).
    fn epilogue(&self, m: &[f32], m_cols: usize, block: &Block, channels: Range<usize>) {
        let s = &self.shape;
        for o in channels.clone() {
            let products = &m[(o - channels.start) * m_cols..][..block.cols];
            for run in groups(&block.segments) {
                let (first, len) = (&run[0], run.iter().map(|seg| seg.x1 - seg.x0).sum::<usize>());
                debug_assert!(run
                    .iter()
                    .all(|seg| seg.col - first.col == (seg.y - first.y) * s.out_width + seg.x0 - first.x0));
                let base = (first.image * s.out_channels + o) * s.out_plane() + first.y * s.out_width + first.x0;
                let src = &products[first.col..first.col + len];
                // SAFETY: these pixels belong to this block only, and
                // channel o to one epilogue call.
                let out = unsafe { self.dst.slice(base, len) };
                let residual = self.residual.map(|r| &r[base..base + len]);
                self.conv.epilogue.write(o, out, src, residual);
            }
        }
    }

    /// `m[..O_pad · cols]` (`[O_pad, cols]`) = weights · im2col of the
    /// block's pixels; `v` (`[C·kh·kw, cols]`) and the rest of `m`
    /// ([`DirectConv::products_len`] in all) are scratch. `split` shares the
    /// product's output-channel panels across threads.
    fn products(&self, block: &Block, v: &mut [f32], m: &mut [f32]) {
        let conv = self.conv;
        if conv.layout == Layout::Lanes {
            return self.lane_products(block, v, m);
        }
        let (depth, cols) = (conv.depth(), block.cols);
        self.im2col_rows(block, v);
        let v = &*v;
        let chunks = conv.chunks();
        self.panel_runs(m, cols, |u, m, rows| {
            panel_gemm_chunked(conv.isa(), u, v, m, [rows, depth, cols], chunks)
        });
    }

    /// The block's im2col columns into `v` (`[C·kh·kw, cols]`), their rows
    /// shared by the threads with `split`.
    fn im2col_rows(&self, block: &Block, v: &mut [f32]) {
        let cols = block.cols;
        let v = &mut v[..self.conv.depth() * cols];
        if self.split {
            // im2col rows are independent: share them too.
            let per_task = self.conv.depth().div_ceil(4 * rayon::current_num_threads()).max(1);
            v.par_chunks_mut(per_task * cols)
                .enumerate()
                .for_each(|(i, v)| self.im2col(block, i * per_task, v));
        } else {
            self.im2col(block, 0, v);
        }
    }

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
    fn lane_products(&self, block: &Block, v: &mut [f32], m: &mut [f32]) {
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
            rows.into_par_iter()
                .zip(partials.par_chunks_mut(per_part))
                .enumerate()
                .for_each(|(p, (v, t))| {
                    self.im2col(block, bound(p), v);
                    lane_gemm_part(conv.isa(), size, &conv.packed, v, t, 0..groups, bound(p)..bound(p + 1));
                });
        } else {
            self.im2col_rows(block, v);
            let v = &*v;
            // Tasks own whole lane groups.
            let per_task = match self.split {
                true => groups.div_ceil(2 * rayon::current_num_threads()),
                false => groups,
            };
            partials
                .par_chunks_mut(per_task * per_group)
                .enumerate()
                .for_each(|(i, t)| {
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
    fn lane_tasks(&self, sources: &[Source], block: &Block, partials: &mut [f32], m: &mut [f32], m_cols: usize) {
        let (conv, pixels) = (self.conv, block.pixels);
        let lane_groups = conv.padded_out / LANES;
        let per_task = match self.split {
            true => lane_groups.div_ceil(2 * rayon::current_num_threads()).max(1),
            false => lane_groups,
        };
        partials[..conv.padded_out * pixels]
            .par_chunks_mut(per_task * pixels * LANES)
            .zip(m.par_chunks_mut(per_task * LANES * m_cols))
            .enumerate()
            .for_each(|(i, (t, m))| {
                let first = i * per_task;
                let groups = first..first + t.len() / (pixels * LANES);
                let w = (&conv.packed[..], conv.padded_out);
                lane_gemm_gathered(conv.isa(), w, sources, (&mut *t, pixels), groups.clone());
                lanes_to_rows(conv.isa(), t, 1, pixels, m, m_cols);
                let channels = groups.start * LANES..(groups.end * LANES).min(self.shape.out_channels);
                self.epilogue(m, m_cols, block, channels);
            });
    }

    /// `product(u, m, rows)` over the weights' panels (`m` `[O_pad,
    /// m_cols]`): all of them at once, or with `split` in runs of panels
    /// shared by the threads, each run given its rows of the packed weights
    /// and of `m`.
    fn panel_runs(&self, m: &mut [f32], m_cols: usize, product: impl Fn(&[f32], &mut [f32], usize) + Sync) {
        let conv = self.conv;
        if !self.split {
            return product(&conv.packed, m, conv.padded_out);
        }
        let depth = conv.depth();
        let per_task = (conv.padded_out / PANEL_ROWS).div_ceil(4 * rayon::current_num_threads()) * PANEL_ROWS;
        m[..conv.padded_out * m_cols]
            .par_chunks_mut(per_task * m_cols)
            .enumerate()
            .for_each(|(i, m)| {
                let rows = m.len() / m_cols;
                product(&conv.packed[i * per_task * depth..][..rows * depth], m, rows);
            });
    }

    /// Fills rows of `v` (`[C·kh·kw, cols]`) with the block's columns;
    /// zeros for padding and for the columns past the block's pixels.
    /// `v` holds rows `first_row..` (a whole number of `cols`-long rows).
    fn im2col(&self, block: &Block, first_row: usize, v: &mut [f32]) {
        // Compiled for the path: its stride-2 gather vectorises with the
        // path's shuffles (as baseline SSE it took a fifth of
        // MobileNetV2's stem conv).
        self.conv.isa().run(Im2col {
            run: self,
            block,
            first_row,
            v,
        })
    }

    /// The im2col rows from `first_row` into `v`: three at a time where a
    /// 3-wide stride-2 kernel row's taps start ([`Self::taps3_applies`]),
    /// else one by one.
    #[inline(always)]
    fn im2col_body(&self, block: &Block, first_row: usize, v: &mut [f32]) {
        let cols = block.cols;
        let rows = v.len() / cols.max(1);
        let taps3 = self.taps3_applies();
        let mut r = 0;
        while r < rows {
            let row = first_row + r;
            let v = &mut v[r * cols..];
            if taps3 && row.is_multiple_of(3) && r + 3 <= rows {
                self.im2col_taps3(block, row, &mut v[..3 * cols]);
                r += 3;
            } else {
                self.im2col_row(block, row, &mut v[..cols]);
                r += 1;
            }
        }
    }

    /// Whether the im2col rows of a kernel row's three taps are gathered
    /// together ([`gather_stride2_taps3`]): a 3-wide kernel at stride 2,
    /// dilation 1 (ResNet's and the MobileNets' stride-2 convs) on
    /// AVX-512, where each tap's own gather and edge fills took half of
    /// im2col's time and im2col a quarter of ResNet18's layer2.0.conv1.
    fn taps3_applies(&self) -> bool {
        let (a, [_, kw]) = (&self.conv.spec.attrs, self.conv.spec.kernel);
        kw == 3 && a.stride[1] == 2 && a.dilation[1] == 1 && self.conv.isa() == Isa::Avx512
    }

    /// Rows `row..row + 3` of im2col (`row` a multiple of 3: one input
    /// channel's kernel row `ky`, taps 0, 1, 2) into `v` (three rows of
    /// `block.cols`), each segment's input row read once for the three.
    #[inline(always)]
    fn im2col_taps3(&self, block: &Block, row: usize, v: &mut [f32]) {
        let (s, a, [kh, kw]) = (&self.shape, &self.conv.spec.attrs, self.conv.spec.kernel);
        let plane = s.in_plane();
        let (c, ky) = (row / (kh * kw), row / kw % kh);
        let (v0, rest) = v.split_at_mut(block.cols);
        let (v1, v2) = rest.split_at_mut(block.cols);
        for seg in &block.segments {
            let span = seg.col..seg.col + seg.x1 - seg.x0;
            let outs = [&mut v0[span.clone()], &mut v1[span.clone()], &mut v2[span]];
            let Some(line) = self.input_line(seg, c, ky) else {
                outs.into_iter().for_each(|out| out.fill(0.0));
                continue;
            };
            // The next channel's line, as for single rows.
            prefetch::read_span(line.as_ptr().wrapping_add(plane), s.width);
            let start = (2 * seg.x0) as isize - a.padding[1] as isize;
            gather_stride2_taps3(Isa::Avx512, line, start, outs);
        }
        for v in [v0, v1, v2] {
            v[block.pixels..].fill(0.0);
        }
    }

    /// The input row that kernel row `ky` of channel `c` reads for the
    /// segment's output row, or `None` where it lies in the padding.
    #[inline(always)]
    fn input_line(&self, seg: &Segment, c: usize, ky: usize) -> Option<&[f32]> {
        let (s, a) = (&self.shape, &self.conv.spec.attrs);
        let iy = (seg.y * a.stride[0] + ky * a.dilation[0]) as isize - a.padding[0] as isize;
        if iy < 0 || iy >= s.height as isize {
            return None;
        }
        Some(&self.input[(seg.image * s.channels + c) * s.in_plane() + iy as usize * s.width..][..s.width])
    }

    /// Row `row` of im2col into `v` (`block.cols` values).
    #[inline(always)]
    fn im2col_row(&self, block: &Block, row: usize, v: &mut [f32]) {
        let (s, a, [kh, kw]) = (&self.shape, &self.conv.spec.attrs, self.conv.spec.kernel);
        let plane = s.in_plane();
        let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
        let dx = (kx * a.dilation[1]) as isize - a.padding[1] as isize;
        // Output columns whose input column ox·sw + dx lies in 0..W
        // (per im2col row: the divisions cost more than a segment's copy).
        let sw = a.stride[1] as isize;
        let lo_all = ((-dx).max(0) + sw - 1) / sw;
        let hi_all = ((s.width as isize - dx).max(0) + sw - 1) / sw;
        for seg in &block.segments {
            let out = &mut v[seg.col..seg.col + seg.x1 - seg.x0];
            let Some(line) = self.input_line(seg, c, ky) else {
                out.fill(0.0);
                continue;
            };
            if kx == 0 {
                // The next channel's line, which rows `kw` on read
                // (a hint: past the input's end for the last channel).
                // Each channel's lines for a block are a few KiB a
                // plane apart, too short a run for the hardware
                // prefetchers: ResNet50's 1×1 stride-2 downsample
                // 256 -> 512 onto 28×28 alone 0.95× the time at batch
                // 1, 0.93× at batch 10, its 3×3 stride-2 conv onto
                // 28×28 0.98× and 0.94× (Zen 4, `xtask compare`, 400
                // and 40 pairs); in the model at batch 1 the
                // downsample 0.92×, the forwards level.
                prefetch::read_span(line.as_ptr().wrapping_add(plane), s.width);
            }
            let (lo, hi) = (
                (lo_all as usize).clamp(seg.x0, seg.x1),
                (hi_all as usize).clamp(seg.x0, seg.x1),
            );
            let hi = hi.max(lo);
            out[..lo - seg.x0].fill(0.0);
            out[hi - seg.x0..].fill(0.0);
            let inside = &mut out[lo - seg.x0..hi - seg.x0];
            if inside.is_empty() {
                continue;
            }
            // lo..hi keeps ix = ox·sw + dx within 0..W.
            let start = (lo as isize * sw + dx) as usize;
            gather_strided_on(self.conv.isa(), &line[start..], sw as usize, inside);
        }
        v[block.pixels..].fill(0.0);
    }
}

/// [`Run::im2col`] as a body for [`crate::cpu::gemm::Isa::run`].
struct Im2col<'a, 'r> {
    run: &'a Run<'r>,
    block: &'a Block,
    first_row: usize,
    v: &'a mut [f32],
}

impl IsaBody for Im2col<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.run.im2col_body(self.block, self.first_row, self.v)
    }
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
fn block_width(total: usize, blocks: usize, target: usize, threads: usize) -> usize {
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
fn blocks_per_image(plane: usize, cols: usize, batch: usize, threads: usize) -> usize {
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
fn shares_blocks(blocks: usize, threads: usize) -> bool {
    blocks < 2 * threads.max(1)
}

/// `groups` runs of `pixels` pixels (the images, or the whole batch as one
/// run) cut into `k` blocks each, on `threads` threads: what
/// [`block_width`] and [`blocks_per_image`] weigh.
#[derive(Clone, Copy)]
struct Cut {
    /// A block's columns: its pixels in whole 16-column tiles.
    width: usize,
    /// Columns each thread computes, taking the blocks in rounds.
    per_thread: usize,
    /// Whether the threads share each block ([`shares_blocks`]).
    shared: bool,
}

impl Cut {
    fn of(pixels: usize, k: usize, groups: usize, threads: usize) -> Cut {
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
impl DirectConv {
    /// For tests: the conv of `weight` (`[O, C, kh, kw]`), `bias` and
    /// `attrs`, with `activation`, on a given layout and path.
    pub(crate) fn for_test(
        weight: &Tensor,
        bias: Option<&Tensor>,
        attrs: wick_ir::Conv2dAttrs,
        activation: Option<wick_ir::Activation>,
        pool: Option<MaxPool2dAttrs>,
        layout: Layout,
        isa: crate::cpu::gemm::Isa,
    ) -> candle_core::Result<Self> {
        let spec = ConvSpec::of(weight, attrs)?;
        let epilogue = Epilogue::new(bias, spec.out_channels, activation)?.on(isa);
        Self::new(spec, weight, epilogue, pool, layout, Machine::with_isa(isa))
    }

    /// For tests: blocks sized for a budget of `bytes` (small ones: many
    /// blocks per plane).
    pub(crate) fn with_block_bytes(mut self, bytes: usize) -> Self {
        self.machine.caches.l2 = bytes;
        self
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
