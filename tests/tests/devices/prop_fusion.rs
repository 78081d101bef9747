//! Property tests of conv → batch_norm fusion and of the whole default
//! pipeline. More cases: `WICK_PROPTEST_CASES=5000 cargo test -p wick-tests --test devices prop_fusion`.

use candle_core::{DType, Device};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use wick_ir::{BatchNormAttrs, Graph, Op, TensorFact};
use wick_models::random::uniform;
use wick_passes::PassManager;
use wick_tests::conv_case::{arb_conv_case, ConvCase};
use wick_tests::device_test;
use wick_tests::harness::{arb_graph, check_semantics, check_semantics_on, config, GraphCase};

/// One conv → batch_norm pair with every attribute drawn at random.
#[derive(Debug, Clone)]
struct ConvBnCase {
    conv: ConvCase,
    bias: bool,
    affine: bool,
    eps: f64,
    seed: u64,
}

fn arb_conv_bn() -> impl Strategy<Value = ConvBnCase> {
    (
        arb_conv_case(),
        any::<bool>(),
        any::<bool>(),
        -5.0f64..-1.0,
        any::<u64>(),
    )
        .prop_map(|(conv, bias, affine, log_eps, seed)| ConvBnCase {
            conv,
            bias,
            affine,
            eps: 10f64.powf(log_eps),
            seed,
        })
}

