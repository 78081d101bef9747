//! Winograd (F(4×4) and F(2×2)) against candle's direct convolution in
//! f64 on every SIMD path.

use super::*;
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use crate::machine::Machine;
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use wick_ir::{Activation, Conv2dAttrs};

/// Both Winograd convs of `weight` (`[O, C, 3, 3]`) with `padding` on path `isa`.
fn winograd(
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: [usize; 2],
    activation: Option<Activation>,
    isa: Isa,
) -> candle_core::Result<(WinogradF4, WinogradF2)> {
    let attrs = Conv2dAttrs {
        padding,
        ..Default::default()
    };
    let spec = ConvSpec::of(weight, attrs)?;
    let epilogue = Epilogue::new(bias, spec.out_channels, activation)?.on(isa);
    Ok((
        WinogradF4::new(spec, weight, epilogue.clone(), Machine::with_isa(isa))?,
        WinogradF2::new(spec, weight, epilogue, Machine::with_isa(isa))?,
    ))
}

/// Allowed `|got − want| / (ε · (Σ|w|·max|x| + |b| + |r|))` against an f64
/// reference, f32 ε = 2⁻²³. F(4×4, 3×3)'s transforms mix a whole 6×6 patch
/// into each output and amplify rounding (coefficients up to 8 and 1/24);
/// the worst ratio seen over ten 128-case runs was 26.
const ERROR_FACTOR: f64 = 200.0;

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    channels: usize,
    outputs: usize,
    size: [usize; 2],
    padding: [usize; 2],
    bias: bool,
    activation: Option<Activation>,
    residual: bool,
    seed: u64,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        1usize..4,
        1usize..20,
        1usize..20,
        [1usize..14, 1usize..14],
        [0usize..3, 0usize..3],
        any::<(bool, bool, bool)>(),
        proptest::option::of(0usize..6),
        any::<u64>(),
    )
        .prop_filter("the 3x3 window must fit", |(_, _, _, size, padding, _, _, _)| {
            size[0] + 2 * padding[0] >= 3 && size[1] + 2 * padding[1] >= 3
        })
        .prop_map(
            |(batch, channels, outputs, size, padding, (bias, residual, square), activation, seed)| {
                // Every other case with C == H == W (the layout-ambiguity shape)
                // where the window fits.
                let size = if square && channels >= 3 { [channels; 2] } else { size };
                Case {
                    batch,
                    channels,
                    outputs,
                    size,
                    padding,
                    bias,
                    activation: activation.map(|i| Activation::ALL[i]),
                    residual,
                    seed,
                }
            },
        )
}

