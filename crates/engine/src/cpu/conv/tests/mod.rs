//! The grouped and direct convs against candle's conv across random shapes.

use super::direct::DirectConv;
use super::grouped::GroupedConv;
use super::*;
use crate::cpu::gemm::Isa;
use crate::cpu::gemm::Layout;
use proptest::prelude::*;
use wick_ir::Activation;
use wick_tests::conv_case::{arb_conv_case, ConvCase};

mod depthwise_cases;
mod direct_cases;

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
