//! Unit tests of graph building, verification, printing and parsing.

use crate::*;
use proptest::prelude::*;

const TOY: &str = "graph toy(%x: f32[5,1,1,1]) {
  @conv1.weight = constant : f32[1,1,1,1]
  @conv1.bias = constant : f32[1]
  %conv1 = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%x, @conv1.weight, @conv1.bias) : f32[5,1,1,1]
  @bn1.running_mean = constant : f32[1]
  @bn1.running_var = constant : f32[1]
  %bn1 = batch_norm[eps=1e-5](%conv1, @bn1.running_mean, @bn1.running_var) : f32[5,1,1,1]
  %relu = relu(%bn1) : f32[5,1,1,1]
  %relu#1 = relu(%relu) : f32[5,1,1,1]
  return %relu#1
}
";

/// Printing a parsed graph gives back the exact text.
#[test]
fn toy_text_round_trips() {
    let graph = Graph::parse(TOY).unwrap();
    assert_eq!(graph.to_string(), TOY);
    graph.verify().unwrap();
    assert_eq!(graph.node(graph.find("relu#1").unwrap()).path(), "relu");
}

/// Omitted attributes take PyTorch's defaults and a scalar stands for both axes.
#[test]
fn defaults_and_scalar_pairs() {
    let text = "graph g(%x: f32[1,2,8,8]) {
  @w = constant : f32[2,1,3,3]
  %c = conv2d[stride=2, groups=2](%x, @w) : f32[1,2,3,3]  // depthwise
  %p = max_pool2d[kernel=2](%c) : f32[1,2,1,1]
  return %p
}";
    let graph = Graph::parse(text).unwrap();
    let Op::Conv2d(attrs) = graph.node(graph.find("c").unwrap()).op else {
        panic!("expected conv2d");
    };
    assert_eq!(attrs.stride, [2, 2]);
    assert_eq!(attrs.dilation, [1, 1]);
    let Op::MaxPool2d(pool) = graph.node(graph.find("p").unwrap()).op else {
        panic!("expected max_pool2d");
    };
    assert_eq!(pool.stride, [2, 2]);
}

/// A fused conv with a pool: the fact is the pooled shape, the text
/// round-trips, FLOPs count the convolution's own outputs, and a window
/// that does not fit the conv output is an error naming it.
#[test]
fn fused_conv_with_pool() {
    let text = "graph g(%x: f32[1,3,16,16]) {
  @w = constant : f32[4,3,3,3]
  @b = constant : f32[4]
  %y = fused_conv2d[padding=1, relu=1, pool_kernel=3, pool_stride=2, pool_padding=1](%x, @w, @b) : f32[1,4,8,8]
  return %y
}";
    let graph = Graph::parse(text).unwrap();
    let Op::FusedConv2d(attrs) = graph.node(graph.find("y").unwrap()).op else {
        panic!("expected fused_conv2d");
    };
    assert_eq!(
        attrs.pool,
        Some(MaxPool2dAttrs {
            ceil_mode: false,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1]
        })
    );
    assert_eq!(Graph::parse(&graph.to_string()).unwrap().to_string(), graph.to_string());
    assert_eq!(graph.flops(), 2 * 16 * 16 * 4 * 27);
    let wrong = text.replace("f32[1,4,8,8]", "f32[1,4,16,16]");
    assert!(Graph::parse(&wrong).is_err());
    let too_big = text
        .replace("pool_kernel=3", "pool_kernel=40")
        .replace(", pool_padding=1", "");
    assert!(Graph::parse(&too_big).unwrap_err().to_string().contains("window"));
}

fn parse_err(text: &str) -> String {
    Graph::parse(text).unwrap_err().to_string()
}

/// An undefined operand is reported with its name and position.
#[test]
fn undefined_value_is_an_error() {
    let err = parse_err("graph g(%x: f32[1]) {\n  %y = relu(%z) : f32[1]\n  return %y\n}");
    assert!(err.contains("undefined value `%z`") && err.contains("line 2"), "{err}");
}