fn conv(x: &Tensor, w: &Tensor, padding: [usize; 2]) -> Tensor {
    x.pad_with_zeros(2, padding[0], padding[0])
        .unwrap()
        .pad_with_zeros(3, padding[1], padding[1])
        .unwrap()
        .conv2d(w, 0, 1, 1, 1)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Runs `case` through both Winograd convs on every available path and
/// returns the worst error ratio against candle's direct convolution.
fn worst_ratio(case: &Case) -> f64 {
    let d = Device::Cpu;
    let mut state = case.seed;
    let mut tensor = |dims: &[usize]| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, dims, &d).unwrap()
    };
    let [h, w] = case.size;
    let x = tensor(&[case.batch, case.channels, h, w]);
    let weight = tensor(&[case.outputs, case.channels, 3, 3]);
    let bias = case.bias.then(|| tensor(&[case.outputs]));
    let direct = conv(&x, &weight, case.padding);
    let residual = case.residual.then(|| tensor(direct.dims()));
    // The reference in f64 (exact to ~1e-16 relative): the measured error is Winograd's alone.
    let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    let mut want = conv(&f64_of(&x), &f64_of(&weight), case.padding);
    // Winograd mixes a whole 6×6 input patch into every output of its tile,
    // so its rounding error scales with Σ|w| · max|x| (not the output's own
    // window, as a direct conv's does), plus |b| + |r|.
    let x_max = f64_of(&x).abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let w_sums = f64_of(&weight)
        .abs()
        .unwrap()
        .sum_keepdim((1, 2, 3))
        .unwrap()
        .reshape((1, case.outputs, 1, 1))
        .unwrap();
    let mut magnitude = want
        .zeros_like()
        .unwrap()
        .broadcast_add(&(w_sums * x_max).unwrap())
        .unwrap();
    if let Some(b) = &bias {
        let b = f64_of(b).reshape((1, case.outputs, 1, 1)).unwrap();
        want = want.broadcast_add(&b).unwrap();
        magnitude = magnitude.broadcast_add(&b.abs().unwrap()).unwrap();
    }
    if let Some(r) = &residual {
        want = (want + f64_of(r)).unwrap();
        magnitude = (magnitude + f64_of(r).abs().unwrap()).unwrap();
    }
    if let Some(activation) = case.activation {
        want = activation.apply(&want).unwrap();
    }
    let f64s = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (want, magnitude) = (f64s(&want), f64s(&magnitude));
    let mut worst = 0f64;
    for isa in Isa::available() {
        let (f4, f2) = winograd(&weight, bias.as_ref(), case.padding, case.activation, isa).unwrap();
        let outputs = [
            ("F(4x4)", f4.run(&x, residual.as_ref()).unwrap()),
            ("F(2x2)", f2.run(&x, residual.as_ref()).unwrap()),
        ];
        for (algo, got) in outputs {
            assert_eq!(got.dims(), direct.dims(), "{algo} {isa:?}");
            for ((g, w), m) in values(&got).iter().zip(&want).zip(&magnitude) {
                let ratio = (f64::from(*g) - w).abs() / (f64::from(f32::EPSILON) * m + 1e-30);
                assert!(ratio.is_finite(), "{algo} {isa:?}: got {g}, want {w}");
                worst = worst.max(ratio);
            }
        }
    }
    worst
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Equals candle's direct convolution in f64 (+ bias, + residual, +
    /// ReLU) on every SIMD path within `ERROR_FACTOR · ε · (Σ|w|·max|x| +
    /// |b| + |r|)`, across batch, channel counts that are not whole GEMM
    /// panels, sizes smaller than a tile, odd sizes, C == H == W, and
    /// padding 0..=2 per axis.
    #[test]
    fn matches_candle(case in arb_case()) {
        let worst = worst_ratio(&case);
        if std::env::var_os("WICK_PRINT_ERROR").is_some() {
            println!("winograd error ratio {worst:.2}");
        }
        prop_assert!(worst <= ERROR_FACTOR, "error ratio {worst}");
    }
}

/// Several blocks over the batch (blocks run in parallel) and a
/// ResNet-sized layer (blocks split across threads) give the same answer;
/// so does F(2×2) on ResNet's batch-1 layer4 shape (several lane groups),
/// and one block of more tiles than the cache bounds where the weights
/// outweigh the tiles' `V` and `M` (256 channels: F(4×4) on 24×24, 36
/// tiles; F(2×2) on 20×20, 100 tiles).
#[test]
fn multi_block_and_split_paths() {
    for (batch, channels, size) in [(6, 16, 23), (1, 64, 9), (1, 80, 7), (1, 256, 24), (1, 256, 20)] {
        let case = Case {
            batch,
            channels,
            outputs: channels + 3,
            size: [size, size],
            padding: [1, 1],
            bias: true,
            activation: Some(Activation::Relu),
            residual: true,
            seed: 7,
        };
        let worst = worst_ratio(&case);
        assert!(worst <= ERROR_FACTOR, "{case:?}: {worst}");
    }
}

/// One block a thread (ResNet's layer2 at batch 1: 49 tiles on two
/// threads) gives the sums the same conv gives in one block with each
/// phase split across the threads (the same products per tile, in the
/// same order), and candle's conv; not where the threads' L2s would not
/// hold the weights (256 channels: each thread would stream 9.4 MB), nor
/// on one thread, nor with fewer than 16 tiles a thread.
#[test]
fn whole_blocks_per_thread_match_split_phases() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 96, 28, 28), &d).unwrap();
    let w = Tensor::randn(0f32, 0.1, (100, 96, 3, 3), &d).unwrap();
    let want = conv(&x, &w, [1, 1]);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for isa in Isa::available() {
        let (f4, _) = winograd(&w, None, [1, 1], None, isa).unwrap();
        let whole = f4.with_block_bytes(2 << 20);
        assert_eq!(whole.schedule(49, 2), (25, true), "{isa:?}");
        assert!(whole.schedule(49, 1).1 && !whole.schedule(30, 2).1, "{isa:?}");
        let got = pool.install(|| whole.run(&x, None)).unwrap();
        // 25 tiles a thread (720 KB of V and M) past a 256 KiB budget.
        let split = whole.with_block_bytes(256 << 10);
        assert!(!split.schedule(49, 2).1, "{isa:?}");
        let got_split = pool.install(|| split.run(&x, None)).unwrap();
        assert_eq!(values(&got), values(&got_split), "{isa:?}");
        let diff = crate::test_util::max_abs_diff(&got, &want);
        assert!(diff <= 1e-2, "{isa:?}: diff {diff}");
    }
    let wide = Tensor::zeros((256, 256, 3, 3), candle_core::DType::F32, &d).unwrap();
    let (f4, _) = winograd(&wide, None, [1, 1], None, Isa::Scalar).unwrap();
    assert!(!f4.with_block_bytes(2 << 20).schedule(49, 2).1);
}

