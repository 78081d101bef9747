//! A depthwise conv (groups = input channels) as one candle custom op for
//! f32. candle's conv2d runs a grouped conv as one im2col + GEMM per group
//! and joins the results: hundreds of kernel launches per MobileNet layer on
//! a GPU. On CUDA this op is one launch (`cuda/depthwise.cu`, committed as
//! PTX); its CPU implementation is the plain loop that kernel mirrors,
//! tested against candle's grouped conv2d, so the op's checks and indexing
//! are tested anywhere.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use wick_ir::Conv2dAttrs;

/// Whether [`conv2d`] runs this conv: f32 operands, more than one group and
/// one input channel per group (`weight` `[C·m, 1, KH, KW]`).
pub(crate) fn applies(attrs: &Conv2dAttrs, x: &Tensor, weight: &Tensor) -> bool {
    attrs.groups > 1
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.dims().get(1) == Some(&attrs.groups)
        && weight.dims().get(1) == Some(&1)
}

/// The depthwise conv of `x` (`[N, C, H, W]`) with `weight` (`[C·m, 1, KH,
/// KW]`), per-axis stride, padding and dilation from `attrs`, no bias.
pub(crate) fn conv2d(attrs: &Conv2dAttrs, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &DepthwiseConv { attrs: *attrs })
}

/// The op: the conv's attributes.
struct DepthwiseConv {
    attrs: Conv2dAttrs,
}

/// Sizes of one depthwise conv, as the CUDA kernel takes them (`#[repr(C)]`,
/// the field order of `DepthwiseGeometry` in `cuda/depthwise.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Geometry {
    channels: u32,
    mult: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
}

/// One output axis: `(size + 2·pad − dilation·(kernel − 1) − 1) / stride + 1`,
/// checked; `None` when the kernel does not fit or a size overflows.
fn out_len(size: usize, kernel: usize, stride: usize, pad: usize, dilation: usize) -> Option<usize> {
    let span = dilation.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)?;
    let padded = size.checked_add(pad.checked_mul(2)?)?;
    Some(padded.checked_sub(span)?.checked_div(stride)? + 1)
}

/// Converts every size to the kernel's `u32`, naming the first that does not fit.
fn to_u32(name: &str, value: usize) -> Result<u32> {
    match u32::try_from(value) {
        Ok(v) => Ok(v),
        Err(_) => bail!("depthwise conv: {name} = {value} exceeds the kernel's u32 sizes"),
    }
}

impl DepthwiseConv {
    /// The geometry, output shape and output element count after checking
    /// the operands: `x` contiguous `[N, C, H, W]`, `weight` contiguous
    /// `[C·m, 1, KH, KW]` with `groups = C`. Errors name what was expected.
    fn geometry(&self, xl: &Layout, wl: &Layout) -> Result<(Geometry, Shape, usize)> {
        let a = &self.attrs;
        let &[n, channels, h, w] = xl.dims() else {
            bail!("depthwise conv: input must be [N, C, H, W], got {:?}", xl.dims())
        };
        let &[out_channels, 1, kh, kw] = wl.dims() else {
            bail!("depthwise conv: weight must be [C·m, 1, KH, KW], got {:?}", wl.dims())
        };
        if !xl.is_contiguous() || !wl.is_contiguous() {
            bail!("depthwise conv: input and weight must be contiguous")
        }
        if channels == 0 || a.groups != channels || out_channels % channels != 0 {
            bail!(
                "depthwise conv: groups {} must equal the input's {channels} channels and divide the weight's {out_channels}",
                a.groups
            )
        }
        let (Some(oh), Some(ow)) = (
            out_len(h, kh, a.stride[0], a.padding[0], a.dilation[0]),
            out_len(w, kw, a.stride[1], a.padding[1], a.dilation[1]),
        ) else {
            bail!(
                "depthwise conv: a {kh}x{kw} kernel (stride {:?}, padding {:?}, dilation {:?}) does not fit a {h}x{w} input",
                a.stride,
                a.padding,
                a.dilation
            )
        };
        let Some(count) = [n, out_channels, oh, ow]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        else {
            bail!("depthwise conv: output [{n}, {out_channels}, {oh}, {ow}] overflows")
        };
        let geometry = Geometry {
            channels: to_u32("channels", channels)?,
            mult: to_u32("channel multiplier", out_channels / channels)?,
            h: to_u32("height", h)?,
            w: to_u32("width", w)?,
            oh: to_u32("output height", oh)?,
            ow: to_u32("output width", ow)?,
            kh: to_u32("kernel height", kh)?,
            kw: to_u32("kernel width", kw)?,
            sh: to_u32("stride", a.stride[0])?,
            sw: to_u32("stride", a.stride[1])?,
            ph: to_u32("padding", a.padding[0])?,
            pw: to_u32("padding", a.padding[1])?,
            dh: to_u32("dilation", a.dilation[0])?,
            dw: to_u32("dilation", a.dilation[1])?,
        };
        Ok((geometry, Shape::from_dims(&[n, out_channels, oh, ow]), count))
    }
}

