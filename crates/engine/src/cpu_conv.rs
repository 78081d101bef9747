//! Engine-owned CPU convolution for f32 NCHW: the kernel is packed once at
//! compile time; each forward does im2col (skipped for pointwise convs) and
//! one gemm per image and group, then adds the bias and applies the optional
//! ReLU in one pass over the output while it is still in cache.
//!
//! Images run in parallel on rayon's pool when there are at least as many
//! images as threads; otherwise images run in turn and each gemm uses all
//! threads.

use crate::cpu_shared::{conv_out_size, with_cpu_f32};
use candle_core::{bail, Device, Tensor};
use rayon::prelude::*;
use wick_ir::Conv2dAttrs;

/// A convolution with its weights packed for the CPU.
#[derive(Debug, Clone)]
pub(crate) struct PackedConv {
    attrs: Conv2dAttrs,
    /// Weights `[O, K]` row-major, `K = C/g · kh · kw` (OIHW flattened).
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    out_channels: usize,
    kernel: [usize; 2],
    relu: bool,
}

fn f32_data(tensor: &Tensor) -> candle_core::Result<Vec<f32>> {
    tensor.flatten_all()?.to_vec1::<f32>()
}

/// Geometry of one call, derived from the input shape.
struct Geometry {
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    group_channels: usize,
    group_outputs: usize,
    k: usize,
}