/// Syntax errors name what was expected and what was found.
#[test]
fn syntax_errors_are_located() {
    let cases = [
        ("  %y = relu(%x : f32[1]", "expected `,` or `)`, found `:`"),
        ("  %y = softmax(%x) : f32[1]", "unknown op `softmax`"),
        ("  %y = relu(%x) : f32[2]", "annotated f32[2]"),
        ("  %y = relu(%x) : q9[1]", "unknown dtype `q9`"),
        (
            "  %y = conv2d[strides=1](%x, %x) : f32[1]",
            "unknown attribute `strides`",
        ),
        ("  %x = relu(%x) : f32[1]", "duplicate value name `x`"),
    ];
    for (line, needle) in cases {
        let err = parse_err(&format!("graph g(%x: f32[1]) {{\n{line}\n  return %y\n}}"));
        assert!(err.contains(needle) && err.contains("line 2"), "{line}: {err}");
    }
    let err = parse_err("graph g(%x: f32[1]) {\n  return @x\n}");
    assert!(err.contains("`@x` is not a constant"), "{err}");
}

/// The verifier reports every violation at once, not just the first.
#[test]
fn verifier_reports_all_violations() {
    let mut graph = Graph::parse(TOY).unwrap();
    let conv = graph.find("conv1").unwrap();
    graph.node_mut(conv).fact.shape = vec![5, 2, 1, 1];
    let relu = graph.find("relu").unwrap();
    let later = graph.find("relu#1").unwrap();
    graph.node_mut(relu).inputs = vec![later];
    let err = graph.verify().unwrap_err();
    let IrError::Verify { violations, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(violations.len(), 3, "{err}");
    let text = err.to_string();
    assert!(text.contains("%conv1: fact is f32[5,2,1,1]"), "{text}");
    assert!(text.contains("%relu: operand `relu#1` is not defined before"), "{text}");
    assert!(text.contains("%bn1: batch_norm"), "{text}");
}

/// Constant data must agree with the declared fact.
#[test]
fn constant_data_is_checked() {
    let mut graph = Graph::parse(TOY).unwrap();
    let wrong = candle_core::Tensor::zeros((2,), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = graph.set_constant_data("conv1.bias", wrong).unwrap_err();
    assert!(err.to_string().contains("expected f32[1], got data of f32[2]"), "{err}");
    let right = candle_core::Tensor::zeros((1,), DType::F32, &candle_core::Device::Cpu).unwrap();
    graph.set_constant_data("conv1.bias", right).unwrap();
    assert!(graph
        .set_constant_data(
            "conv1",
            candle_core::Tensor::zeros((1,), DType::F32, &candle_core::Device::Cpu).unwrap()
        )
        .is_err());
}

/// Redirected uses followed by compact restore topological order and drop the unused.
#[test]
fn replace_and_compact_keep_order() {
    let mut graph = Graph::parse(TOY).unwrap();
    let x = graph.find("x").unwrap();
    let bn = graph.find("bn1").unwrap();
    let new = graph.add_node("late", Op::Relu, &[x]).unwrap();
    graph.replace_all_uses(bn, new);
    assert!(graph.verify().is_err());
    let live = graph.live();
    let dropped = graph.compact(|id, _| live[id.index()]);
    // bn1, conv1 and their four constants are dead.
    assert_eq!(dropped, 6);
    graph.verify().unwrap();
    let text = graph.to_string();
    assert!(text.contains("%late = relu(%x)"), "{text}");
    assert!(!text.contains("bn1") && !text.contains("conv1"), "{text}");
}

fn arb_chain() -> impl Strategy<Value = Graph> {
    (
        1usize..3,
        1usize..5,
        3usize..9,
        prop::collection::vec((0u8..5, 1usize..4, 1usize..3, 0usize..2, 1usize..3, 1e-6f64..0.5), 1..6),
    )
        .prop_map(|(batch, channels, size, layers)| {
            let mut graph = Graph::new("chain");
            let mut x = graph
                .add_input("x", TensorFact::new(DType::F32, [batch, channels, size, size]))
                .unwrap();
            let mut c = channels;
            for (i, (kind, out, k, pad, stride, eps)) in layers.into_iter().enumerate() {
                let h = graph.node(x).fact.shape[2];
                let next = match kind {
                    0 if h + 2 * pad >= k => {
                        let w = graph
                            .add_constant_decl(format!("l{i}.weight"), TensorFact::new(DType::F32, [out, c, k, k + 1]))
                            .unwrap();
                        let attrs = Conv2dAttrs {
                            stride: [stride, 1],
                            padding: [pad, pad + 1],
                            dilation: [1, 1],
                            groups: 1,
                        };
                        graph.add_node(format!("l{i}"), Op::Conv2d(attrs), &[x, w]).ok()
                    }
                    1 => {
                        let m = graph
                            .add_constant_decl(format!("l{i}.running_mean"), TensorFact::new(DType::F32, [c]))
                            .unwrap();
                        let v = graph
                            .add_constant_decl(format!("l{i}.running_var"), TensorFact::new(DType::F32, [c]))
                            .unwrap();
                        graph
                            .add_node(format!("l{i}"), Op::BatchNorm(BatchNormAttrs { eps }), &[x, m, v])
                            .ok()
                    }
                    2 => graph.add_node(format!("l{i}"), Op::Relu, &[x]).ok(),
                    3 => graph.add_node(format!("l{i}"), Op::Add, &[x, x]).ok(),
                    _ if h >= 2 => graph
                        .add_node(
                            format!("l{i}"),
                            Op::MaxPool2d(MaxPool2dAttrs {
                                ceil_mode: false,
                                kernel: [2, 2],
                                stride: [1, 2],
                                padding: [1, 0],
                            }),
                            &[x],
                        )
                        .ok(),
                    _ => None,
                };
                if let Some(next) = next {
                    x = next;
                    c = graph.node(x).fact.shape[1];
                }
            }
            let pooled = graph.add_node("pool", Op::GlobalAvgPool2d, &[x]).unwrap();
            let flat = graph
                .add_node("flat", Op::Flatten(FlattenAttrs { start_dim: 1 }), &[pooled])
                .unwrap();
            graph.set_outputs(vec![flat, x]);
            graph
        })
}

proptest! {
    /// print ∘ parse is the identity on text, and parse ∘ print on graphs.
    #[test]
    fn print_parse_round_trip(graph in arb_chain()) {
        graph.verify().unwrap();
        let text = graph.to_string();
        let parsed = Graph::parse(&text).unwrap();
        prop_assert_eq!(&parsed.to_string(), &text);
        prop_assert_eq!(parsed, graph);
    }
}

/// FLOPs count conv and linear multiply-adds twice: a 3x3 conv 2->4 channels on 5x5 "same" output.
#[test]
fn flops_of_conv_and_linear() {
    let graph = Graph::parse(
        "graph g(%x: f32[1,2,5,5]) {
  @w = constant : f32[4,2,3,3]
  %c = conv2d[padding=1](%x, @w) : f32[1,4,5,5]
  %p = global_avg_pool2d(%c) : f32[1,4,1,1]
  %f = flatten[start_dim=1](%p) : f32[1,4]
  @l = constant : f32[10,4]
  %y = linear(%f, @l) : f32[1,10]
  return %y
}",
    )
    .unwrap();
    // conv: 100 outputs x 18 MACs; linear: 10 outputs x 4 MACs.
    assert_eq!(graph.flops(), 2 * (100 * 18 + 40));
}

/// Re-batching re-infers every fact and keeps the structure.
#[test]
fn with_batch_reinfers_facts() {
    let graph = Graph::parse(TOY).unwrap();
    let seven = graph.with_batch(7).unwrap();
    seven.verify().unwrap();
    assert_eq!(seven.to_string(), TOY.replace("f32[5,1,1,1]", "f32[7,1,1,1]"));
}

/// Every op kind's text name is unique and reads back as that kind, and the
/// printer writes each op under its kind's name.
#[test]
fn op_kind_names_round_trip() {
    let mut names = std::collections::HashSet::new();
    for &kind in OpKind::ALL {
        assert!(names.insert(kind.name()), "{kind:?}");
        assert_eq!(OpKind::from_name(kind.name()), Some(kind));
    }
    assert_eq!(OpKind::from_name("conv3d"), None);
    let graph = Graph::parse(
        "graph g(%x: f32[1,2,4,4]) {\n  @w = constant : f32[2,2,1,1]\n  %c = conv2d(%x, @w) : f32[1,2,4,4]\n  %p = max_pool2d[kernel=2](%c) : f32[1,2,2,2]\n  return %p\n}",
    )
    .unwrap();
    for node in graph.nodes() {
        let text = graph.node_text(node);
        assert!(text.contains(node.op.name()), "{text}");
        assert_eq!(
            node.op.kind().role() == OpRole::Computed,
            !matches!(node.op, Op::Input | Op::Constant)
        );
    }
    let err = Graph::parse("graph g(%x: f32[2]) {\n  %y = input(%x) : f32[2]\n  return %y\n}").unwrap_err();
    assert!(err.to_string().contains("unknown op `input`"), "{err}");
    assert!(err.to_string().contains("global_avg_pool2d"), "{err}");
}

/// The activations and the broadcast multiply of squeeze-and-excitation:
/// text round-trips, facts follow the first operand, FLOPs count none of
/// them, and a second operand that does not broadcast is an error naming
/// both facts.
#[test]
fn activations_and_broadcast_mul() {
    let text = "graph se(%x: f32[2,4,5,5]) {
  %a = relu6(%x) : f32[2,4,5,5]
  %b = hardswish(%a) : f32[2,4,5,5]
  %c = silu(%b) : f32[2,4,5,5]
  %p = global_avg_pool2d(%c) : f32[2,4,1,1]
  %g = hardsigmoid(%p) : f32[2,4,1,1]
  %s = sigmoid(%g) : f32[2,4,1,1]
  %y = mul(%c, %s) : f32[2,4,5,5]
  return %y
}";
    let graph = Graph::parse(text).unwrap();
    assert_eq!(Graph::parse(&graph.to_string()).unwrap().to_string(), graph.to_string());
    assert_eq!(graph.flops(), 0);
    for (name, op) in [
        ("a", Op::Relu6),
        ("b", Op::HardSwish),
        ("c", Op::Silu),
        ("g", Op::HardSigmoid),
        ("s", Op::Sigmoid),
        ("y", Op::Mul),
    ] {
        assert_eq!(graph.node(graph.find(name).unwrap()).op, op, "{name}");
    }
    let wrong = text.replace("%y = mul(%c, %s) : f32[2,4,5,5]", "%y = mul(%s, %c) : f32[2,4,1,1]");
    let err = Graph::parse(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("must broadcast to the first") && err.contains("f32[2,4,5,5]"),
        "{err}"
    );
}

