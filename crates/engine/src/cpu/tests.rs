//! The conv algorithm each shape and path gets.

use super::*;
use crate::cpu::gemm::Isa;
use wick_ir::Conv2dAttrs;

fn spec(in_channels: usize, kernel: usize, stride: usize, groups: usize) -> ConvSpec {
    ConvSpec {
        in_channels,
        out_channels: in_channels,
        kernel: [kernel; 2],
        attrs: Conv2dAttrs {
            stride: [stride; 2],
            padding: [kernel / 2; 2],
            groups,
            ..Default::default()
        },
    }
}

/// The policy on ResNet-like shapes: F(4×4) with enough tiles, F(2×2)
/// for few pixels and many channels, the in-place GEMM for 1×1 stride
/// 1 (in two halves of their depth for projections at batch 1 on
/// planes of 49 to 400 pixels with at least twice as many inputs as
/// outputs; else the lane form for deep ones on planes of 2 to 64
/// pixels whose lane groups pad the outputs by at most a quarter: not
/// 100 -> 128),
/// lanes for other few-pixel convs, panels otherwise; 1×1 planes as
/// dot products for squeezes and excitations at most 64 deep; grouped
/// and pooled convs by their constraint.
#[test]
fn policy_by_shape() {
    use ConvAlgorithm::*;
    let cases = [
        (spec(64, 3, 1, 1), false, [10, 64, 56, 56], WinogradF4),
        (spec(512, 3, 1, 1), false, [1, 512, 7, 7], WinogradF2),
        (spec(512, 3, 1, 1), false, [4, 512, 7, 7], WinogradF4),
        (spec(32, 3, 1, 1), false, [1, 32, 7, 7], DirectLanes),
        (spec(256, 3, 2, 1), false, [1, 256, 14, 14], DirectLanes),
        (spec(64, 1, 1, 1), false, [10, 64, 28, 28], Pointwise),
        (spec(64, 1, 1, 1), false, [1, 64, 7, 7], Pointwise),
        (spec(512, 1, 1, 1), false, [1, 512, 7, 7], PointwiseLanes),
        (spec(384, 1, 1, 1), false, [10, 112, 8, 8], PointwiseLanes),
        (spec(960, 1, 1, 1), false, [2, 160, 7, 7], PointwiseLanes),
        (spec(960, 1, 1, 1), false, [1, 160, 7, 7], PointwiseSplit),
        (spec(2048, 1, 1, 1), false, [1, 512, 7, 7], PointwiseSplit),
        (spec(383, 1, 1, 1), false, [1, 512, 7, 7], Pointwise),
        (spec(512, 1, 1, 1), false, [1, 512, 9, 9], Pointwise),
        (spec(512, 1, 1, 1), false, [2, 100, 7, 7], Pointwise),
        (spec(512, 1, 1, 1), false, [1, 100, 7, 7], PointwiseSplit),
        (spec(512, 1, 1, 1), false, [2, 2048, 1, 1], Pointwise),
        (spec(576, 1, 1, 1), false, [1, 96, 14, 14], PointwiseSplit),
        (spec(1024, 1, 1, 1), false, [1, 256, 10, 10], PointwiseSplit),
        (spec(512, 1, 1, 1), false, [1, 256, 20, 20], PointwiseSplit),
        (spec(510, 1, 1, 1), false, [1, 256, 14, 14], Pointwise),
        (spec(576, 1, 1, 1), false, [2, 96, 14, 14], Pointwise),
        (spec(576, 1, 1, 1), false, [1, 96, 28, 28], Pointwise),
        (spec(576, 1, 1, 1), false, [1, 96, 9, 9], PointwiseSplit),
        (spec(576, 1, 1, 1), false, [1, 96, 6, 8], PointwiseLanes),
        (spec(576, 1, 1, 1), false, [1, 96, 4, 4], PointwiseLanes),
        (spec(64, 1, 1, 1), false, [4, 64, 1, 1], Gemv),
        (spec(64, 1, 1, 1), false, [4, 256, 1, 1], Gemv),
        (spec(65, 1, 1, 1), false, [4, 256, 1, 1], Pointwise),
        (spec(64, 1, 2, 1), false, [10, 64, 28, 28], DirectPanels),
        (spec(3, 7, 2, 1), true, [1, 64, 112, 112], Stem),
        (spec(8, 3, 2, 1), true, [1, 64, 112, 112], DirectPanels),
        (spec(32, 3, 1, 32), false, [1, 32, 7, 7], Depthwise),
        (spec(32, 3, 1, 8), false, [1, 32, 7, 7], Grouped),
    ];
    for (spec, pooled, shape, want) in cases {
        for isa in [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512] {
            assert_eq!(
                conv_algorithm(&spec, pooled, shape, &Machine::with_fma(isa, false)),
                want,
                "{spec:?} {shape:?}"
            );
        }
        // Wide FMAs change only the few-pixel F(2×2) convs, to lanes.
        let wide = match want {
            WinogradF2 => DirectLanes,
            other => other,
        };
        assert_eq!(
            conv_algorithm(&spec, pooled, shape, &Machine::with_fma(Isa::Avx512, true)),
            wide,
            "{spec:?} {shape:?} wide"
        );
    }
}

/// On AVX2 and AVX-512, direct convs of more than one tap at least 576
/// deep take the lane layout at every size; shallower ones, 1×1
/// stride-2 convs and the scalar path up to 256 pixels; past those,
/// panels.
#[test]
fn simd_lanes_for_deep_windows() {
    use ConvAlgorithm::*;
    let path = |isa| Machine::with_fma(isa, false);
    let s2 = |in_channels, kernel| ConvSpec {
        in_channels,
        out_channels: 128,
        kernel: [kernel; 2],
        attrs: Conv2dAttrs {
            stride: [2, 2],
            padding: [kernel / 2; 2],
            ..Default::default()
        },
    };
    let cases = [
        (64, 3, [1, 128, 28, 28], Isa::Avx2Fma, DirectLanes),
        (64, 3, [10, 128, 28, 28], Isa::Avx2Fma, DirectLanes),
        (63, 3, [1, 128, 28, 28], Isa::Avx2Fma, DirectPanels),
        (63, 3, [1, 128, 16, 16], Isa::Avx2Fma, DirectLanes),
        (3, 3, [1, 128, 112, 112], Isa::Avx2Fma, DirectPanels),
        (64, 3, [1, 128, 28, 28], Isa::Avx512, DirectLanes),
        (64, 3, [10, 128, 28, 28], Isa::Avx512, DirectLanes),
        (63, 3, [1, 128, 28, 28], Isa::Avx512, DirectPanels),
        (64, 3, [1, 128, 28, 28], Isa::Scalar, DirectPanels),
        (64, 3, [1, 128, 16, 16], Isa::Scalar, DirectLanes),
        (64, 3, [1, 128, 16, 16], Isa::Avx512, DirectLanes),
        (1024, 1, [1, 128, 28, 28], Isa::Avx2Fma, DirectPanels),
        (1024, 1, [1, 128, 28, 28], Isa::Avx512, DirectPanels),
        (1024, 1, [1, 128, 16, 16], Isa::Avx2Fma, DirectLanes),
    ];
    for (in_channels, kernel, shape, isa, want) in cases {
        let spec = s2(in_channels, kernel);
        let case = format!("{in_channels} {kernel} {shape:?} {isa:?}");
        assert_eq!(conv_algorithm(&spec, false, shape, &path(isa)), want, "{case}");
        assert_eq!(conv_algorithm_without_f4(&spec, shape, &path(isa)), want, "{case}");
    }
}
