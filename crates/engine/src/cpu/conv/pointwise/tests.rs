//! The 1×1 conv against a reference conv: packed blocks, shared packing,
//! input scales, refused shapes.

use super::*;
use crate::cpu::conv::tests::{random_case, reference_with_residual, RandomCase};
use crate::cpu::conv::ConvSpec;
use crate::cpu::gemm::PANEL_TILES;
use candle_core::Device;
use proptest::prelude::*;
use wick_ir::{Activation, Conv2dAttrs};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every path equals candle's conv + bias + residual + activation:
    /// channel counts off the panel size (a partial last panel), planes
    /// off the micro-tile width (scratch columns), blocks of a few
    /// micro-tiles (several column blocks per task), batches of 1..3,
    /// batches of 6..18 1×1 planes (the images as columns), and
    /// outputs streamed past the caches (columns before the first
    /// aligned one through scratch). With an input scale, the same on
    /// the scaled input (the weights scaled per task and image; the
    /// input itself on 1×1 planes).
    #[test]
    fn matches_candle(
        batch in 1usize..4,
        channels in 1usize..20,
        out_channels in 1usize..30,
        [height, width] in [1usize..12, 1usize..40],
        block_tiles in 1usize..4,
        residual in any::<bool>(),
        activation in proptest::option::of(0usize..6),
        one_by_one in any::<bool>(),
        stream in any::<bool>(),
        scaled in any::<bool>(),
    ) {
        // 1×1 planes at batch > 1 take the images-as-columns path;
        // streamed outputs need planes of whole tiles.
        let [batch, height, width] = match (one_by_one, stream) {
            (true, _) => [batch * 6, 1, 1],
            (false, true) => [batch, height, width.next_multiple_of(PANEL_GRANULE)],
            (false, false) => [batch, height, width],
        };
        let attrs = Conv2dAttrs::default();
        let dims = [batch, channels, height, width];
        let case = random_case(dims, [out_channels, channels, 1, 1], attrs, activation, residual);
        let RandomCase { x, w, b, residual: r, activation, .. } = &case;
        let (r, activation) = (r.as_ref(), *activation);
        let scale = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &Device::Cpu).unwrap();
        let scale = scaled.then_some(&scale);
        let want = case.want_scaled(attrs, scale);
        let spec = ConvSpec::of(w, attrs).unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(Some(b), out_channels, activation).unwrap().on(isa);
            let mut conv = PointwiseConv::new(spec, w, epilogue, Machine::with_isa(isa)).unwrap();
            conv.block_bytes = block_tiles * PANEL_GRANULE * (channels + out_channels.next_multiple_of(PANEL_ROWS)) * 4;
            conv.stream_bytes = if stream { 0 } else { usize::MAX };
            let got = conv.run_scaled(x, r, scale).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * channels as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}

/// The blocks packed in tiles before the product ([`packs`]) give
/// candle's values on every path: many channels on an aligned plane,
/// four panels or more on misaligned planes (14×14 and 7×7, as
/// ResNet50's), several column blocks per task, split by channels and
/// by columns, streamed or not, with a residual, an activation and an
/// input scale (multiplied into the tiles' copy and into the columns
/// outside them); each image's input packed once for the runs of its
/// channels ([`PointwiseConv::shares_packing`]: batches of 2-3 in two
/// runs, batch 1 in four), scaled or not. On two threads, as the shapes
/// are chosen for: each task keeps enough rows to pack.
#[test]
fn packed_blocks_match_candle() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        let d = Device::Cpu;
        // (batch, in, out, height, width, stream, rows a task): split by
        // channels in two runs (batches of 2-3), by columns (batch 1).
        for (batch, channels, outs, h, w, stream, task_rows) in [
            (2, 130, 264, 4, 16, false, 128),
            (1, 129, 128, 16, 32, true, 128),
            (3, 24, 104, 14, 14, false, 48),
            (3, 40, 75, 7, 7, false, 40),
            (1, 8, 37, 13, 15, false, 40),
            (1, 100, 128, 10, 10, false, 32),
        ] {
            assert!(packs(task_rows, channels, h * w), "{task_rows} x {channels} on {h}x{w}");
            let x = Tensor::randn(0f32, 1.0, (batch, channels, h, w), &d).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (outs, channels, 1, 1), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, outs, &d).unwrap();
            let r = Tensor::randn(0f32, 1.0, (batch, outs, h, w), &d).unwrap();
            let s = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &d).unwrap();
            let scaled = x.broadcast_mul(&s).unwrap();
            let attrs = Conv2dAttrs::default();
            let spec = ConvSpec::of(&wt, attrs).unwrap();
            let relu = Some(Activation::Relu);
            for (scale, residual) in [(None, None), (Some(&s), Some(&r))] {
                let input = if scale.is_some() { &scaled } else { &x };
                let want = reference_with_residual(input, &wt, Some(&b), attrs, residual, relu);
                for isa in Isa::available() {
                    let epilogue = Epilogue::new(Some(&b), outs, relu).unwrap().on(isa);
                    let mut conv = PointwiseConv::new(spec, &wt, epilogue, Machine::with_isa(isa)).unwrap();
                    // Two tiles of columns per block.
                    conv.block_bytes = 2 * PANEL_TILES * (channels + outs.next_multiple_of(PANEL_ROWS)) * 4;
                    conv.stream_bytes = if stream { 0 } else { usize::MAX };
                    let got = conv.run_scaled(&x, residual, scale).unwrap();
                    let diff = crate::test_util::max_abs_diff(&got, &want);
                    assert!(
                        diff <= 1e-5 * channels as f64 * 4.0,
                        "{isa:?} {:?} -> {outs}: {diff}",
                        x.dims()
                    );
                }
            }
        }
    });
}

