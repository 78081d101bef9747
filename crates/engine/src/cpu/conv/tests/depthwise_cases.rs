//! The depthwise conv on wide planes and in bands, and with a 1×1 conv or
//! a small window fused in front, against candle's convs.

use super::*;

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
