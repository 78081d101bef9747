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
//! pixels' windows reach into the padding (`unpadded/`: strides 1 and
//! 2), else the input's phases in place of im2col for kernels of more
//! than one value (`phased/`).

mod blocks;
mod im2col;
mod lanes;
mod phased;
mod pooled;
mod unpadded;

pub(crate) use pooled::{check_fused_pool, pooled_dims, task_rows, window as pool_window};

use super::planes::{self, PlaneRun, Product};
use super::{output, ConvShape, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, SharedOut};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::lane_gathered::{max_runs, max_tile};
use crate::cpu::gemm::{chunks_depth, panel_gemm_chunked, DepthChunks, Layout, PANEL_GRANULE, PANEL_ROWS};
use crate::cpu::output::Output;
use crate::cpu::parallel::{for_each, for_ranges, per_task, try_for_each};
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use blocks::{block_width, blocks_per_image, lane_block_pixels, shares_blocks, whole_plane_block, Cut, MIN_BLOCK_COLS};
use candle_core::{bail, Tensor};
use lanes::lane_parts;
use phased::Phases;
use std::ops::Range;
use unpadded::Unpadded;
use wick_ir::MaxPool2dAttrs;

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

/// Runs of segments in one image: consecutive output rows, which a
/// block's segments (in pixel order) cover without gaps, so one run is
/// also one contiguous range of each output channel's plane and of the
/// block's columns.
fn groups(segments: &[Segment]) -> impl Iterator<Item = &[Segment]> {
    segments.chunk_by(|a, b| a.image == b.image)
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
                try_for_each(0..blocks, run_block)
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
        let per = per_task(conv.padded_out / PANEL_ROWS, 4) * PANEL_ROWS;
        for_each(
            m[..conv.padded_out * m_cols].chunks_mut(per * m_cols).enumerate(),
            |(i, m)| {
                let rows = m.len() / m_cols;
                product(&conv.packed[i * per * depth..][..rows * depth], m, rows);
            },
        );
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
