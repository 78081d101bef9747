//! The direct conv's blocks (in place, least sizes, whole planes) and its
//! lane products split by depth, against candle's conv.

use super::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

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