impl PackedConv {
    /// Packs `weight` (`[O, C/g, kh, kw]`, f32) and `bias` (`[O]`).
    pub(crate) fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        attrs: Conv2dAttrs,
        relu: bool,
    ) -> candle_core::Result<Self> {
        let (out_channels, _, kh, kw) = weight.dims4()?;
        Ok(Self {
            attrs,
            weight: f32_data(weight)?,
            bias: bias.map(f32_data).transpose()?,
            out_channels,
            kernel: [kh, kw],
            relu,
        })
    }

    fn geometry(&self, dims: &[usize]) -> candle_core::Result<Geometry> {
        let &[_, channels, height, width] = dims else {
            bail!("conv input must be NCHW, got {dims:?}")
        };
        let a = &self.attrs;
        let Some([out_height, out_width]) = conv_out_size(a, self.kernel, [height, width]) else {
            bail!("kernel {:?} does not fit input {dims:?}", self.kernel)
        };
        let group_channels = channels / a.groups;
        Ok(Geometry {
            channels,
            height,
            width,
            out_height,
            out_width,
            group_channels,
            group_outputs: self.out_channels / a.groups,
            k: group_channels * self.kernel[0] * self.kernel[1],
        })
    }

    fn is_pointwise(&self) -> bool {
        let a = &self.attrs;
        self.kernel == [1, 1] && a.stride == [1, 1] && a.padding == [0, 0]
    }

    /// Runs the convolution on a CPU f32 tensor `[N, C, H, W]`, adding
    /// `residual` (the output's shape) before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let dims = x.dims().to_vec();
        let g = self.geometry(&dims)?;
        let batch = dims[0];
        let spatial = g.out_height * g.out_width;
        let image_out = self.out_channels * spatial;
        if residual
            .as_ref()
            .is_some_and(|r| r.dims() != [batch, self.out_channels, g.out_height, g.out_width])
        {
            bail!("the residual of a packed CPU conv must have the output's shape");
        }
        let mut out = vec![0f32; batch * image_out];
        with_cpu_f32("packed CPU conv", &x, residual.as_ref(), |data, residual_data| {
            let image_in = g.channels * g.height * g.width;
            let threads = rayon::current_num_threads();
            let residual_of = |i: usize| residual_data.map(|r| &r[i * image_out..(i + 1) * image_out]);
            if batch >= threads {
                out.par_chunks_mut(image_out).enumerate().for_each(|(i, out)| {
                    let input = &data[i * image_in..(i + 1) * image_in];
                    self.image(input, residual_of(i), out, &g, gemm::Parallelism::None)
                });
            } else {
                for (i, out) in out.chunks_mut(image_out).enumerate() {
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
                    );
                }
            }
            Ok(())
        })?;
        Tensor::from_vec(out, (batch, self.out_channels, g.out_height, g.out_width), &Device::Cpu)
    }

    /// One image: `input` is `[C, H, W]`, `residual` and `out` are `[O, OH, OW]`.
    fn image(
        &self,
        input: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        g: &Geometry,
        parallelism: gemm::Parallelism,
    ) {
        let spatial = g.out_height * g.out_width;
        let mut columns = if self.is_pointwise() {
            Vec::new()
        } else {
            vec![0f32; g.k * spatial]
        };
        for group in 0..self.attrs.groups {
            let group_input =
                &input[group * g.group_channels * g.height * g.width..][..g.group_channels * g.height * g.width];
            let rhs: &[f32] = if self.is_pointwise() {
                group_input
            } else {
                self.im2col(group_input, &mut columns, g);
                &columns
            };
            let lhs = &self.weight[group * g.group_outputs * g.k..][..g.group_outputs * g.k];
            let dst = &mut out[group * g.group_outputs * spatial..][..g.group_outputs * spatial];
            debug_assert_eq!(rhs.len(), g.k * spatial);
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
            let bias = self.bias.as_ref().map_or(0.0, |b| b[channel]);
            match residual {
                Some(residual) => {
                    let residual = &residual[channel * spatial..(channel + 1) * spatial];
                    for (v, r) in row.iter_mut().zip(residual) {
                        let sum = *v + bias + r;
                        *v = if self.relu { sum.max(0.0) } else { sum };
                    }
                }
                None => match (bias != 0.0, self.relu) {
                    (false, false) => {}
                    (true, false) => row.iter_mut().for_each(|v| *v += bias),
                    (_, true) => row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
                },
            }
        }
    }

    /// Writes the `[k, OH·OW]` column matrix of one group's `[C/g, H, W]` input.
    fn im2col(&self, input: &[f32], columns: &mut [f32], g: &Geometry) {
        let a = &self.attrs;
        let [kh, kw] = self.kernel;
        let (oh, ow) = (g.out_height, g.out_width);
        let mut rows = columns.chunks_mut(oh * ow);
        for channel in 0..g.group_channels {
            let plane = &input[channel * g.height * g.width..][..g.height * g.width];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = rows.next().expect("k rows");
                    let dx = (kx * a.dilation[1]) as isize - a.padding[1] as isize;
                    for oy in 0..oh {
                        let iy = (oy * a.stride[0] + ky * a.dilation[0]) as isize - a.padding[0] as isize;
                        let out_row = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= g.height as isize {
                            out_row.fill(0.0);
                            continue;
                        }
                        let line = &plane[iy as usize * g.width..][..g.width];
                        if a.stride[1] == 1 {
                            // Contiguous span: zeros where the window hangs over the edges.
                            let first = (-dx).clamp(0, ow as isize) as usize;
                            let last = (g.width as isize - dx).clamp(first as isize, ow as isize) as usize;
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
                                *value = if ix < 0 || ix >= g.width as isize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_conv::DirectConv;
    use crate::gemm_kernel::Isa;
    use proptest::prelude::*;

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, a: Conv2dAttrs, relu: bool) -> Tensor {
        // candle's conv takes one stride/dilation; equal-axis cases only.
        let x = x
            .pad_with_zeros(2, a.padding[0], a.padding[0])
            .unwrap()
            .pad_with_zeros(3, a.padding[1], a.padding[1])
            .unwrap();
        let mut y = x.conv2d(w, 0, a.stride[0], a.dilation[0], a.groups).unwrap();
        if let Some(b) = b {
            y = y
                .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                .unwrap();
        }
        if relu {
            y = y.relu().unwrap();
        }
        y
    }

    #[derive(Debug, Clone)]
    struct Case {
        batch: usize,
        channels: usize,
        groups: usize,
        per_group: usize,
        kernel: [usize; 2],
        stride: usize,
        dilation: usize,
        padding: [usize; 2],
        size: [usize; 2],
        bias: bool,
        relu: bool,
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        (
            1usize..4,
            1usize..7,
            0usize..3,
            1usize..4,
            [1usize..4, 1usize..4],
            1usize..3,
            1usize..3,
            [0usize..3, 0usize..3],
        )
            .prop_flat_map(
                |(batch, channels, group_kind, per_group, kernel, stride, dilation, padding)| {
                    let min = |axis: usize| {
                        (dilation * (kernel[axis] - 1) + 1)
                            .saturating_sub(2 * padding[axis])
                            .max(1)
                    };
                    let groups = match group_kind {
                        0 => 1,
                        1 => channels,
                        _ => (1..=channels)
                            .rev()
                            .find(|d| channels % d == 0 && *d < channels)
                            .unwrap_or(1),
                    };
                    (
                        Just((batch, channels, groups, per_group, kernel, stride, dilation, padding)),
                        [min(0)..min(0) + 6, min(1)..min(1) + 6],
                        any::<bool>(),
                        any::<bool>(),
                        any::<bool>(),
                    )
                },
            )
            .prop_map(
                |(
                    (batch, channels, groups, per_group, kernel, stride, dilation, padding),
                    size,
                    bias,
                    relu,
                    square,
                )| {
                    // Every other square case has C == H == W (candle's layout-ambiguity shape).
                    let size = if square && size[0].max(size[1]) <= channels.max(size[0]) {
                        [channels.max(size[0]); 2]
                    } else {
                        size
                    };
                    Case {
                        batch,
                        channels,
                        groups,
                        per_group,
                        kernel,
                        stride,
                        dilation,
                        padding,
                        size,
                        bias,
                        relu,
                    }
                },
            )
    }

    /// Expected output pixels that make [`DirectConv`] pick each weight
    /// layout (pixels on the vector lanes, output channels on them).
    const DIRECT_LAYOUTS: [(&str, usize); 2] = [("panels", usize::MAX), ("lanes", 0)];

    /// Every CPU algorithm that takes `case` (named), and candle's answer.
    fn run_case(case: &Case) -> (Vec<(String, Tensor)>, Tensor) {
        let d = Device::Cpu;
        let o = case.groups * case.per_group;
        let x = Tensor::randn(0f32, 1.0, (case.batch, case.channels, case.size[0], case.size[1]), &d).unwrap();
        let w = Tensor::randn(
            0f32,
            1.0,
            (o, case.channels / case.groups, case.kernel[0], case.kernel[1]),
            &d,
        )
        .unwrap();
        let b = case.bias.then(|| Tensor::randn(0f32, 1.0, o, &d).unwrap());
        let attrs = Conv2dAttrs {
            stride: [case.stride; 2],
            padding: case.padding,
            dilation: [case.dilation; 2],
            groups: case.groups,
        };
        let packed = PackedConv::new(&w, b.as_ref(), attrs, case.relu).unwrap();
        let mut got = vec![("grouped".to_string(), packed.run(&x, None).unwrap())];
        if case.groups == 1 {
            for isa in Isa::available() {
                for (layout, pixels) in DIRECT_LAYOUTS {
                    let direct = DirectConv::new(&w, b.as_ref(), attrs, case.relu, None, isa, pixels).unwrap();
                    got.push((format!("direct {layout} {isa:?}"), direct.run(&x, None).unwrap()));
                }
            }
        }
        (got, reference(&x, &w, b.as_ref(), attrs, case.relu))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// The grouped and (one group, every SIMD path) direct convs equal
        /// candle's conv (+ bias, + relu) across random
        /// shapes: groups incl. depthwise, kernel h != w, stride 2, dilation,
        /// asymmetric padding, odd sizes, C == H == W.
        #[test]
        fn matches_candle(case in arb_case()) {
            let (got, want) = run_case(&case);
            let k = (case.channels / case.groups * case.kernel[0] * case.kernel[1]) as f32;
            for (name, got) in got {
                prop_assert_eq!(got.dims(), want.dims(), "{}", name);
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * k.max(1.0) * 4.0, "{}: diff {}", name, diff);
            }
        }
    }

    /// The residual is added before the ReLU: relu(conv(x) + b + r).
    #[test]
    fn residual_then_relu() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4, 5, 5), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &d).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 6, 5, 5), &d).unwrap();
        let attrs = Conv2dAttrs {
            padding: [1, 1],
            ..Default::default()
        };
        let got = PackedConv::new(&w, Some(&b), attrs, true)
            .unwrap()
            .run(&x, Some(&r))
            .unwrap();
        let want = (reference(&x, &w, Some(&b), attrs, false) + &r)
            .unwrap()
            .relu()
            .unwrap();
        let diff = crate::test_util::max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{diff}");
        for (isa, (layout, pixels)) in Isa::available()
            .into_iter()
            .flat_map(|i| DIRECT_LAYOUTS.map(|l| (i, l)))
        {
            let direct = DirectConv::new(&w, Some(&b), attrs, true, None, isa, pixels).unwrap();
            let diff = crate::test_util::max_abs_diff(&direct.run(&x, Some(&r)).unwrap(), &want);
            assert!(diff < 1e-4, "direct {layout} {isa:?}: {diff}");
            assert!(direct.run(&x, Some(&r.narrow(0, 0, 1).unwrap())).is_err());
            assert!(direct.run(&r, None).is_err(), "wrong channel count");
            let empty = direct.run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
            assert_eq!(empty.dims(), [0, 6, 5, 5]);
        }
        assert!(PackedConv::new(&w, Some(&b), attrs, true)
            .unwrap()
            .run(&x, Some(&r.narrow(0, 0, 1).unwrap()))
            .is_err());
    }

    /// Per-axis stride and dilation, which candle's conv cannot express,
    /// against a direct loop.
    #[test]
    fn per_axis_stride_and_dilation() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 7.0 * 8.0, &d)
            .unwrap()
            .reshape((1, 2, 7, 8))
            .unwrap();
        let w = Tensor::arange(0f32, 3.0 * 2.0 * 2.0 * 3.0, &d)
            .unwrap()
            .reshape((3, 2, 2, 3))
            .unwrap();
        let attrs = Conv2dAttrs {
            stride: [2, 1],
            padding: [1, 0],
            dilation: [1, 2],
            groups: 1,
        };
        let got = PackedConv::new(&w, None, attrs, false).unwrap().run(&x, None).unwrap();
        for (layout, pixels) in DIRECT_LAYOUTS {
            let direct = DirectConv::new(&w, None, attrs, false, None, Isa::detect(), pixels)
                .unwrap()
                .run(&x, None)
                .unwrap();
            // Integer-valued sums below 2^24: exact in any order.
            assert_eq!(crate::test_util::max_abs_diff(&direct, &got), 0.0, "{layout}");
        }
        let (xv, wv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let (oh, ow) = ((7 + 2 - 2) / 2 + 1, (8 - 5) + 1);
        assert_eq!(got.dims(), [1, 3, oh, ow]);
        let gv = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for o in 0..3 {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = 0.0;
                    for c in 0..2 {
                        for ky in 0..2 {
                            for kx in 0..3 {
                                let iy = (oy * 2 + ky) as isize - 1;
                                let ix = ox + kx * 2;
                                if (0..7).contains(&iy) {
                                    sum += xv[(c * 7 + iy as usize) * 8 + ix] * wv[((o * 2 + c) * 2 + ky) * 3 + kx];
                                }
                            }
                        }
                    }
                    assert_eq!(gv[(o * oh + oy) * ow + ox], sum, "o={o} oy={oy} ox={ox}");
                }
            }
        }
    }
}
