//! The depthwise CPU convolution (one filter per channel: groups = input =
//! output channels, MobileNets' and EfficientNets' k×k convs): each plane
//! is copied once into a zero-padded scratch with its columns split by
//! phase modulo the stride, then every output row accumulates `kh·kw`
//! contiguous runs of input scaled by one weight each (a multiply-add that
//! vectorises on the path's registers, at any stride), and the epilogue
//! runs on the plane while it is in cache.
//! Planes (image × channel) run in parallel.
//!
//! The grouped conv's im2col + per-group GEMM spent its time on thousands
//! of one-row products here.

use super::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, zeroed, SCRATCH_MAX_VALUES};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{Isa, IsaBody};
use candle_core::{bail, Tensor};
use rayon::prelude::*;

/// A depthwise convolution with its weights kept for the CPU.
#[derive(Debug)]
pub(crate) struct DepthwiseConv {
    spec: ConvSpec,
    /// Weights `[C, kh·kw]`.
    weight: Vec<f32>,
    epilogue: Epilogue,
    isa: Isa,
}

impl DepthwiseConv {
    /// Whether `spec` is depthwise with one filter per channel (more than one channel).
    pub(crate) fn applies(spec: &ConvSpec) -> bool {
        let groups = spec.attrs.groups;
        groups > 1 && spec.in_channels == groups && spec.out_channels == groups
    }

    /// Keeps `weight` (`[C, 1, kh, kw]`, f32) for `spec` on path `isa`.
    pub(crate) fn new(spec: ConvSpec, weight: &Tensor, epilogue: Epilogue, isa: Isa) -> candle_core::Result<Self> {
        if !Self::applies(&spec) {
            bail!(
                "a depthwise conv needs groups = input = output channels, got {} groups, {} -> {} channels",
                spec.attrs.groups,
                spec.in_channels,
                spec.out_channels
            )
        }
        Ok(Self {
            spec,
            weight: weight.flatten_all()?.to_vec1::<f32>()?,
            epilogue,
            isa,
        })
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// output's shape) before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let a = self.spec.attrs;
        let stride_w = a.stride[1];
        // The padded plane, its columns split by phase modulo the stride:
        // phase p holds padded columns p, p + s, p + 2s, ... so that every
        // kernel tap reads a contiguous run of its phase's row.
        let padded = [
            shape.height.checked_add(2 * a.padding[0]),
            shape.width.checked_add(2 * a.padding[1]),
        ];
        let [Some(padded_height), Some(padded_width)] = padded else {
            bail!("depthwise conv: padded input of {:?} overflows", shape)
        };
        let phase_width = padded_width.div_ceil(stride_w);
        let padded_len = match [padded_height, phase_width, stride_w]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
        {
            Some(len) if len <= SCRATCH_MAX_VALUES => len,
            _ => bail!("depthwise conv: a padded plane of {padded_height} x {padded_width} exceeds the {SCRATCH_MAX_VALUES} values allowed"),
        };
        let (in_plane, out_plane) = (shape.in_plane(), shape.out_plane());
        let mut out = zeroed(shape.out_len(), "conv output")?;
        if out_plane == 0 {
            return output(out, shape.out_dims());
        }
        let taps = self.spec.kernel[0] * self.spec.kernel[1];
        let phase_len = padded_height * phase_width;
        with_cpu_f32("depthwise conv", &call.x, call.residual.as_ref(), |data, residual| {
            out.par_chunks_mut(out_plane).enumerate().try_for_each_init(
                Vec::new,
                |scratch: &mut Vec<f32>, (plane, out)| {
                    if scratch.len() != padded_len {
                        scratch.clear();
                        if scratch.try_reserve_exact(padded_len).is_err() {
                            bail!("depthwise conv: cannot allocate a padded plane of {padded_len} values")
                        }
                        scratch.resize(padded_len, 0.0);
                    }
                    let channel = plane % shape.channels;
                    let input = &data[plane * in_plane..][..in_plane];
                    // The padding stays zero: only the interior is written.
                    for (y, row) in input.chunks_exact(shape.width).enumerate() {
                        let row_start = (y + a.padding[0]) * phase_width;
                        if stride_w == 1 {
                            let start = row_start + a.padding[1];
                            scratch[start..start + shape.width].copy_from_slice(row);
                        } else {
                            for (x, &v) in row.iter().enumerate() {
                                let column = x + a.padding[1];
                                scratch[(column % stride_w) * phase_len + row_start + column / stride_w] = v;
                            }
                        }
                    }
                    self.isa.run(Plane {
                        phases: scratch,
                        phase_len,
                        phase_width,
                        weight: &self.weight[channel * taps..][..taps],
                        out,
                        out_width: shape.out_width,
                        kernel: self.spec.kernel,
                        stride: a.stride,
                        dilation: a.dilation,
                    });
                    let residual = residual.map(|r| &r[plane * out_plane..][..out_plane]);
                    self.epilogue.in_place(channel, out, residual);
                    Ok(())
                },
            )
        })?;
        output(out, shape.out_dims())
    }
}

/// One plane's accumulation into a zeroed `out`, from the padded plane
/// split into `stride[1]` column phases of `phase_len` values each.
struct Plane<'a> {
    phases: &'a [f32],
    phase_len: usize,
    phase_width: usize,
    weight: &'a [f32],
    out: &'a mut [f32],
    out_width: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

impl IsaBody for Plane<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let ([kh, kw], [sh, sw], [dh, dw]) = (self.kernel, self.stride, self.dilation);
        for (oy, row) in self.out.chunks_exact_mut(self.out_width).enumerate() {
            for ky in 0..kh {
                let row_start = (oy * sh + ky * dh) * self.phase_width;
                for kx in 0..kw {
                    let w = self.weight[ky * kw + kx];
                    // Output column ox reads padded column ox·sw + kx·dw:
                    // phase (kx·dw) mod sw, index ox + (kx·dw) / sw.
                    let column = kx * dw;
                    let start = (column % sw) * self.phase_len + row_start + column / sw;
                    let src = &self.phases[start..start + row.len()];
                    for (o, &s) in row.iter_mut().zip(src) {
                        *o += w * s;
                    }
                }
            }
        }
    }
}
