//! The grouped (and depthwise) CPU convolution: weights kept once at compile
//! time; each forward does im2col (skipped for pointwise convs) and one
//! `gemm` crate product per image and group, then the epilogue in one pass
//! over each image's output while it is still in cache.
//!
//! Images run in parallel on rayon's pool when there are at least as many
//! images as threads; otherwise images run in turn and each gemm uses all
//! threads.

use super::{ConvShape, ConvSpec};
use crate::cpu::data::{with_cpu_f32, zeroed, SCRATCH_MAX_VALUES};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::output::Output;
use crate::cpu::parallel::try_for_each;
use candle_core::{bail, Tensor};

/// A convolution of any group count with its weights kept for the CPU.
#[derive(Debug)]
pub(crate) struct GroupedConv {
    spec: ConvSpec,
    /// Weights `[O, K]` row-major, `K = C/g · kh · kw` (OIHW flattened).
    weight: Vec<f32>,
    epilogue: Epilogue,
}

/// The per-group sizes of one call.
struct Geometry {
    shape: ConvShape,
    group_channels: usize,
    group_outputs: usize,
    /// Depth of each group's product: `C/g · kh · kw`.
    k: usize,
}

impl GroupedConv {
    /// Keeps `weight` (`[O, C/g, kh, kw]`, f32) for `spec`.
    pub(crate) fn new(spec: ConvSpec, weight: &Tensor, epilogue: Epilogue) -> candle_core::Result<Self> {
        let groups = spec.attrs.groups;
        if groups == 0 || !spec.in_channels.is_multiple_of(groups) || !spec.out_channels.is_multiple_of(groups) {
            bail!(
                "{groups} groups must divide {} input and {} output channels",
                spec.in_channels,
                spec.out_channels
            )
        }
        Ok(Self {
            spec,
            weight: weight.flatten_all()?.to_vec1::<f32>()?,
            epilogue,
        })
    }

    fn geometry(&self, shape: ConvShape) -> Geometry {
        let groups = self.spec.attrs.groups;
        let group_channels = shape.channels / groups;
        Geometry {
            shape,
            group_channels,
            group_outputs: self.spec.out_channels / groups,
            k: group_channels * self.spec.kernel[0] * self.spec.kernel[1],
        }
    }

    fn is_pointwise(&self) -> bool {
        let a = &self.spec.attrs;
        self.spec.kernel == [1, 1] && a.stride == [1, 1] && a.padding == [0, 0]
    }

