//! The grouped and direct convs against candle's conv across random shapes.

use super::direct::DirectConv;
use super::grouped::GroupedConv;
use super::*;
use crate::cpu::gemm::Isa;
use crate::cpu::gemm::Layout;
use proptest::prelude::*;
use wick_ir::Activation;
use wick_tests::conv_case::{arb_conv_case, ConvCase};

/// The grouped conv of `w` with `attrs` (tests).
fn grouped(w: &Tensor, b: Option<&Tensor>, attrs: Conv2dAttrs, activation: Option<Activation>) -> GroupedConv {
    let spec = ConvSpec::of(w, attrs).unwrap();
    GroupedConv::new(spec, w, Epilogue::new(b, spec.out_channels, activation).unwrap()).unwrap()
}

fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, a: Conv2dAttrs, activation: Option<Activation>) -> Tensor {
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
    if let Some(activation) = activation {
        y = activation.apply(&y).unwrap();
    }
    y
}

/// [`reference`] with `residual`, if any, added before the activation (the
/// fused epilogue's order).
pub(super) fn reference_with_residual(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: Conv2dAttrs,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
) -> Tensor {
    let mut y = reference(x, w, b, a, None);
    if let Some(r) = residual {
        y = (y + r).unwrap();
    }
    match activation {
        Some(activation) => activation.apply(&y).unwrap(),
        None => y,
    }
}

/// Random operands of a conv with a bias, an optional residual and an
/// optional activation, and candle's answer ([`random_case`]).
pub(super) struct RandomCase {
    pub(super) x: Tensor,
    pub(super) w: Tensor,
    pub(super) b: Tensor,
    pub(super) residual: Option<Tensor>,
    pub(super) activation: Option<Activation>,
    pub(super) want: Tensor,
}

/// A [`RandomCase`] of these shapes; `activation` indexes [`Activation::ALL`].
pub(super) fn random_case(
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    attrs: Conv2dAttrs,
    activation: Option<usize>,
    residual: bool,
) -> RandomCase {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, x_dims.as_slice(), &d).unwrap();
    let w = Tensor::randn(0f32, 1.0, w_dims.as_slice(), &d).unwrap();
    let b = Tensor::randn(0f32, 1.0, w_dims[0], &d).unwrap();
    let activation = activation.map(|i| Activation::ALL[i]);
    let dims = reference(&x, &w, None, attrs, None).dims().to_vec();
    let residual = residual.then(|| Tensor::randn(0f32, 1.0, dims, &d).unwrap());
    let want = reference_with_residual(&x, &w, Some(&b), attrs, residual.as_ref(), activation);
    RandomCase {
        x,
        w,
        b,
        residual,
        activation,
        want,
    }
}

