//! Where the input is read in place (the rule, the inside ranges, the
//! column tiles), and the conv against candle's on every path.

use super::{column_tiles, inside, Unpadded};
use crate::cpu::conv::direct::DirectConv;
use crate::cpu::conv::tests::{random_case, RandomCase};
use crate::cpu::gemm::{Isa, Layout};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use wick_ir::Conv2dAttrs;

fn attrs(stride: usize, padding: usize, dilation: usize) -> Conv2dAttrs {
    Conv2dAttrs {
        stride: [stride; 2],
        padding: [padding; 2],
        dilation: [dilation; 2],
        groups: 1,
    }
}

/// The outputs whose windows lie inside the input, worked by hand.
#[test]
fn inside_ranges() {
    // 3×3 stride 2 pad 1 on 28: output 0 reads row -1, 13 reads 25..=27.
    assert_eq!(inside(28, 14, 3, 2, 1, 1), Some(1..14));
    // 1×1 stride 2 on 28: all 14.
    assert_eq!(inside(28, 14, 1, 2, 0, 1), Some(0..14));
    // 3×3 stride 1 pad 1 on 7: the first and last read padding.
    assert_eq!(inside(7, 7, 3, 1, 1, 1), Some(1..6));
    // Dilation 2, pad 2, stride 1 on 10: outputs 2..8.
    assert_eq!(inside(10, 10, 3, 1, 2, 2), Some(2..8));
    // Padding past the kernel's reach: no output inside.
    assert_eq!(inside(2, 6, 3, 1, 3, 1), Some(3..3));
    // A kernel of no values has no reach to compute.
    assert_eq!(inside(4, 4, 0, 1, 0, 1), None);
    assert_eq!(inside(usize::MAX, 4, 3, 1, 1, 1), None);
}

/// Which convs read in place: ResNet's stride-2 convs at batch 1 (3×3
/// onto 14×14 and 7×7, 1×1 downsamples), not its 3×3 stride-1 convs on
/// 7×7 (24 of 49 pixels on the border), not column strides past
/// MAX_STEP, not the panel layout.
#[test]
fn applies_to_strided_lane_convs() {
    let case = |c: usize, k: usize, a: Conv2dAttrs, hw: usize, layout: Layout| {
        let w = Tensor::zeros((32, c, k, k), DType::F32, &Device::Cpu).unwrap();
        let conv = DirectConv::for_test(&w, None, a, None, None, layout, Isa::Scalar).unwrap();
        let x = Tensor::zeros((1, c, hw, hw), DType::F32, &Device::Cpu).unwrap();
        let shape = conv.spec.check(&x, None).unwrap().shape;
        Unpadded::applies(&conv, &shape)
    };
    assert!(case(8, 3, attrs(2, 1, 1), 28, Layout::Lanes));
    assert!(case(8, 3, attrs(2, 1, 1), 14, Layout::Lanes));
    assert!(case(8, 1, attrs(2, 0, 1), 14, Layout::Lanes));
    assert!(!case(8, 3, attrs(1, 1, 1), 7, Layout::Lanes));
    assert!(!case(8, 3, attrs(3, 1, 1), 28, Layout::Lanes));
    assert!(!case(8, 3, attrs(2, 1, 1), 28, Layout::Panels));
}

/// Border tiles: runs of evenly spaced block columns, cut in equal
/// tiles; a 3×3 stride-2 conv onto 7×7's border (the top row, then the
/// left column: the first of which continues the row's run) in two
/// tiles on AVX-512's 14, three on AVX2's 6.
#[test]
fn column_tiles_follow_even_runs() {
    let border: Vec<usize> = (0..7).chain((1..7).map(|y| 7 * y)).collect();
    let shapes = |tiles: Vec<crate::cpu::gemm::LaneTile>| {
        tiles
            .iter()
            .map(|t| (t.start, t.col, t.col_step, t.width))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(column_tiles(&border, 14)), [(0, 0, 1, 8), (8, 14, 7, 5)]);
    assert_eq!(
        shapes(column_tiles(&border, 6)),
        [(0, 0, 1, 4), (4, 4, 1, 4), (8, 14, 7, 5)]
    );
    assert_eq!(shapes(column_tiles(&[5], 6)), [(0, 5, 1, 1)]);
    assert!(column_tiles(&[], 6).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Lane convs that read their input in place equal candle's conv on
    /// every path: kernels of 1 to 4 values a side, strides 1 and 2,
    /// dilation, padding (the border through its im2col columns),
    /// partial lane groups, several images and more pixels than a block
    /// (blocks across images), a residual and an activation; on two
    /// threads (one block: lane groups and border rows shared) and one.
    #[test]
    fn equals_candle(
        batch in 1usize..4, channels in 1usize..5, outputs in 1usize..70,
        k in 1usize..5, stride in 1usize..3, dilation in 1usize..3, padding in 0usize..3,
        oh in 3usize..16, ow in 3usize..16,
        activation in proptest::option::of(0usize..6), residual in any::<bool>(),
        threads in 1usize..3,
    ) {
        let extent = |out: usize| ((out - 1) * stride + (k - 1) * dilation + 1).checked_sub(2 * padding);
        let (Some(height), Some(width)) = (extent(oh), extent(ow)) else {
            return Err(TestCaseError::reject("padding wider than the input"));
        };
        prop_assume!(height > 0 && width > 0);
        let a = attrs(stride, padding, dilation);
        let RandomCase { x, w, b, residual: r, activation, want } =
            random_case([batch, channels, height, width], [outputs, channels, k, k], a, activation, residual);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let depth = channels * k * k;
        for isa in Isa::available() {
            let conv = DirectConv::for_test(&w, Some(&b), a, activation, None, Layout::Lanes, isa).unwrap();
            let shape = conv.spec.check(&x, r.as_ref()).unwrap().shape;
            prop_assume!(Unpadded::applies(&conv, &shape));
            let got = pool.install(|| conv.run(&x, r.as_ref())).unwrap();
            prop_assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * depth as f64 * 4.0, "{:?}: diff {}", isa, diff);
        }
    }
}