fn build(case: &ConvBnCase) -> (GraphCase, f64) {
    let mut graph = Graph::new("conv_bn");
    let conv = &case.conv;
    let x = graph
        .add_input("x", TensorFact::new(DType::F32, conv.input_dims()))
        .unwrap();
    let mut constant = |name: &str, shape: &[usize], lo: f64, hi: f64| {
        let t = uniform(case.seed, name, shape, lo, hi, &Device::Cpu).unwrap();
        (graph.add_constant(name, t.clone()).unwrap(), t)
    };
    let (o, fan_in) = (conv.out_channels, conv.fan_in());
    let (weight, weight_data) = constant("conv.weight", &conv.weight_dims(), -1.0, 1.0);
    let mut conv_inputs = vec![x, weight];
    let mut bias_max = 0.0;
    if case.bias {
        conv_inputs.push(constant("conv.bias", &[o], -1.0, 1.0).0);
        bias_max = 1.0;
    }
    let (mean, _) = constant("bn.running_mean", &[o], -2.0, 2.0);
    let (var, var_data) = constant("bn.running_var", &[o], 0.1, 3.0);
    let mut bn_inputs = vec![mean, var];
    let (mut gamma_max, mut beta_max) = (1.0, 0.0);
    if case.affine {
        bn_inputs.push(constant("bn.weight", &[o], -2.0, 2.0).0);
        bn_inputs.push(constant("bn.bias", &[o], -1.0, 1.0).0);
        (gamma_max, beta_max) = (2.0, 1.0);
    }
    let conv = graph.add_node("conv", Op::Conv2d(conv.attrs()), &conv_inputs).unwrap();
    bn_inputs.insert(0, conv);
    let bn = graph
        .add_node("bn", Op::BatchNorm(BatchNormAttrs { eps: case.eps }), &bn_inputs)
        .unwrap();
    graph.set_outputs(vec![bn]);
    let input = uniform(
        case.seed,
        "input",
        &graph.node(x).fact.shape.clone(),
        -1.0,
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    // Tolerance from the magnitudes involved: a worst-case f32 accumulation
    // bound, 4·u·(n + 3) · (|s|·(n·|W|·|x| + |b| + |μ|) + |β|), with |x| <= 1.
    let var_min = var_data.min_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let scale_max = gamma_max / (var_min + case.eps).sqrt();
    let weight_max = weight_data
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let magnitude = scale_max * (fan_in as f64 * weight_max + bias_max + 2.0) + beta_max;
    let tolerance = 4.0 * f32::EPSILON as f64 / 2.0 * (fan_in as f64 + 3.0) * magnitude;
    (
        GraphCase {
            graph,
            inputs: vec![input],
        },
        tolerance,
    )
}

fn check_conv_bn(case: &ConvBnCase, device: &Device) -> Result<(), TestCaseError> {
    let (graph_case, tolerance) = build(case);
    // check_semantics scales by max(1, |reference|); pass an absolute bound instead.
    let report = check_semantics_on(device, &PassManager::default_pipeline(), &graph_case, tolerance)?;
    prop_assert_eq!(report.count("fuse-conv-batch-norm", "matched"), 1);
    Ok(())
}

device_test! {
    /// Any conv → bn pair (groups incl. depthwise, kernel h != w, stride,
    /// dilation, asymmetric padding, bias/affine on or off, eps 1e-5..1e-1,
    /// C == H == W) fuses once and keeps the output within the f32 bound,
    /// both graphs run on the device under test.
    fn conv_bn_fusion_preserves_output(device) {
        let mut runner = TestRunner::new(config(256));
        if let Err(e) = runner.run(&arb_conv_bn(), |case| check_conv_bn(&case, &device)) {
            panic!("{e}");
        }
    }
}

/// A conv (every attribute drawn, a 1×1 one half the time: the kernel that
/// folds the scale into its weights) reading `mul(x, s)` with `s`
/// `[N, C, 1, 1]`, then a SiLU: squeeze-and-excitation's scale into the
/// projection, with the activation fused before it.
#[derive(Debug, Clone)]
struct ScaledConvCase {
    conv: ConvCase,
    bias: bool,
    seed: u64,
}

fn arb_scaled_conv() -> impl Strategy<Value = ScaledConvCase> {
    (arb_conv_case(), any::<bool>(), any::<bool>(), any::<u64>()).prop_map(|(mut conv, one_by_one, bias, seed)| {
        if one_by_one {
            (conv.kernel, conv.stride, conv.padding, conv.groups) = ([1, 1], 1, [0, 0], 1);
            conv.out_channels = conv.out_channels.max(1);
        }
        ScaledConvCase { conv, bias, seed }
    })
}

fn check_scaled_conv(case: &ScaledConvCase, device: &Device) -> Result<(), TestCaseError> {
    let conv = &case.conv;
    let mut graph = Graph::new("scaled_conv");
    let dims = conv.input_dims();
    let x = graph.add_input("x", TensorFact::new(DType::F32, dims)).unwrap();
    let s = graph
        .add_input("s", TensorFact::new(DType::F32, [dims[0], dims[1], 1, 1]))
        .unwrap();
    let mut constant = |name: &str, shape: &[usize]| {
        let t = uniform(case.seed, name, shape, -1.0, 1.0, &Device::Cpu).unwrap();
        graph.add_constant(name, t).unwrap()
    };
    let mut inputs = vec![constant("conv.weight", &conv.weight_dims())];
    if case.bias {
        inputs.push(constant("conv.bias", &[conv.out_channels]));
    }
    let scaled = graph.add_node("mul", Op::Mul, &[x, s]).unwrap();
    inputs.insert(0, scaled);
    let y = graph.add_node("conv", Op::Conv2d(conv.attrs()), &inputs).unwrap();
    let out = graph.add_node("silu", Op::Silu, &[y]).unwrap();
    graph.set_outputs(vec![out]);
    let input = |name: &str, shape: &[usize]| uniform(case.seed, name, shape, -1.0, 1.0, &Device::Cpu).unwrap();
    let graph_case = GraphCase {
        inputs: vec![input("input", &dims), input("scale", &[dims[0], dims[1], 1, 1])],
        graph,
    };
    let report = check_semantics_on(device, &PassManager::default_pipeline(), &graph_case, 1e-5)?;
    prop_assert_eq!(report.count("fuse-conv-activation", "matched"), 1);
    prop_assert_eq!(report.count("fuse-conv-input-scale", "matched"), 1);
    Ok(())
}

device_test! {
    /// Any conv reading a per-channel scaled value takes the scale in
    /// (`fuse-conv-input-scale`, after its activation fused) and keeps its
    /// output, both graphs run on the device under test.
    fn input_scale_fusion_preserves_output(device) {
        let mut runner = TestRunner::new(config(128));
        if let Err(e) = runner.run(&arb_scaled_conv(), |case| check_scaled_conv(&case, &device)) {
            panic!("{e}");
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Random graphs through the default pipeline: outputs unchanged, the
    /// verifier clean, no batch_norm fed by a fusable conv left, and exactly
    /// the pairs that must not fuse (conv with other users or returned)
    /// counted as refusals.
    #[test]
    fn default_pipeline_preserves_random_graphs(case in arb_graph()) {
        let report = check_semantics(&PassManager::default_pipeline(), &case, 1e-4)?;
        let (fusable, refusable) = expected_fusions(&case.graph);
        prop_assert_eq!(report.count("fuse-conv-batch-norm", "matched"), fusable);
        let refused = report.count("fuse-conv-batch-norm", "skipped.interior_value_has_external_users")
            + report.count("fuse-conv-batch-norm", "skipped.interior_value_is_graph_output");
        prop_assert_eq!(refused, refusable);
    }
}

/// Oracle for fusion counts computed from the original graph alone: walking in
/// order, a live batch_norm whose input is a conv (or an already-fused pair)
/// fuses iff that input has exactly one live use and is not a graph output.
fn expected_fusions(graph: &Graph) -> (u64, u64) {
    // Dead nodes (no output depends on them) are left to DCE: not candidates, not users.
    let live = graph.live();
    let mut users = graph.users();
    for list in &mut users {
        list.retain(|u| live[u.index()]);
    }
    let mut conv_like = vec![false; graph.len()];
    let (mut fused, mut refused) = (0, 0);
    for id in graph.node_ids() {
        let node = graph.node(id);
        match node.op {
            Op::Conv2d(_) => conv_like[id.index()] = true,
            Op::BatchNorm(_) if live[id.index()] => {
                let source = node.inputs[0];
                if conv_like[source.index()] {
                    if users[source.index()].len() == 1 && !graph.outputs().contains(&source) {
                        fused += 1;
                        conv_like[id.index()] = true;
                    } else {
                        refused += 1;
                    }
                }
            }
            _ => {}
        }
    }
    (fused, refused)
}

/// A shrunk failure or a shape worth pinning: `conv` as
/// [`ConvCase`]'s one-line form.
fn regression(conv: &str, bias: bool, affine: bool, eps: f64, seed: u64) {
    let conv = conv.parse::<ConvCase>().unwrap();
    check_conv_bn(
        &ConvBnCase {
            conv,
            bias,
            affine,
            eps,
            seed,
        },
        &Device::Cpu,
    )
    .unwrap();
}

/// C == H == W == 4 with a depthwise 3x3 conv (candle's layout-ambiguity bug shape).
#[test]
fn regression_c_eq_h_eq_w_depthwise() {
    regression("n1 c4 o4 g4 k3x3 s1 d1 p1x1 4x4", false, true, 1e-5, 1);
}

/// Kernel 1x3, asymmetric padding, stride 2, no bias, no affine, eps 0.1.
#[test]
fn regression_asymmetric_kernel_and_padding() {
    regression("n2 c3 o6 g3 k1x3 s2 d1 p0x2 3x5", false, false, 0.1, 2);
}