impl RandomCase {
    /// candle's answer on the input multiplied by `scale` (`[N, C, 1, 1]`:
    /// a squeeze-and-excitation scale the conv folds in), or
    /// [`Self::want`] without one.
    pub(super) fn want_scaled(&self, attrs: Conv2dAttrs, scale: Option<&Tensor>) -> Tensor {
        match scale {
            Some(s) => {
                let x = self.x.broadcast_mul(s).unwrap();
                reference_with_residual(
                    &x,
                    &self.w,
                    Some(&self.b),
                    attrs,
                    self.residual.as_ref(),
                    self.activation,
                )
            }
            None => self.want.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    conv: ConvCase,
    bias: bool,
    activation: Option<Activation>,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (arb_conv_case(), any::<bool>(), proptest::option::of(0usize..6)).prop_map(|(conv, bias, activation)| Case {
        conv,
        bias,
        activation: activation.map(|i| Activation::ALL[i]),
    })
}

/// Both weight layouts of [`DirectConv`] (pixels on the vector lanes, output channels on them).
const DIRECT_LAYOUTS: [Layout; 2] = [Layout::Panels, Layout::Lanes];

/// Every CPU algorithm that takes `case` (named), and candle's answer.
fn run_case(case: &Case) -> (Vec<(String, Tensor)>, Tensor) {
    let (d, conv) = (Device::Cpu, &case.conv);
    let x = Tensor::randn(0f32, 1.0, conv.input_dims().as_slice(), &d).unwrap();
    let w = Tensor::randn(0f32, 1.0, conv.weight_dims().as_slice(), &d).unwrap();
    let b = case
        .bias
        .then(|| Tensor::randn(0f32, 1.0, conv.out_channels, &d).unwrap());
    let attrs = conv.attrs();
    let packed = grouped(&w, b.as_ref(), attrs, case.activation);
    let mut got = vec![("grouped".to_string(), packed.run(&x, None).unwrap())];
    let spec = ConvSpec::of(&w, attrs).unwrap();
    if depthwise::DepthwiseConv::applies(&spec) {
        for isa in Isa::available() {
            let epilogue = Epilogue::new(b.as_ref(), spec.out_channels, case.activation)
                .unwrap()
                .on(isa);
            let conv = depthwise::DepthwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
            got.push((format!("depthwise {isa:?}"), conv.run(&x, None).unwrap()));
        }
    }
    if conv.groups == 1 {
        for isa in Isa::available() {
            for layout in DIRECT_LAYOUTS {
                let direct = DirectConv::for_test(&w, b.as_ref(), attrs, case.activation, None, layout, isa).unwrap();
                got.push((format!("direct {layout:?} {isa:?}"), direct.run(&x, None).unwrap()));
            }
        }
    }
    (got, reference(&x, &w, b.as_ref(), attrs, case.activation))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// The grouped and (one group, every SIMD path) direct convs equal
    /// candle's conv (+ bias, + relu) across random shapes
    /// ([`arb_conv_case`]: groups incl. depthwise, kernel h != w, stride,
    /// dilation, asymmetric padding, odd sizes, C == H == W).
    #[test]
    fn matches_candle(case in arb_case()) {
        let (got, want) = run_case(&case);
        let k = case.conv.fan_in() as f64;
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
    let got = grouped(&w, Some(&b), attrs, Some(Activation::Relu))
        .run(&x, Some(&r))
        .unwrap();
    let want = (reference(&x, &w, Some(&b), attrs, None) + &r).unwrap().relu().unwrap();
    let diff = crate::test_util::max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");
    for (isa, layout) in Isa::available()
        .into_iter()
        .flat_map(|i| DIRECT_LAYOUTS.map(|l| (i, l)))
    {
        let direct = DirectConv::for_test(&w, Some(&b), attrs, Some(Activation::Relu), None, layout, isa).unwrap();
        let diff = crate::test_util::max_abs_diff(&direct.run(&x, Some(&r)).unwrap(), &want);
        assert!(diff < 1e-4, "direct {layout:?} {isa:?}: {diff}");
        assert!(direct.run(&x, Some(&r.narrow(0, 0, 1).unwrap())).is_err());
        assert!(direct.run(&r, None).is_err(), "wrong channel count");
        let empty = direct.run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
        assert_eq!(empty.dims(), [0, 6, 5, 5]);
    }
    assert!(grouped(&w, Some(&b), attrs, Some(Activation::Relu))
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
    let got = grouped(&w, None, attrs, None).run(&x, None).unwrap();
    for layout in DIRECT_LAYOUTS {
        let direct = DirectConv::for_test(&w, None, attrs, None, None, layout, Isa::detect())
            .unwrap()
            .run(&x, None)
            .unwrap();
        // Integer-valued sums below 2^24: exact in any order.
        assert_eq!(crate::test_util::max_abs_diff(&direct, &got), 0.0, "{layout:?}");
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// The depthwise conv on planes wider than its segments (1..=16 output
    /// columns at a time, a row's last segment reading past the row; the
    /// SIMD paths' segments on outputs over 112 wide) and
    /// on narrow ones with many channels (the SIMD paths' channel blocks,
    /// a partial last block, bands of one row and more), every path, with or without a residual
    /// (added before the activation), equals candle's conv: the shapes
    /// [`arb_conv_case`] draws stay narrower than one segment, with few channels.
    #[test]
    fn depthwise_wide_planes(
        channels in 2usize..40,
        kernel in 1usize..6,
        stride in 1usize..4,
        dilation in 1usize..3,
        padding in 0usize..3,
        width in 1usize..140,
        height in 1usize..6,
        activation in proptest::option::of(0usize..6),
        residual in any::<bool>(),
        band_bytes in proptest::option::of(0usize..20_000),
    ) {
        let span = dilation * (kernel - 1) + 1;
        let (width, height) = ((span + width).saturating_sub(2 * padding).max(1), (span + height).saturating_sub(2 * padding).max(1));
        let attrs = Conv2dAttrs { stride: [stride, stride], padding: [padding, padding], dilation: [dilation, dilation], groups: channels };
        let RandomCase { x, w, b, residual: r, activation, want } =
            random_case([2, channels, height, width], [channels, 1, kernel, kernel], attrs, activation, residual);
        let spec = ConvSpec::of(&w, attrs).unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(Some(&b), channels, activation).unwrap().on(isa);
            let mut conv = depthwise::DepthwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
            if let Some(bytes) = band_bytes {
                conv = conv.with_band_bytes(bytes);
            }
            let got = conv.run(&x, r.as_ref()).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * (kernel * kernel) as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }

    /// The direct conv's panel layout with blocks of a few tiles (small
    /// block budgets): on planes of a block or more, blocks within one
    /// image store whole panels and tiles in place (several blocks per
    /// plane, a partial last tile, a partial last panel of 1..7 output
    /// channels), on smaller planes blocks across images; every path, with
    /// or without a residual (added before the activation), equals
    /// candle's conv. [`arb_conv_case`]'s planes are smaller than a block.
    #[test]
    fn direct_blocks_in_place(
        batch in 1usize..4,
        channels in 1usize..5,
        out_channels in 1usize..20,
        kernel in 1usize..4,
        stride in 1usize..3,
        padding in 0usize..2,
        [height, width] in [3usize..20, 3usize..40],
        block_tiles in 1usize..5,
        activation in proptest::option::of(0usize..6),
        residual in any::<bool>(),
    ) {
        let (height, width) = (height.max(kernel), width.max(kernel));
        let attrs = Conv2dAttrs { stride: [stride, stride], padding: [padding, padding], ..Conv2dAttrs::default() };
        let RandomCase { x, w, b, residual: r, activation, want } = random_case(
            [batch, channels, height, width], [out_channels, channels, kernel, kernel], attrs, activation, residual,
        );
        let depth = channels * kernel * kernel;
        // Columns plus products per block column, as `block_cols` counts them.
        let per_col = (depth + out_channels.next_multiple_of(crate::cpu::gemm::PANEL_ROWS)) * 4;
        for isa in Isa::available() {
            let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Panels, isa)
                .unwrap()
                .with_block_bytes(block_tiles * crate::cpu::gemm::PANEL_GRANULE * per_col);
            let got = conv.run(&x, r.as_ref()).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}

/// A conv deeper than the AVX2 product's depth chunks (576 = 64·3·3)
/// with a block budget of one tile: its blocks take the least size a
/// chunked product is given (several per image, partial tiles, a residual
/// and an activation); every path equals candle's conv.
#[test]
fn deep_direct_conv_in_least_blocks() {
    let attrs = Conv2dAttrs {
        padding: [1, 1],
        ..Conv2dAttrs::default()
    };
    let RandomCase {
        x,
        w,
        b,
        residual,
        activation,
        want,
    } = random_case([2, 64, 13, 13], [20, 64, 3, 3], attrs, Some(0), true);
    let per_col = (576 + 24) * 4;
    for isa in Isa::available() {
        let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Panels, isa)
            .unwrap()
            .with_block_bytes(crate::cpu::gemm::PANEL_GRANULE * per_col);
        let got = conv.run(&x, residual.as_ref()).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = crate::test_util::max_abs_diff(&got, &want);
        assert!(diff <= 1e-5 * 576.0 * 4.0, "{isa:?}: diff {diff}");
    }
}

/// A lane-layout conv deep enough to split its product by depth (2088 =
/// 232·3·3, 17 chunks of the packed weights), on two threads with one
/// block (batch 1, 5×5 outputs): parts of the depth whose sums are added,
/// and on a single thread the product whole; a partial lane group, a
/// residual and an activation; every path equals candle's conv.
#[test]
fn lane_products_split_by_depth() {
    let attrs = Conv2dAttrs {
        stride: [2, 2],
        padding: [1, 1],
        ..Conv2dAttrs::default()
    };
    let RandomCase {
        x,
        w,
        b,
        residual,
        activation,
        want,
    } = random_case([1, 232, 9, 9], [40, 232, 3, 3], attrs, Some(0), true);
    for threads in [2, 1] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for isa in Isa::available() {
            let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Lanes, isa).unwrap();
            let got = pool.install(|| conv.run(&x, residual.as_ref())).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(diff <= 1e-5 * 2088.0 * 4.0, "{isa:?} on {threads} threads: diff {diff}");
        }
    }
}

/// Planes smaller than a block that fill their granules take a block
/// each, stored in place ([`super::direct`]'s `whole_plane_block`): a 1×1
/// stride-2 conv onto 14×14 (196 pixels, as ResNet's layer3 downsample)
/// and a 3×3 conv onto 12×12 (144), several images, a residual and an
/// activation, on every path, equal candle's conv; a 7×7 plane (49
/// pixels, under a block's least) shares blocks across images as before.
#[test]
fn whole_plane_blocks_in_place() {
    for (input, kernel, stride, padding) in [(28, 1, 2, 0), (12, 3, 1, 1), (7, 3, 1, 1)] {
        let attrs = Conv2dAttrs {
            stride: [stride; 2],
            padding: [padding; 2],
            ..Conv2dAttrs::default()
        };
        let RandomCase {
            x,
            w,
            b,
            residual,
            activation,
            want,
        } = random_case([3, 6, input, input], [13, 6, kernel, kernel], attrs, Some(3), true);
        for isa in Isa::available() {
            let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Panels, isa).unwrap();
            let got = conv.run(&x, residual.as_ref()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(diff <= 1e-5 * 54.0 * 4.0, "{input} {isa:?}: diff {diff}");
        }
    }
}

/// Bands of one output row that lie wholly in the padding (a 1×1 kernel
/// over a 1×1 input padded by 2: rows of zeros plus the bias) and bands
/// that straddle it, on every path: the blocked depthwise conv's bands
/// find their input rows (once a band's first row was taken for an input row).
#[test]
fn depthwise_bands_in_the_padding() {
    let d = Device::Cpu;
    for (kernel, stride, padding) in [(1, 1, 2), (1, 3, 2), (3, 2, 1), (3, 1, 2)] {
        let channels = 20;
        let attrs = Conv2dAttrs {
            stride: [stride, stride],
            padding: [padding, padding],
            dilation: [1, 1],
            groups: channels,
        };
        let x = Tensor::randn(0f32, 1.0, (2, channels, 3, 3), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (channels, 1, kernel, kernel), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, channels, &d).unwrap();
        let want = reference(&x, &w, Some(&b), attrs, Some(Activation::Silu));
        let spec = ConvSpec::of(&w, attrs).unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(Some(&b), channels, Some(Activation::Silu))
                .unwrap()
                .on(isa);
            let conv = depthwise::DepthwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa))
                .unwrap()
                .with_band_bytes(0);
            let got = conv.run(&x, None).unwrap();
            let diff = crate::test_util::max_abs_diff(&got, &want);
            assert!(
                diff <= 1e-5 * 40.0,
                "{isa:?} k{kernel} s{stride} p{padding}: diff {diff}"
            );
        }
    }
}

