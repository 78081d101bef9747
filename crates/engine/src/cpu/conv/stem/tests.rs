//! The stem conv with its fused pool against the direct conv then the
//! pool, on every path, non-finite inputs included, and what it refuses.

use super::StemConv;
use crate::cpu::conv::direct::DirectConv;
use crate::cpu::conv::tests::{resnet_pool, resnet_stem_conv};
use crate::cpu::conv::ConvSpec;
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{Isa, Layout};
use crate::cpu::pool::max_pool2d;
use crate::machine::Machine;
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use wick_ir::{Activation, Conv2dAttrs, MaxPool2dAttrs};

/// The stem conv on `isa`'s path.
fn stem(
    w: &Tensor,
    b: &Tensor,
    attrs: Conv2dAttrs,
    activation: Option<Activation>,
    pool: MaxPool2dAttrs,
    isa: Isa,
) -> candle_core::Result<StemConv> {
    let spec = ConvSpec::of(w, attrs)?;
    let epilogue = Epilogue::new(Some(b), spec.out_channels, activation)?.on(isa);
    StemConv::new(spec, w, epilogue, pool, Machine::with_isa(isa))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// The stem conv equals the direct conv followed by the engine's
    /// max pool (the same sums in the same order; within a few ulps
    /// of the activation, whose vector and scalar forms differ by
    /// that), on every path and on one thread and two: 1 to 4 input
    /// channels, output channels across partial blocks of the AVX-512
    /// (64) and AVX2 (16) tiles, kernels of 1 to 7 a side, row strides
    /// 1 to 3 and column strides 1 to 2, conv and pool padding, pool
    /// windows 1 to 3 with strides 1 to 2, any activation (after the
    /// max only where monotonic), a residual (before the max), several
    /// images and tasks.
    #[test]
    fn equals_conv_then_pool(
        batch in 1usize..3, channels in 1usize..=4, outputs in 1usize..80, kernel in [1usize..8, 1usize..8],
        stride in [1usize..4, 1usize..3], conv_pad in [0usize..4, 0usize..4], extra in [0usize..14, 0usize..14],
        pool_kernel in 1usize..4, pool_stride in 1usize..3, pool_pad in any::<bool>(),
        activation in proptest::option::of(0usize..6), with_residual in any::<bool>(),
    ) {
        let d = Device::Cpu;
        let size = [0, 1].map(|i| kernel[i] + stride[i] * pool_kernel + extra[i]);
        let attrs = Conv2dAttrs { stride, padding: [conv_pad[0].min(kernel[0] - 1), conv_pad[1].min(kernel[1] - 1)], ..Default::default() };
        let pool = MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [pool_kernel; 2],
            stride: [pool_stride; 2],
            padding: [usize::from(pool_pad) * pool_kernel / 2; 2],
        };
        let x = Tensor::randn(0f32, 1.0, (batch, channels, size[0], size[1]), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (outputs, channels, kernel[0], kernel[1]), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, outputs, &d).unwrap();
        let activation = activation.map(|i| Activation::ALL[i]);
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in Isa::available() {
            let plain = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Panels, isa).unwrap();
            let conv_shape = plain.run(&x, None).unwrap().dims().to_vec();
            let r = with_residual.then(|| Tensor::randn(0f32, 1.0, conv_shape.as_slice(), &d).unwrap());
            let want = max_pool2d(Isa::Scalar, &plain.run(&x, r.as_ref()).unwrap(), &pool).unwrap();
            let conv = stem(&w, &b, attrs, activation, pool, isa).unwrap();
            for got in [conv.run(&x, r.as_ref()).unwrap(), two.install(|| conv.run(&x, r.as_ref())).unwrap()] {
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= crate::test_util::ulps_of(&want, 8), "{:?}: {}", isa, diff);
            }
        }
    }
}

/// ResNet's stem at 224 × 224 on every path, two images on two
/// threads (several tasks an image, the rows they share computed by
/// both): as the direct conv then the pool.
#[test]
fn resnet_stem() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &d).unwrap();
    let (w, b, attrs) = resnet_stem_conv();
    let pool = resnet_pool();
    let relu = Some(Activation::Relu);
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for isa in Isa::available() {
        let plain = DirectConv::for_test(&w, Some(&b), attrs, relu, None, Layout::Panels, isa).unwrap();
        let want = max_pool2d(Isa::Scalar, &plain.run(&x, None).unwrap(), &pool).unwrap();
        let conv = stem(&w, &b, attrs, relu, pool, isa).unwrap();
        let got = two.install(|| conv.run(&x, None)).unwrap();
        assert_eq!(got.dims(), [2, 64, 56, 56]);
        let diff = crate::test_util::max_abs_diff(&got, &want);
        assert!(diff <= crate::test_util::ulps_of(&want, 8), "{isa:?}: {diff}");
    }
}

