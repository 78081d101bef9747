//! The phases against im2col on every path, the lane tiles' cut, and the
//! rules that decide where the phases are taken.

use super::{lane_tiles, Phases, LINE};
use crate::cpu::conv::direct::{DirectConv, Segment};
use crate::cpu::conv::tests::{random_case, RandomCase};
use crate::cpu::gemm::LaneTile;
use crate::cpu::gemm::{Isa, Layout, PANEL_GRANULE};
use crate::cpu::pool::max_pool2d;
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};

/// A random conv case ([`random_case`]: candle's output with the
/// residual, if any, added before the activation) and its attributes:
/// `[batch, channels, outputs, oh, ow]` with a `[kh, kw]` kernel at
/// `[stride, dilation]` on both axes and padding `[py, px]`; `None`
/// where the padding is wider than the input.
fn case(
    [batch, channels, outputs, oh, ow]: [usize; 5],
    [kh, kw]: [usize; 2],
    [stride, dilation]: [usize; 2],
    [py, px]: [usize; 2],
    residual: bool,
    activation: Option<usize>,
) -> Option<(RandomCase, Conv2dAttrs)> {
    let extent = |out: usize, k: usize, pad: usize| ((out - 1) * stride + (k - 1) * dilation + 1).checked_sub(2 * pad);
    let (height, width) = (extent(oh, kh, py)?, extent(ow, kw, px)?);
    if height == 0 || width == 0 {
        return None;
    }
    let attrs = Conv2dAttrs {
        stride: [stride; 2],
        padding: [py, px],
        dilation: [dilation; 2],
        groups: 1,
    };
    let case = random_case(
        [batch, channels, height, width],
        [outputs, channels, kh, kw],
        attrs,
        activation,
        residual,
    );
    assert_eq!(case.want.dims(), [batch, outputs, oh, ow]);
    Some((case, attrs))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Convs that read phases (wide kernels for their stride, output
    /// rows of 14 to 48, which leave a row's last tile partial or not;
    /// kernels from twice the strides' area, 3×3 stride 2 included, on
    /// the AVX2 path, from 12 times elsewhere, im2col below)
    /// equal candle's conv on every path: dilation, padding per axis,
    /// several images, small blocks (segments that start and end
    /// inside rows, blocks across images), a residual and an
    /// activation, and with ResNet's max pool fused, the conv then the
    /// engine's pool. Two threads: few blocks split their panels.
    #[test]
    fn equals_candle(
        batch in 1usize..3, channels in 1usize..4, outputs in 1usize..20,
        [kh, kw] in [3usize..8, 3usize..8], stride in 1usize..3, dilation in 1usize..3,
        [py, px] in [0usize..4, 0usize..4],
        ow in prop::sample::select(vec![14usize, 15, 16, 28, 30, 32, 48]), oh in 2usize..5,
        block_tiles in proptest::option::of(1usize..6),
        activation in proptest::option::of(0usize..6), residual in any::<bool>(), pooled in any::<bool>(),
    ) {
        prop_assume!(kh * kw >= super::MIN_COPY_RATIO_AVX2 * stride * stride);
        let sizes = [batch, channels, outputs, oh, ow];
        let Some((RandomCase { x, w, b, residual: r, activation, mut want }, attrs)) = case(sizes, [kh, kw], [stride, dilation], [py, px], residual, activation) else {
            return Err(TestCaseError::reject("padding wider than the input"));
        };
        let pool = pooled.then_some(MaxPool2dAttrs { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ceil_mode: false });
        if let Some(pool) = &pool {
            want = max_pool2d(Isa::Scalar, &want, pool).unwrap();
        }
        let threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let depth = channels * kh * kw;
        for isa in Isa::available() {
            let mut conv = DirectConv::for_test(&w, Some(&b), attrs, activation, pool, Layout::Panels, isa).unwrap();
            if let Some(tiles) = block_tiles {
                conv = conv.with_block_bytes(tiles * PANEL_GRANULE * (depth + outputs) * 4);
            }
            let shape = conv.spec.check(&x, r.as_ref()).unwrap().shape;
            // On paths with a higher ratio, im2col: equal all the same.
            let phased = kh * kw >= super::min_copy_ratio(&conv) * stride * stride;
            prop_assert_eq!(Phases::applies(&conv, &shape), phased);
            let got = threads.install(|| conv.run(&x, r.as_ref())).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// The lane layout's convs that may read phases (kernels of more
    /// than one value, column strides up to MAX_LANE_STRIDE; those with
    /// few border pixels at strides 1-2 read the input in place
    /// instead, `unpadded/`, tested there too) equal candle's
    /// conv on every path: dilation, padding per axis, partial lane
    /// groups, output rows narrower and wider than a tile (one- and
    /// two-row tiles), several images and more pixels than a block
    /// (segments that start inside rows, blocks across images), a
    /// residual and an activation. Two threads: one block splits its
    /// lane groups and fill.
    #[test]
    fn lanes_equal_candle(
        batch in 1usize..3, channels in 1usize..6, outputs in 1usize..70,
        [kh, kw] in [1usize..6, 1usize..6], stride in 1usize..=super::MAX_LANE_STRIDE, dilation in 1usize..3,
        [py, px] in [0usize..3, 0usize..3], ow in 1usize..30, oh in 1usize..12,
        activation in proptest::option::of(0usize..6), residual in any::<bool>(),
    ) {
        prop_assume!(kh * kw > 1);
        let sizes = [batch, channels, outputs, oh, ow];
        let Some((RandomCase { x, w, b, residual: r, activation, want }, attrs)) = case(sizes, [kh, kw], [stride, dilation], [py, px], residual, activation) else {
            return Err(TestCaseError::reject("padding wider than the input"));
        };
        let threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let depth = channels * kh * kw;
        for isa in Isa::available() {
            let conv = DirectConv::for_test(&w, Some(&b), attrs, activation, None, Layout::Lanes, isa).unwrap();
            let shape = conv.spec.check(&x, r.as_ref()).unwrap().shape;
            prop_assert!(Phases::applies(&conv, &shape));
            let got = threads.install(|| conv.run(&x, r.as_ref())).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}

/// Tiles: ResNet's 7-wide rows two at a time on AVX-512 (the last row
/// alone) and on AVX2 (in three tiles), 14-wide rows one tile each on
/// AVX-512, 30-wide rows in equal tiles, rows a whole number of tiles
/// wide one at a time, a segment that starts inside a row alone.
#[test]
fn lane_tiles_pair_narrow_rows() {
    let seg = |y, x0, x1, col| Segment {
        image: 0,
        y,
        x0,
        x1,
        col,
    };
    let rows = |width: usize, n: usize| (0..n).map(|y| seg(y, 0, width, y * width)).collect::<Vec<_>>();
    let shapes = |tiles: Vec<LaneTile>| tiles.iter().map(|t| (t.col, t.width, t.rows)).collect::<Vec<_>>();
    // Output row `y` 100 values after row `y - 1` from the first run's.
    // AVX-512's limits: two runs a tile.
    let lane_tiles = |runs: &[Segment], max| lane_tiles(runs, |s| (s.y - runs[0].y) * 100 + s.x0, 100, 1, (max, 2));
    assert_eq!(shapes(lane_tiles(&rows(7, 3), 14)), [(0, 7, 2), (14, 7, 1)]);
    let pair = lane_tiles(&rows(7, 2), 14)[0];
    assert_eq!((pair.start, pair.pitch, pair.col_pitch), (0, 100, 7));
    assert_eq!(shapes(lane_tiles(&rows(14, 2), 14)), [(0, 14, 1), (14, 14, 1)]);
    // AVX2's 6-pixel tiles: 7-wide rows as 2 × 3, 2 × 2, 2 × 2.
    assert_eq!(shapes(lane_tiles(&rows(7, 2), 6)), [(0, 3, 2), (3, 2, 2), (5, 2, 2)]);
    assert_eq!(
        shapes(lane_tiles(&rows(12, 2), 6)),
        [(0, 6, 1), (6, 6, 1), (12, 6, 1), (18, 6, 1)]
    );
    assert_eq!(
        shapes(lane_tiles(&rows(30, 1), 14)),
        [(0, 10, 1), (10, 10, 1), (20, 10, 1)]
    );
    // AVX2's: up to six runs of a pixel; a 7 × 7 plane in columns of
    // six rows and the last row in two; 14-wide rows in threes.
    let avx2 = |runs: &[Segment]| shapes(super::lane_tiles(runs, |s| s.y * 100 + s.x0, 100, 1, (6, 6)));
    let mut want: Vec<_> = (0..7).map(|x| (x, 1, 6)).collect();
    want.extend([(42, 4, 1), (46, 3, 1)]);
    assert_eq!(avx2(&rows(7, 7)), want);
    assert_eq!(avx2(&rows(14, 3)), (0..7).map(|x| (2 * x, 2, 3)).collect::<Vec<_>>());
    let column = super::lane_tiles(&rows(7, 6), |s| s.y * 100 + s.x0, 100, 1, (6, 6))[3];
    assert_eq!(
        (column.start, column.pitch, column.col, column.col_pitch),
        (3, 100, 3, 7)
    );
    // Rows of another width or image, or not the next row, end a group.
    let broken = [seg(0, 0, 7, 0), seg(1, 0, 7, 7), seg(3, 0, 7, 14)];
    assert_eq!(avx2(&broken), [(0, 3, 2), (3, 2, 2), (5, 2, 2), (14, 4, 1), (18, 3, 1)]);
    let tiles = lane_tiles(&[seg(3, 2, 7, 0), seg(4, 0, 7, 5)], 14);
    assert_eq!(shapes(tiles.clone()), [(0, 5, 1), (5, 7, 1)]);
    assert_eq!((tiles[0].start, tiles[1].start), (2, 100));
}

/// ResNet's 3×3 stride-2 convs (onto 28- and 14-wide rows) read phases
/// in the panel layout on the AVX2 path only; MobileNetV3's 3 -> 16
/// stem on AVX2 and on AVX-512 without wide FMAs; the 7×7 stride-2
/// stem on every path; a 1×1 stride-2 downsample and 7-wide rows on
/// none.
#[test]
fn three_by_three_stride_two_reads_phases_where_copies_cost() {
    let applies = |isa: Isa, [k, channels, outputs, width, out_width]: [usize; 5]| {
        let w = Tensor::zeros((outputs, channels, k, k), candle_core::DType::F32, &Device::Cpu).unwrap();
        let attrs = Conv2dAttrs {
            stride: [2, 2],
            padding: [k / 2; 2],
            ..Default::default()
        };
        let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, isa).unwrap();
        let shape = crate::cpu::conv::ConvShape {
            batch: 1,
            channels,
            height: width,
            width,
            out_channels: outputs,
            out_height: out_width,
            out_width,
        };
        (Phases::applies(&conv, &shape), conv.machine.wide_fma)
    };
    // [kernel, channels, outputs, input width, output width].
    let (conv_28, conv_14) = ([3, 64, 128, 56, 28], [3, 128, 256, 28, 14]);
    let (small_stem, stem) = ([3, 3, 16, 224, 112], [7, 3, 64, 224, 112]);
    let (downsample, conv_7) = ([1, 64, 128, 56, 28], [3, 256, 512, 14, 7]);
    // Packing runs on the path: only the paths this CPU has.
    for isa in Isa::available() {
        let avx2 = isa == Isa::Avx2Fma;
        let (small, wide) = applies(isa, small_stem);
        assert_eq!(
            small,
            avx2 || (isa == Isa::Avx512 && !wide),
            "{isa:?}, wide FMAs {wide}"
        );
        assert_eq!(
            (applies(isa, conv_28).0, applies(isa, conv_14).0),
            (avx2, avx2),
            "{isa:?}"
        );
        assert!(applies(isa, stem).0, "{isa:?}");
        assert!(!applies(isa, downsample).0 && !applies(isa, conv_7).0, "{isa:?}");
    }
}

/// Strides and widths near the integer range only make the phases not
/// apply (no overflow, in debug builds too).
#[test]
fn huge_attributes_say_no() {
    let w = Tensor::zeros((4, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (stride, out_width) in [
        (usize::MAX / 2, 16),
        (1 << 40, 112),
        (1, usize::MAX - 3),
        (2, usize::MAX / 8 + 1),
    ] {
        let attrs = Conv2dAttrs {
            stride: [stride; 2],
            ..Default::default()
        };
        let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, Isa::Scalar).unwrap();
        let shape = crate::cpu::conv::ConvShape {
            batch: 1,
            channels: 3,
            height: 224,
            width: 224,
            out_channels: 4,
            out_height: 1,
            out_width,
        };
        assert!(!Phases::applies(&conv, &shape), "stride {stride}, width {out_width}");
    }
}

/// Every padded input row's phases take an odd number of cache lines,
/// less than two of them padding, so that the phases of six
/// consecutive output rows (a stride of padded rows apart) start in
/// six different L1 sets (64 of them, a line each), whatever the
/// channel count: ResNet50's layer4.0.conv2 (512 channels, 14×14,
/// stride 2) made rows of exactly 32 KiB before (2 phases of 8 values).
#[test]
fn rows_take_an_odd_number_of_lines() {
    for channels in [1, 3, 64, 128, 256, 512, 1024] {
        for (in_width, stride) in [(14, 2), (28, 2), (7, 1), (56, 2)] {
            let w = Tensor::zeros((8, channels, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
            let attrs = Conv2dAttrs {
                stride: [stride, stride],
                padding: [1, 1],
                ..Default::default()
            };
            let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Lanes, Isa::Scalar).unwrap();
            let x = Tensor::zeros((1, channels, in_width, in_width), candle_core::DType::F32, &Device::Cpu).unwrap();
            let shape = conv.spec.check(&x, None).unwrap().shape;
            let phases = Phases::new(&conv, &shape).unwrap();
            let lines = phases.row / LINE;
            assert_eq!(phases.used, channels * stride * phases.width, "{channels} {in_width}");
            assert!(
                phases.row % LINE == 0 && lines % 2 == 1,
                "{channels} {in_width}: {lines} lines"
            );
            assert!(phases.used <= phases.row && phases.row < phases.used + 2 * LINE);
            let sets: std::collections::HashSet<usize> = (0..6).map(|j| j * phases.pitch(&conv) / LINE % 64).collect();
            assert_eq!(sets.len(), 6, "{channels} {in_width} stride {stride}");
        }
    }
}

/// The rows and columns the phases hold: ResNet's stem (3 channels,
/// 224 wide, 7×7 stride 2, padding 3, 112 out) reads 2 phases of 115
/// values per channel (the 112 outputs and a reach of 3), 7 padded
/// rows for one output row and 2 more per further row; 690 values a
/// row, padded to 45 cache lines.
#[test]
fn stem_layout() {
    let w = Tensor::zeros((64, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
    let attrs = Conv2dAttrs {
        stride: [2, 2],
        padding: [3, 3],
        ..Default::default()
    };
    let conv = DirectConv::for_test(&w, None, attrs, None, None, Layout::Panels, Isa::Scalar).unwrap();
    let x = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
    let shape = conv.spec.check(&x, None).unwrap().shape;
    let phases = Phases::new(&conv, &shape).unwrap();
    assert_eq!((phases.width, phases.used, phases.row), (115, 3 * 2 * 115, 45 * 16));
    assert_eq!(phases.input_rows(&conv, 1), Some(7));
    assert_eq!(phases.input_rows(&conv, 4), Some(13));
    // (c, ky, kx) = (1, 2, 5): 2 rows down, channel 1's phase 1, 2 on.
    assert_eq!(phases.table[(7 + 2) * 7 + 5], 2 * 720 + (2 + 1) * 115 + 2);
}