    /// Runs the convolution on a CPU f32 tensor `[N, C, H, W]`, adding
    /// `residual` (the output's shape) before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let g = self.geometry(call.shape);
        let batch = g.shape.batch;
        let (image_in, image_out) = (
            g.shape.channels * g.shape.in_plane(),
            g.shape.out_channels * g.shape.out_plane(),
        );
        let mut out = Output::new(g.shape.out_len(), "conv output")?;
        out.fill(g.shape.out_len(), 0.0);
        if image_out == 0 {
            return out.into_tensor(&g.shape.out_dims());
        }
        // Each image's im2col columns, [C/g·kh·kw, OH·OW], are scratch.
        match g.k.checked_mul(g.shape.out_plane()) {
            Some(len) if self.is_pointwise() || len <= SCRATCH_MAX_VALUES => {}
            _ => bail!(
                "grouped conv: im2col of {} x {} values exceeds the {SCRATCH_MAX_VALUES} allowed",
                g.k,
                g.shape.out_plane()
            ),
        }
        with_cpu_f32(
            "grouped conv",
            &call.x,
            call.residual.as_ref(),
            |data, residual_data| {
                let threads = rayon::current_num_threads();
                let residual_of = |i: usize| residual_data.map(|r| &r[i * image_out..(i + 1) * image_out]);
                if batch >= threads {
                    try_for_each(out.values_mut().chunks_mut(image_out).enumerate(), |(i, out)| {
                        let input = &data[i * image_in..(i + 1) * image_in];
                        self.image(input, residual_of(i), out, &g, gemm::Parallelism::None)
                    })
                } else {
                    for (i, out) in out.values_mut().chunks_mut(image_out).enumerate() {
                        let parallelism = if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        };
                        self.image(
                            &data[i * image_in..(i + 1) * image_in],
                            residual_of(i),
                            out,
                            &g,
                            parallelism,
                        )?;
                    }
                    Ok(())
                }
            },
        )?;
        out.into_tensor(&g.shape.out_dims())
    }

    /// One image: `input` is `[C, H, W]`, `residual` and `out` are `[O, OH, OW]`.
    fn image(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        g: &Geometry,
        parallelism: gemm::Parallelism,
    ) -> candle_core::Result<()> {
        let (spatial, plane) = (g.shape.out_plane(), g.shape.in_plane());
        let mut columns = if self.is_pointwise() {
            Vec::new()
        } else {
            zeroed(g.k * spatial, "grouped conv columns")?
        };
        for group in 0..self.spec.attrs.groups {
            let group_input = &input[group * g.group_channels * plane..][..g.group_channels * plane];
            let rhs: &[f32] = if self.is_pointwise() {
                group_input
            } else {
                self.im2col(group_input, &mut columns, g);
                &columns
            };
            let lhs = &self.weight[group * g.group_outputs * g.k..][..g.group_outputs * g.k];
            let dst = &mut out[group * g.group_outputs * spatial..][..g.group_outputs * spatial];
            // The lengths the SAFETY argument below rests on, re-checked here.
            assert!(
                rhs.len() == g.k * spatial
                    && lhs.len() == g.group_outputs * g.k
                    && dst.len() == g.group_outputs * spatial,
                "grouped conv operands do not match their geometry"
            );
            // SAFETY: dst is [group_outputs, spatial] row-major (row stride
            // `spatial`), lhs is [group_outputs, k] (row stride k), rhs is
            // [k, spatial] (row stride spatial); the three slices have exactly
            // these lengths, so every index gemm forms is in bounds, and dst
            // does not alias lhs or rhs. read_dst = false: dst is overwritten.
            unsafe {
                gemm::gemm(
                    g.group_outputs,
                    spatial,
                    g.k,
                    dst.as_mut_ptr(),
                    1,
                    spatial as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    g.k as isize,
                    rhs.as_ptr(),
                    1,
                    spatial as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        for (channel, row) in out.chunks_mut(spatial).enumerate() {
            let residual = residual.map(|r| &r[channel * spatial..(channel + 1) * spatial]);
            self.epilogue.in_place(channel, row, residual);
        }
        Ok(())
    }

    /// Writes the `[k, OH·OW]` column matrix of one group's `[C/g, H, W]` input.
    fn im2col(&self, input: &[f32], columns: &mut [f32], g: &Geometry) {
        let a = &self.spec.attrs;
        let [kh, kw] = self.spec.kernel;
        let (oh, ow, height, width) = (g.shape.out_height, g.shape.out_width, g.shape.height, g.shape.width);
        let mut rows = columns.chunks_mut(oh * ow);
        for channel in 0..g.group_channels {
            let plane = &input[channel * height * width..][..height * width];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = rows.next().expect("k rows");
                    let dx = (kx * a.dilation[1]) as isize - a.padding[1] as isize;
                    for oy in 0..oh {
                        let iy = (oy * a.stride[0] + ky * a.dilation[0]) as isize - a.padding[0] as isize;
                        let out_row = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= height as isize {
                            out_row.fill(0.0);
                            continue;
                        }
                        let line = &plane[iy as usize * width..][..width];
                        if a.stride[1] == 1 {
                            // Contiguous span: zeros where the window hangs over the edges.
                            let first = (-dx).clamp(0, ow as isize) as usize;
                            let last = (width as isize - dx).clamp(first as isize, ow as isize) as usize;
                            if first >= last {
                                out_row.fill(0.0);
                                continue;
                            }
                            out_row[..first].fill(0.0);
                            // first >= -dx, so the start index is >= 0; last <= W - dx keeps the end in bounds.
                            let start = (first as isize + dx) as usize;
                            out_row[first..last].copy_from_slice(&line[start..start + (last - first)]);
                            out_row[last..].fill(0.0);
                        } else {
                            for (ox, value) in out_row.iter_mut().enumerate() {
                                let ix = (ox * a.stride[1]) as isize + dx;
                                *value = if ix < 0 || ix >= width as isize {
                                    0.0
                                } else {
                                    line[ix as usize]
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}