/// The input transform's prefetch is only a hint: forced on (past 0 bytes
/// of input) the output has the same bits as with it off, on every path,
/// with border tiles, a partial lane chunk and two images; and it is
/// decided by the input's size against the bound, on AVX-512 alone.
#[test]
fn prefetch_changes_no_output() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 7, 13, 11), &d).unwrap();
    let w = Tensor::randn(0f32, 0.1, (5, 7, 3, 3), &d).unwrap();
    for isa in Isa::available() {
        let (f4, _) = winograd(&w, None, [1, 1], None, isa).unwrap();
        let off = f4.with_prefetch_above(usize::MAX);
        assert!(!off.prefetches(usize::MAX), "{isa:?}");
        let want = off.run(&x, None).unwrap();
        let on = off.with_prefetch_above(100);
        assert!(!on.prefetches(100), "{isa:?}");
        assert_eq!(on.prefetches(101), isa == Isa::Avx512, "{isa:?}");
        let on = on.with_prefetch_above(0);
        assert_eq!(values(&on.run(&x, None).unwrap()), values(&want), "{isa:?}");
    }
}

/// One block of all the tiles exactly where their `V` and `M` take no
/// more than the weights and half the scratch cap; the cache's block
/// otherwise, also where the product of the sizes overflows.
#[test]
fn one_block_where_the_weights_outweigh_the_tiles() {
    assert_eq!(tiles_per_block(32, 40, 100, 4000), 40);
    assert_eq!(tiles_per_block(32, 40, 100, 3999), 32);
    assert_eq!(tiles_per_block(32, 20, 100, 4000), 32);
    assert_eq!(tiles_per_block(32, usize::MAX, 2, usize::MAX), 32);
    // Weights past half the scratch cap: cache-sized blocks, as before.
    let half_cap = crate::cpu::data::SCRATCH_MAX_VALUES / 2 * 4;
    assert_eq!(tiles_per_block(32, 1000, half_cap / 1000, usize::MAX), 1000);
    assert_eq!(tiles_per_block(32, 1000, half_cap / 1000 + 1, usize::MAX), 32);
}

#[test]
fn rejects_bad_input() {
    let d = Device::Cpu;
    let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &d).unwrap();
    let (f4, f2) = winograd(&w, None, [1, 1], None, Isa::Scalar).unwrap();
    type Run<'a> = &'a dyn Fn(&Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>;
    let runs: [Run; 2] = [&|x, r| f4.run(x, r), &|x, r| f2.run(x, r)];
    for run in runs {
        let wrong_channels = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &d).unwrap();
        assert!(run(&wrong_channels, None).is_err());
        let x = Tensor::zeros((1, 3, 5, 5), candle_core::DType::F32, &d).unwrap();
        let wrong_residual = Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &d).unwrap();
        assert!(run(&x, Some(&wrong_residual)).is_err());
        let empty = run(&x.narrow(0, 0, 0).unwrap(), None).unwrap();
        assert_eq!(empty.dims(), [0, 4, 5, 5]);
    }
    let five = Tensor::zeros((4, 3, 5, 5), candle_core::DType::F32, &d).unwrap();
    let spec = |weight: &Tensor, padding: [usize; 2]| {
        let attrs = Conv2dAttrs {
            padding,
            ..Default::default()
        };
        ConvSpec::of(weight, attrs).unwrap()
    };
    let e = Epilogue::new(None, 4, None).unwrap();
    assert!(WinogradF4::new(spec(&five, [1, 1]), &five, e.clone(), Machine::with_isa(Isa::Scalar)).is_err());
    assert!(WinogradF2::new(spec(&five, [1, 1]), &five, e.clone(), Machine::with_isa(Isa::Scalar)).is_err());
    assert!(WinogradF2::new(spec(&w, [3, 1]), &w, e, Machine::with_isa(Isa::Scalar)).is_err());
    assert!(applies(&spec(&w, [2, 2])) && !applies(&spec(&w, [3, 0])));
}