/// A conv with no input channels (a weight `[O, 0, kh, kw]`, as a hostile
/// file may hold) computes the bias through the activation on every
/// one-group algorithm and path, and fused in front of a depthwise conv,
/// rather than panicking while packing.
#[test]
fn no_input_channels_give_the_bias() {
    let d = Device::Cpu;
    let b = Tensor::new(&[0.5f32, -1.0, 2.0], &d).unwrap();
    for kernel in [1, 3] {
        let w = Tensor::zeros((3, 0, kernel, kernel), candle_core::DType::F32, &d).unwrap();
        let attrs = Conv2dAttrs {
            padding: [kernel / 2; 2],
            ..Default::default()
        };
        let x = Tensor::zeros((2, 0, 4, 5), candle_core::DType::F32, &d).unwrap();
        let want = [0.5f32, 0.0, 2.0];
        let spec = ConvSpec::of(&w, attrs).unwrap();
        let mut algorithms = vec![ConvAlgorithm::DirectPanels, ConvAlgorithm::DirectLanes];
        if kernel == 1 {
            algorithms.extend([
                ConvAlgorithm::Pointwise,
                ConvAlgorithm::PointwiseLanes,
                ConvAlgorithm::Gemv,
            ]);
        }
        for isa in Isa::available() {
            for &algorithm in &algorithms {
                let machine = crate::machine::Machine::with_isa(isa);
                let conv = CpuConv::new(algorithm, &w, Some(&b), attrs, Some(Activation::Relu), None, machine).unwrap();
                let got = conv.run(&x, None).unwrap();
                assert_eq!(got.dims(), [2, 3, 4, 5], "{algorithm:?} {isa:?}");
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (i, v) in got.iter().enumerate() {
                    assert_eq!(*v, want[i / 20 % 3], "{algorithm:?} {isa:?} {spec:?} at {i}");
                }
            }
            // The same 1×1 conv fused in front of a depthwise conv that
            // passes its input through (1×1 taps of 1, no bias).
            let machine = crate::machine::Machine::with_isa(isa);
            let ones = Tensor::ones((3, 1, 1, 1), candle_core::DType::F32, &d).unwrap();
            let through = Conv2dAttrs {
                groups: 3,
                ..Default::default()
            };
            let dw_spec = ConvSpec::of(&ones, through).unwrap();
            let identity = Epilogue::new(None, 3, None).unwrap().on(isa);
            let dw = depthwise::DepthwiseConv::new(dw_spec, &ones, identity, machine).unwrap();
            if let (1, Some(lanes)) = (kernel, dw.lanes()) {
                let epilogue = Epilogue::new(Some(&b), 3, Some(Activation::Relu)).unwrap();
                let expand = depthwise::ExpandWeights::new(&[], [3, 0], &epilogue, lanes, None).unwrap();
                let got = dw.run_expanded(&expand, &x).unwrap();
                assert_eq!(got.dims(), [2, 3, 4, 5], "expanded {isa:?}");
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (i, v) in got.iter().enumerate() {
                    assert_eq!(*v, want[i / 20 % 3], "expanded {isa:?} at {i}");
                }
            }
        }
    }
}