/// The CPU twin of the CUDA kernel: the same loops, the same order of
/// fused multiply-adds per output value.
fn cpu_depthwise(x: &[f32], weight: &[f32], g: &Geometry, count: usize) -> Vec<f32> {
    let at = |v: u32| v as usize;
    let (h, w, kh, kw) = (at(g.h), at(g.w), at(g.kh), at(g.kw));
    let (oh, ow, mult, channels) = (at(g.oh), at(g.ow), at(g.mult), at(g.channels));
    let mut y = Vec::with_capacity(count);
    for plane_index in 0..count / (oh * ow) {
        let (image, oc) = (plane_index / (channels * mult), plane_index % (channels * mult));
        let plane = &x[(image * channels + oc / mult) * h * w..][..h * w];
        let taps = &weight[oc * kh * kw..][..kh * kw];
        // The input index of output `o`'s tap `k` on an axis (stride, dilation,
        // padding, length), if inside.
        let input =
            |o: usize, k: usize, [s, d, p, len]: [usize; 4]| (o * s + k * d).checked_sub(p).filter(|&i| i < len);
        let (rows, cols) = ([at(g.sh), at(g.dh), at(g.ph), h], [at(g.sw), at(g.dw), at(g.pw), w]);
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = 0.0f32;
                for ky in 0..kh {
                    let Some(iy) = input(oy, ky, rows) else { continue };
                    for kx in 0..kw {
                        let Some(ix) = input(ox, kx, cols) else { continue };
                        sum = plane[iy * w + ix].mul_add(taps[ky * kw + kx], sum);
                    }
                }
                y.push(sum);
            }
        }
    }
    y
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "wick-depthwise-conv2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (geometry, shape, count) = self.geometry(xl, wl)?;
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            bail!("depthwise conv: f32 operands only")
        };
        let x = &x[xl.start_offset()..][..xl.shape().elem_count()];
        let w = &w[wl.start_offset()..][..wl.shape().elem_count()];
        Ok((CpuStorage::F32(cpu_depthwise(x, w, &geometry, count)), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (geometry, shape, count) = self.geometry(xl, wl)?;
        Ok((cuda::launch(x, xl, w, wl, geometry, count)?, shape))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Geometry;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!("../../cuda/depthwise.ptx");

    // SAFETY: `Geometry` is `#[repr(C)]` plain `u32`s, laid out as the
    // kernel's `DepthwiseGeometry` struct (same fields, same order).
    unsafe impl DeviceRepr for Geometry {}

    pub(super) fn launch(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        geometry: Geometry,
        count: usize,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func("wick_depthwise_conv2d_f32", "wick_depthwise", PTX)?;
        let xs = x.as_cuda_slice::<f32>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<f32>()?.slice(wl.start_offset()..);
        // SAFETY: the kernel writes every one of the `count` values (one per
        // output index, grid-stride over all of them).
        let y = unsafe { dev.alloc::<f32>(count)? };
        let n = count as u64;
        // Grid-stride loop in the kernel: cap the grid, any count is covered.
        let cfg = LaunchConfig::for_num_elems(count.clamp(1, 1 << 30) as u32);
        let mut builder = func.builder();
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&y);
        builder.arg(&n);
        builder.arg(&geometry);
        // SAFETY: the arguments match the kernel's signature in
        // cuda/depthwise.cu (x, weight, y, n, geometry); `geometry` checked
        // that x holds N·C·H·W contiguous f32, weight C·m·KH·KW and y `count`
        // = N·C·m·OH·OW, and the kernel reads x only at indices inside
        // [0, H) x [0, W) of the plane it names.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn uniform(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The op equals candle's grouped conv2d (one conv per group, an
    /// independent implementation) over kernel sizes, strides, paddings,
    /// dilations, channel multipliers and per-axis attributes.
    #[test]
    fn matches_candles_grouped_conv() {
        /// `([n, c, h, w], channel multiplier, kernel, stride, padding, dilation)`.
        type Case = ([usize; 4], usize, [usize; 2], [usize; 2], [usize; 2], [usize; 2]);
        let cases: &[Case] = &[
            ([2, 3, 7, 9], 1, [3, 3], [1, 1], [1, 1], [1, 1]),
            ([1, 4, 8, 8], 1, [3, 3], [2, 2], [1, 1], [1, 1]),
            ([2, 5, 11, 6], 1, [5, 5], [2, 2], [2, 2], [1, 1]),
            ([1, 2, 9, 9], 3, [3, 3], [1, 1], [0, 0], [2, 2]),
            ([3, 6, 5, 4], 2, [1, 1], [1, 1], [0, 0], [1, 1]),
            ([1, 3, 10, 7], 1, [3, 5], [1, 2], [1, 2], [1, 1]),
            ([1, 2, 3, 3], 1, [3, 3], [1, 1], [2, 2], [1, 1]),
        ];
        for (i, &(dims, mult, kernel, stride, padding, dilation)) in cases.iter().enumerate() {
            let x = uniform(&dims, i as u64 + 1);
            let c = dims[1];
            let w = uniform(&[c * mult, 1, kernel[0], kernel[1]], i as u64 + 100);
            let attrs = Conv2dAttrs {
                stride,
                padding,
                dilation,
                groups: c,
            };
            assert!(applies(&attrs, &x, &w));
            let got = conv2d(&attrs, &x, &w).unwrap();
            // candle's conv2d takes one stride / dilation for both axes:
            // per-axis cases are checked axis by axis through padding and
            // a strided slice of the stride-1 result.
            let padded = x
                .pad_with_zeros(2, padding[0], padding[0])
                .unwrap()
                .pad_with_zeros(3, padding[1], padding[1])
                .unwrap();
            assert_eq!(
                dilation[0], dilation[1],
                "case {i}: the reference needs equal dilations"
            );
            let full = padded.conv2d(&w, 0, 1, dilation[0], c).unwrap();
            let pick = |t: Tensor, axis: usize, step: usize| {
                let len = t.dim(axis).unwrap().div_ceil(step);
                let index: Vec<u32> = (0..len).map(|k| (k * step) as u32).collect();
                t.index_select(&Tensor::new(index, &Device::Cpu).unwrap(), axis)
                    .unwrap()
            };
            let want = pick(pick(full, 2, stride[0]), 3, stride[1]);
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 1e-5, "case {i}: max difference {diff}");
        }
    }

    /// Bad operands are typed errors naming what was expected, not panics.
    #[test]
    fn rejects_bad_operands() {
        let x = uniform(&[1, 4, 5, 5], 1);
        let attrs = Conv2dAttrs {
            groups: 4,
            ..Conv2dAttrs::default()
        };
        let too_big = uniform(&[4, 1, 7, 7], 2);
        let err = conv2d(&attrs, &x, &too_big).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let wrong_groups = Conv2dAttrs { groups: 2, ..attrs };
        let err = conv2d(&wrong_groups, &x, &uniform(&[4, 1, 3, 3], 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("groups 2"), "{err}");
        let not_depthwise = uniform(&[4, 2, 3, 3], 4);
        let err = conv2d(&attrs, &x, &not_depthwise).unwrap_err().to_string();
        assert!(err.contains("weight must be"), "{err}");
        assert!(!applies(&attrs, &x, &not_depthwise));
    }
}