/// A fused conv's activation: `relu=1` as before, any other by name;
/// text round-trips; an unknown name or both forms at once are errors.
#[test]
fn fused_conv_activation_attribute() {
    let text = "graph g(%x: f32[1,3,8,8]) {
  @w = constant : f32[4,3,3,3]
  @b = constant : f32[4]
  %y = fused_conv2d[padding=1, activation=silu](%x, @w, @b) : f32[1,4,8,8]
  %z = fused_conv2d[padding=1, relu=1](%y, @w2, @b) : f32[1,4,8,8]
  return %z
}"
    .replace("@w2", "@w4")
    .replace(
        "  @b = constant : f32[4]\n",
        "  @b = constant : f32[4]\n  @w4 = constant : f32[4,4,3,3]\n",
    );
    let graph = Graph::parse(&text).unwrap();
    let attrs = |name: &str| match graph.node(graph.find(name).unwrap()).op {
        Op::FusedConv2d(a) => a.activation,
        _ => panic!("expected fused_conv2d"),
    };
    assert_eq!(attrs("y"), Some(crate::Activation::Silu));
    assert_eq!(attrs("z"), Some(crate::Activation::Relu));
    assert_eq!(Graph::parse(&graph.to_string()).unwrap().to_string(), graph.to_string());
    let err = parse_err(&text.replace("activation=silu", "activation=swish"));
    assert!(
        err.contains("unknown activation `swish`") && err.contains("hardswish"),
        "{err}"
    );
    let err = parse_err(&text.replace("activation=silu", "activation=silu, relu=1"));
    assert!(err.contains("give one"), "{err}");
}