/// The convs other than the 1×1 one run on the input scaled first: the same
/// values as scaling it outside (as the unfused `mul` does), bit for bit.
#[test]
fn other_convs_scale_their_input_first() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 8, 6, 7), &d).unwrap();
    let s = Tensor::randn(0f32, 1.0, (2, 8, 1, 1), &d).unwrap();
    let w = Tensor::randn(0f32, 1.0, (8, 8, 3, 3), &d).unwrap();
    let b = Tensor::randn(0f32, 1.0, 8, &d).unwrap();
    let attrs = Conv2dAttrs {
        padding: [1, 1],
        ..Default::default()
    };
    for isa in Isa::available() {
        let machine = crate::machine::Machine::with_isa(isa);
        let scaled = crate::cpu::plane::channel_scale(isa, &x, &s).unwrap();
        for algorithm in [
            ConvAlgorithm::WinogradF4,
            ConvAlgorithm::WinogradF2,
            ConvAlgorithm::DirectPanels,
            ConvAlgorithm::DirectLanes,
        ] {
            let conv = CpuConv::new(algorithm, &w, Some(&b), attrs, None, None, machine).unwrap();
            let want = conv.run(&scaled, None).unwrap();
            let got = conv.run_scaled(isa, &x, None, Some(&s)).unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{algorithm:?} {isa:?}"
            );
        }
    }
}