/// The input is packed once per image where several runs of channels
/// would each pack it, and by each task otherwise: one run, streamed
/// stores, planes under a tile, runs too short to pack.
#[test]
fn shares_packing_only_where_runs_would_each_pack() {
    let d = Device::Cpu;
    let w = Tensor::zeros((256, 1024, 1, 1), candle_core::DType::F32, &d).unwrap();
    let b = Tensor::zeros(256, candle_core::DType::F32, &d).unwrap();
    let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
    let isa = Isa::detect();
    let epilogue = Epilogue::new(Some(&b), 256, None).unwrap().on(isa);
    let conv = PointwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
    // ResNet50's 1024 -> 256 on 14×14 at batch 1: four runs of 64.
    assert!(conv.shares_packing(4, 64, 196, false));
    assert!(!conv.shares_packing(1, 256, 196, false));
    assert!(!conv.shares_packing(4, 64, 196, true));
    assert!(!conv.shares_packing(4, 64, 8, false));
    assert!(!conv.shares_packing(4, 8, 196, false));
}

/// Each way of taking an input scale, on every path: tasks with more
/// rows than pixels scale the input (the same values as running on the
/// scaled input, bit for bit), the others their weights (within f32
/// rounding of it, and not bit for bit: the weights were scaled),
/// split by channels or by columns.
#[test]
fn input_scale_on_either_operand() {
    let d = Device::Cpu;
    // (batch, in, out, height, width): 24 rows > 6 pixels; 40 rows on
    // 64-pixel planes split by channels; 8 rows on 20×20 split by columns.
    for (batch, channels, outs, h, wd) in [(1, 5, 24, 2, 3), (3, 5, 24, 2, 3), (1, 9, 40, 8, 8), (2, 7, 8, 20, 20)] {
        let x = Tensor::randn(0f32, 1.0, (batch, channels, h, wd), &d).unwrap();
        let s = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (outs, channels, 1, 1), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, outs, &d).unwrap();
        let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
        let scaled = x.broadcast_mul(&s).unwrap();
        for isa in Isa::available() {
            let epilogue = Epilogue::new(Some(&b), outs, None).unwrap().on(isa);
            let conv = PointwiseConv::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
            let want = conv.run(&scaled, None).unwrap();
            let got = conv.run_scaled(&x, None, Some(&s)).unwrap();
            let case = format!("{isa:?} {:?}", x.dims());
            if outs > h * wd {
                let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(values(&got), values(&want), "{case}");
            } else {
                let diff = crate::test_util::max_abs_diff(&got, &want);
                assert!(diff > 0.0 && diff <= 1e-5 * channels as f64 * 4.0, "{case}: {diff}");
            }
        }
    }
}

/// Other kernels, strides, paddings and groups are refused, and the
/// operands are checked: wrong channels, a residual of another shape.
#[test]
fn refuses_what_it_does_not_compute() {
    let d = Device::Cpu;
    let machine = Machine::with_isa(Isa::Scalar);
    let epilogue = || Epilogue::new(None, 4, None).unwrap();
    let w = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &d).unwrap();
    for attrs in [
        Conv2dAttrs {
            stride: [2, 1],
            ..Default::default()
        },
        Conv2dAttrs {
            padding: [0, 1],
            ..Default::default()
        },
    ] {
        let spec = ConvSpec::of(&w, attrs).unwrap();
        assert!(PointwiseConv::new(spec, &w, epilogue(), machine).is_err(), "{attrs:?}");
    }
    let w3 = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &d).unwrap();
    let spec = ConvSpec::of(&w3, Conv2dAttrs::default()).unwrap();
    assert!(PointwiseConv::new(spec, &w3, epilogue(), machine).is_err());
    let conv = PointwiseConv::new(
        ConvSpec::of(&w, Conv2dAttrs::default()).unwrap(),
        &w,
        epilogue(),
        machine,
    )
    .unwrap();
    let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &d).unwrap();
    assert!(conv.run(&x, None).is_err(), "3 channels for 2");
    let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &d).unwrap();
    let r = Tensor::zeros((1, 4, 4, 3), candle_core::DType::F32, &d).unwrap();
    assert!(conv.run(&x, Some(&r)).is_err(), "residual of another shape");
    let empty = conv.run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
    assert_eq!(empty.dims(), [0, 4, 4, 4]);
    for dims in [&[1, 3, 1, 1][..], &[2, 2, 1, 1], &[1, 2, 2, 1], &[2, 1]] {
        let s = Tensor::ones(dims, candle_core::DType::F32, &d).unwrap();
        assert!(conv.run_scaled(&x, None, Some(&s)).is_err(), "scale {dims:?}");
    }
}