/// A fused conv's input scale: the last operand, `[N, C, 1, 1]` of the
/// input's dtype, after the residual when there is one; text round-trips
/// (`input_scale=1`, written only when set); the roles read back by
/// `FusedConv2dAttrs::inputs`; a scale of another shape, one operand too
/// few, and FLOPs as the conv's own.
#[test]
fn fused_conv_input_scale() {
    let text = "graph g(%x: f32[2,3,8,8], %s: f32[2,3,1,1], %r: f32[2,4,8,8]) {
  @w = constant : f32[4,3,1,1]
  @b = constant : f32[4]
  %y = fused_conv2d[activation=silu, input_scale=1](%x, @w, @b, %s) : f32[2,4,8,8]
  %z = fused_conv2d[input_scale=1](%x, @w, @b, %r, %s) : f32[2,4,8,8]
  return %y, %z
}";
    let graph = Graph::parse(text).unwrap();
    assert_eq!(Graph::parse(&graph.to_string()).unwrap().to_string(), graph.to_string());
    assert!(graph.to_string().contains("relu=0, input_scale=1]("), "{graph}");
    let roles = |name: &str| {
        let node = graph.node(graph.find(name).unwrap());
        let Op::FusedConv2d(attrs) = node.op else {
            panic!("expected fused_conv2d")
        };
        assert!(attrs.input_scale);
        let names: Vec<&str> = node.inputs.iter().map(|&i| graph.node(i).name.as_str()).collect();
        attrs.inputs(&names).unwrap()
    };
    let y = roles("y");
    assert_eq!(
        (y.x, y.weight, y.bias, y.residual, y.scale),
        ("x", "w", "b", None, Some("s"))
    );
    let z = roles("z");
    assert_eq!((z.residual, z.scale), (Some("r"), Some("s")));
    assert_eq!(graph.flops(), 2 * 2 * (2 * 8 * 8 * 4 * 3));
    let err = parse_err(&text.replace("%s: f32[2,3,1,1]", "%s: f32[1,3,1,1]"));
    assert!(err.contains("scale must be f32 [2, 3, 1, 1]"), "{err}");
    let err = parse_err(&text.replace("(%x, @w, @b, %s)", "(%x, @w, @b)"));
    assert!(err.contains("expected 4 or 5 input(s), got 3"), "{err}");
    let unscaled = FusedConv2dAttrs::default();
    assert_eq!(unscaled.inputs(&[1, 2]), None);
    assert_eq!(
        unscaled.inputs(&[1, 2, 3, 4]).map(|i| (i.residual, i.scale)),
        Some((Some(4), None))
    );
}