/// The fused 1×1 + channel-blocked depthwise conv gives the same values
/// on any number of threads (its bands and blocks per task, cut per
/// thread count so that each thread takes as many tasks, each compute
/// their rows whole): MobileNetV2's first expand + stride-2 depthwise
/// shape, scaled down, at batch 1, with 96 channels (two blocks a task)
/// and 72 (a partial last block: one block a task on two threads), at
/// stride 2 and 1 (the tasks block by block, and band by band).
#[test]
fn expanded_depthwise_equal_on_every_thread_count() {
    let d = Device::Cpu;
    // Stride 2: 28-wide outputs, cut block by block; stride 1: 56-wide
    // ones, whose 14- and 28-row bands end on cache lines, band by band.
    for (channels, stride) in [(96, 2), (72, 2), (96, 1), (72, 1)] {
        let in_channels = 8;
        let attrs = Conv2dAttrs {
            stride: [stride, stride],
            padding: [1, 1],
            dilation: [1, 1],
            groups: channels,
        };
        let x = Tensor::randn(0f32, 1.0, (1, in_channels, 56, 56), &d).unwrap();
        let w1: Vec<f32> = Tensor::randn(0f32, 1.0, (channels, in_channels), &d)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (channels, 1, 3, 3), &d).unwrap();
        let spec = ConvSpec::of(&w2, attrs).unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(None, channels, Some(Activation::Relu6)).unwrap().on(isa);
            let conv = depthwise::DepthwiseConv::new(spec, &w2, epilogue, Machine::with_isa(isa)).unwrap();
            let Some(lanes) = conv.lanes() else { continue };
            let expand_epilogue = Epilogue::new(None, channels, Some(Activation::Relu6)).unwrap();
            let expand =
                depthwise::ExpandWeights::new(&w1, [channels, in_channels], &expand_epilogue, lanes, None).unwrap();
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let out = pool.install(|| conv.run_expanded(&expand, &x)).unwrap();
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let one = on(1);
            for threads in [2, 3, 7] {
                assert!(
                    on(threads) == one,
                    "{channels} channels, stride {stride}, {isa:?} on {threads} threads"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// A 1×1 conv fused in front of the channel-blocked depthwise conv
    /// (each band's input computed from the 1×1 conv's input), or a conv
    /// of a small window (`window`: kernel, stride, padding, dilation; its
    /// input rows copied per band), equals candle's two convs one after the
    /// other, each with its bias and activation, on every path with the
    /// blocked form: rows of 1..=16+ positions (the 14-, 7- and 1-wide
    /// steps), partial last blocks, bands of one row and more, rows wholly
    /// in the padding, windows reaching past every edge, one or two blocks
    /// per task.
    #[test]
    fn expanded_depthwise_matches_candle(
        window in proptest::option::of((1usize..5, 1usize..3, 0usize..3, 1usize..3)),
        in_channels in 1usize..24,
        channels in 2usize..40,
        kernel in 1usize..6,
        stride in 1usize..3,
        padding in 0usize..3,
        width in 1usize..40,
        height in 1usize..6,
        activations in (proptest::option::of(0usize..6), proptest::option::of(0usize..6)),
        band_bytes in proptest::option::of(0usize..20_000),
        blocks_per_task in proptest::option::of(1usize..3),
    ) {
        let d = Device::Cpu;
        let (width, height) = ((kernel + width).saturating_sub(2 * padding).max(1), (kernel + height).saturating_sub(2 * padding).max(1));
        // The fused conv's kernel and attributes; its input large enough
        // that its output is the depthwise conv's input `[height, width]`.
        let (k1, expand_attrs) = match window {
            None => (1, Conv2dAttrs::default()),
            Some((k, s, p, dl)) => (k, Conv2dAttrs { stride: [s, s], padding: [p, p], dilation: [dl, dl], groups: 1 }),
        };
        let in_channels = in_channels.min(depthwise::MAX_WINDOW_DEPTH / (k1 * k1));
        let reach = (k1 - 1) * expand_attrs.dilation[0] + 1;
        let input = |out: usize| ((out - 1) * expand_attrs.stride[0] + reach).saturating_sub(2 * expand_attrs.padding[0]).max(1);
        let (in_height, in_width) = (input(height), input(width));
        let out_of = |n: usize| (n + 2 * expand_attrs.padding[0]).checked_sub(reach).map(|r| r / expand_attrs.stride[0] + 1);
        prop_assume!(out_of(in_height).is_some() && out_of(in_width).is_some());
        let attrs = Conv2dAttrs { stride: [stride, stride], padding: [padding, padding], dilation: [1, 1], groups: channels };
        let x = Tensor::randn(0f32, 1.0, (2, in_channels, in_height, in_width), &d).unwrap();
        let w1 = Tensor::randn(0f32, 1.0, (channels, in_channels, k1, k1), &d).unwrap();
        let b1 = Tensor::randn(0f32, 1.0, channels, &d).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (channels, 1, kernel, kernel), &d).unwrap();
        let b2 = Tensor::randn(0f32, 1.0, channels, &d).unwrap();
        let [a1, a2] = [activations.0, activations.1].map(|a| a.map(|i| Activation::ALL[i]));
        let expanded = reference(&x, &w1, Some(&b1), expand_attrs, a1);
        let want = reference(&expanded, &w2, Some(&b2), attrs, a2);
        let spec = ConvSpec::of(&w2, attrs).unwrap();
        let w1_values = w1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(Some(&b2), channels, a2).unwrap().on(isa);
            let mut conv = depthwise::DepthwiseConv::new(spec, &w2, epilogue, Machine::with_isa(isa)).unwrap();
            if let Some(bytes) = band_bytes {
                conv = conv.with_band_bytes(bytes);
            }
            if let Some(n) = blocks_per_task {
                conv = conv.with_blocks_per_task(n);
            }
            let Some(lanes) = conv.lanes() else { continue };
            let expand_epilogue = Epilogue::new(Some(&b1), channels, a1).unwrap();
            let window = window.map(|_| depthwise::Window {
                channels: in_channels,
                size: [in_height, in_width],
                kernel: [k1, k1],
                attrs: expand_attrs,
            });
            let depth = in_channels * k1 * k1;
            let expand = depthwise::ExpandWeights::new(&w1_values, [channels, depth], &expand_epilogue, lanes, window).unwrap();
            let got = conv.run_expanded(&expand, &x).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            let scale = (depth * kernel * kernel) as f64;
            prop_assert!(diff <= 1e-5 * scale * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}

/// ResNet's max pool: 3×3, stride 2, padding 1 (the pooled convs' tests).
pub(crate) fn resnet_pool() -> wick_ir::MaxPool2dAttrs {
    wick_ir::MaxPool2dAttrs {
        ceil_mode: false,
        kernel: [3, 3],
        stride: [2, 2],
        padding: [1, 1],
    }
}

/// ResNet's stem conv (3 → 64, 7×7, stride 2, padding 3): seeded-random
/// weights (σ 0.1), biases and its attributes (the stem tests').
pub(crate) fn resnet_stem_conv() -> (candle_core::Tensor, candle_core::Tensor, wick_ir::Conv2dAttrs) {
    let d = candle_core::Device::Cpu;
    let w = candle_core::Tensor::randn(0f32, 0.1, (64, 3, 7, 7), &d).unwrap();
    let b = candle_core::Tensor::randn(0f32, 1.0, 64, &d).unwrap();
    let attrs = wick_ir::Conv2dAttrs {
        stride: [2, 2],
        padding: [3, 3],
        ..Default::default()
    };
    (w, b, attrs)
}