/// NaN and infinite inputs (ResNet's stem, every path, two threads):
/// the rows they reach take the exact max, so the output's NaNs and
/// infinities lie where the direct conv then the pool put them (a max
/// that drops a NaN, as the plain `maxps` does when it comes first,
/// fails this), and the finite values agree as for finite inputs.
#[test]
fn non_finite_inputs_pool_as_the_direct_conv() {
    let d = Device::Cpu;
    let mut x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &d)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Image 0: NaNs and infinities of both signs in its middle rows;
    // image 1 stays finite.
    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
        .into_iter()
        .enumerate()
    {
        x[(i % 3) * 64 * 64 + (20 + 9 * i) * 64 + 7 + 13 * i] = v;
    }
    let x = Tensor::from_vec(x, (2, 3, 64, 64), &d).unwrap();
    let (w, b, attrs) = resnet_stem_conv();
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for isa in Isa::available() {
        // No activation: ReLU's max with zero may itself drop a NaN.
        let plain = DirectConv::for_test(&w, Some(&b), attrs, None, None, Layout::Panels, isa).unwrap();
        let want = max_pool2d(Isa::Scalar, &plain.run(&x, None).unwrap(), &resnet_pool()).unwrap();
        let conv = stem(&w, &b, attrs, None, resnet_pool(), isa).unwrap();
        let got = two.install(|| conv.run(&x, None)).unwrap();
        let [got, want] = [got, want].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let nans = want.iter().filter(|v| v.is_nan()).count();
        let infs = want.iter().filter(|v| v.is_infinite()).count();
        let got_nans = got.iter().filter(|v| v.is_nan()).count();
        assert!(
            nans > 0 && infs > 0,
            "{isa:?}: {nans} NaN, {infs} infinite; got {got_nans} NaN"
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let same = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 1e-5 * w.abs().max(1.0);
            assert!(same, "{isa:?}: output {i}: {g} against {w}");
        }
    }
}

/// The bound under which the plain max is taken: none for non-finite
/// weights; `f32::MAX` for zero weights (an infinite input is still
/// out of bounds); else a conv of the depth at the bound sums to at
/// most half `f32::MAX`.
#[test]
fn plain_bound_keeps_the_sums_finite() {
    assert_eq!(super::plain_bound(&[1.0, f32::NAN], 2), None);
    assert_eq!(super::plain_bound(&[1.0, f32::NEG_INFINITY], 2), None);
    assert_eq!(super::plain_bound(&[0.0; 9], 9), Some(f32::MAX));
    let weights = [0.5, -3.0, 2.0];
    let bound = super::plain_bound(&weights, 147).unwrap();
    let sum = 147.0 * 3.0 * f64::from(bound);
    assert!(sum <= f64::from(f32::MAX) / 2.0 && sum >= f64::from(f32::MAX) / 2.0 * 0.999);
}

/// Convs outside its shapes and bad pools are refused with an error;
/// an input of other channels or a pool window larger than the conv's
/// output too.
#[test]
fn refuses_what_it_does_not_run() {
    let d = Device::Cpu;
    let pool = MaxPool2dAttrs {
        ceil_mode: false,
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 0],
    };
    let b = Tensor::zeros(4, candle_core::DType::F32, &d).unwrap();
    let w = |c| Tensor::zeros((4, c, 3, 3), candle_core::DType::F32, &d).unwrap();
    let isa = Isa::Scalar;
    let plain = Conv2dAttrs::default();
    assert!(stem(&w(5), &b, plain, None, pool, isa).is_err(), "5 input channels");
    let dilated = Conv2dAttrs {
        dilation: [2, 2],
        ..plain
    };
    assert!(stem(&w(3), &b, dilated, None, pool, isa).is_err(), "dilation");
    let wide = Conv2dAttrs {
        stride: [1, 3],
        ..plain
    };
    assert!(stem(&w(3), &b, wide, None, pool, isa).is_err(), "column stride 3");
    let padded = MaxPool2dAttrs {
        padding: [2, 2],
        ..pool
    };
    assert!(
        stem(&w(3), &b, plain, None, padded, isa).is_err(),
        "pool padding past half"
    );
    let ceil = MaxPool2dAttrs {
        ceil_mode: true,
        ..pool
    };
    assert!(stem(&w(3), &b, plain, None, ceil, isa).is_err(), "ceil mode");
    let conv = stem(&w(3), &b, plain, None, pool, isa).unwrap();
    let x = Tensor::zeros((1, 2, 8, 8), candle_core::DType::F32, &d).unwrap();
    assert!(conv.run(&x, None).is_err(), "2 channels for 3");
    let big = MaxPool2dAttrs { kernel: [9, 9], ..pool };
    let conv = stem(&w(3), &b, plain, None, big, isa).unwrap();
    let x = Tensor::zeros((1, 3, 6, 6), candle_core::DType::F32, &d).unwrap();
    assert!(conv.run(&x, None).is_err(), "a 9x9 window on a 4x4 conv output");
}