/// DenseNet's and SqueezeNet's ops: `concat` (any number of inputs, one
/// axis may differ), `avg_pool2d` and a ceil-mode `max_pool2d`, and the
/// one-sided `pad` of ONNX's asymmetric conv padding, round-trip as text;
/// a concat of mismatched shapes or out-of-range axis, one without inputs,
/// and a pad whose size overflows are errors that say so.
#[test]
fn concat_avg_pool_and_ceil_mode() {
    let text = "graph dense(%x: f32[1,4,7,7]) {
  %a = relu(%x) : f32[1,4,7,7]
  %c = concat[axis=1](%x, %a, %x) : f32[1,12,7,7]
  %p = avg_pool2d[kernel=[2,2], stride=[2,2]](%c) : f32[1,12,3,3]
  %m = max_pool2d[kernel=[2,2], stride=[2,2], padding=[0,0], ceil_mode=1](%c) : f32[1,12,4,4]
  %one = concat[axis=0](%m) : f32[1,12,4,4]
  %z = pad[begin=[0,1], end=[2,0]](%one) : f32[1,12,6,5]
  return %p, %z
}";
    let graph = Graph::parse(text).unwrap();
    graph.verify().unwrap();
    assert_eq!(graph.to_string(), text.to_string() + "\n");
    assert_eq!(graph.flops(), 0);
    let f = |shape: &[usize]| TensorFact::new(DType::F32, shape.to_vec());
    let concat = |axis| Op::Concat(crate::ConcatAttrs { axis });
    let err = concat(1).infer(&[&f(&[1, 4, 7, 7]), &f(&[1, 4, 6, 7])]).unwrap_err();
    assert!(err.contains("every dimension but 1"), "{err}");
    let err = concat(4).infer(&[&f(&[1, 4, 7, 7])]).unwrap_err();
    assert!(err.contains("axis 4 out of range"), "{err}");
    let err = concat(0).infer(&[]).unwrap_err();
    assert!(err.contains("at least 1"), "{err}");
    let pool = Op::AvgPool2d(crate::AvgPool2dAttrs {
        kernel: [8, 2],
        stride: [1, 1],
    });
    assert!(pool.infer(&[&f(&[1, 4, 7, 7])]).unwrap_err().contains("does not fit"));
}
