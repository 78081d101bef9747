//! The pass manager's policies and the pattern API's refusals, on graphs written as IR text.

use wick_ir::{BatchNormAttrs, Conv2dAttrs, DType, Graph, Op, OpKind, TensorFact};
use wick_models::random::fill_missing_constants;
use wick_passes::{
    EliminateDeadCode, ExtensionPoint, MatchOutcome, Pass, PassCounters, PassError, PassManager, Pattern,
    PatternBuilder, PatternPass, Replacement, StopReason,
};

fn graph(text: &str) -> Graph {
    let mut graph = Graph::parse(text).unwrap();
    fill_missing_constants(&mut graph, 3, &Default::default()).unwrap();
    graph
}

/// A pass that breaks the graph, to see the manager catch it.
struct Vandal;

impl Pass for Vandal {
    fn name(&self) -> &str {
        "vandal"
    }
    fn run(&self, graph: &mut Graph, _: &mut PassCounters<'_>) -> Result<bool, PassError> {
        let last = graph.node_ids().last().unwrap();
        graph.node_mut(last).fact.shape.push(7);
        Ok(true)
    }
}

const CHAIN: &str = "graph chain(%x: f32[1,2,4,4]) {
  @w = constant : f32[2,2,3,3]
  %conv = conv2d[padding=1](%x, @w) : f32[1,2,4,4]
  @m = constant : f32[2]
  @v = constant : f32[2]
  %bn = batch_norm[eps=0.001](%conv, @m, @v) : f32[1,2,4,4]
  %r = relu(%bn) : f32[1,2,4,4]
  return %r
}";

/// Verification after every pass names the pass that broke the graph.
#[test]
fn verification_failure_names_the_pass() {
    let mut manager = PassManager::new();
    manager.add_pass(Vandal);
    let err = manager.run(&mut graph(CHAIN)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("after pass `vandal`: graph `chain` failed verification"),
        "{text}"
    );
}

/// User passes run at their extension point (`end` = torch's post_grad_custom_post_pass).
#[test]
fn user_passes_run_at_named_points() {
    let mut manager = PassManager::default_pipeline();
    manager.register_at(ExtensionPoint::End, EliminateDeadCode).unwrap();
    manager.register_at(ExtensionPoint::Start, EliminateDeadCode).unwrap();
    assert_eq!(
        manager.pass_names(),
        [
            "eliminate-dead-code",
            "fuse-conv-batch-norm",
            "fuse-conv-add-relu",
            "fuse-conv-relu",
            "fuse-conv-activation",
            "fuse-conv-add",
            "fuse-conv-max-pool",
            "fuse-conv-input-scale",
            "eliminate-dead-code",
            "eliminate-dead-code"
        ]
    );
    let err = PassManager::new()
        .register_at(ExtensionPoint::PostFusion, EliminateDeadCode)
        .unwrap_err();
    assert!(matches!(err, PassError::NoSuchPoint(_)), "{err}");
}

/// Fixpoint iteration stops when an iteration changes nothing, and reports why.
#[test]
fn fixpoint_converges_with_reason() {
    let mut manager = PassManager::default_pipeline();
    manager.run_to_fixpoint(5);
    let mut g = graph(CHAIN);
    let report = manager.run(&mut g).unwrap();
    assert_eq!(report.stop, StopReason::Converged { iterations: 2 });
    assert_eq!(report.count("fuse-conv-batch-norm", "matched"), 1);
    let mut capped = PassManager::default_pipeline();
    capped.run_to_fixpoint(1);
    assert_eq!(
        capped.run(&mut graph(CHAIN)).unwrap().stop,
        StopReason::CapReached { cap: 1 }
    );
    let table = report.to_string();
    assert!(
        table.contains("fuse-conv-batch-norm") && table.contains("matched=1"),
        "{table}"
    );
    assert!(table.ends_with("stop: converged after 2 iteration(s)\n"), "{table}");
}

/// IR dumps before and after each pass land in the requested directory.
#[test]
fn dumps_ir_around_each_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut manager = PassManager::new();
    manager
        .add_pass(wick_passes::fuse_conv_batch_norm())
        .add_pass(EliminateDeadCode);
    manager.dump_ir_to(dir.path());
    manager.run(&mut graph(CHAIN)).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "001-fuse-conv-batch-norm.after.ir",
            "001-fuse-conv-batch-norm.before.ir",
            "002-eliminate-dead-code.after.ir",
            "002-eliminate-dead-code.before.ir"
        ]
    );
    let before = std::fs::read_to_string(dir.path().join("001-fuse-conv-batch-norm.before.ir")).unwrap();
    assert_eq!(Graph::parse(&before).unwrap().to_string(), before);
}

fn fuse_counts(text: &str) -> (u64, std::collections::BTreeMap<String, u64>) {
    let report = PassManager::default_pipeline().run(&mut graph(text)).unwrap();
    let counters = report.runs[0].counters.clone();
    (report.count("fuse-conv-batch-norm", "matched"), counters)
}

/// A conv whose output is also a graph output must not fuse; the refusal is counted.
#[test]
fn refuses_when_interior_is_graph_output() {
    let (matched, counters) = fuse_counts(
        "graph g(%x: f32[1,1,3,3]) {
  @w = constant : f32[1,1,1,1]
  %conv = conv2d(%x, @w) : f32[1,1,3,3]
  @m = constant : f32[1]
  @v = constant : f32[1]
  %bn = batch_norm(%conv, @m, @v) : f32[1,1,3,3]
  return %bn, %conv
}",
    );
    assert_eq!(matched, 0);
    assert_eq!(counters["skipped.interior_value_is_graph_output"], 1);
}

/// `fuse-conv-input-scale`'s counters on `text` after the default pipeline.
fn input_scale_counts(text: &str) -> std::collections::BTreeMap<String, u64> {
    let report = PassManager::default_pipeline().run(&mut graph(text)).unwrap();
    let run = report.runs.iter().find(|r| r.name == "fuse-conv-input-scale").unwrap();
    run.counters.clone()
}

/// A scale that is not one factor per image and channel (`[1, C, 1, 1]`
/// on a batch of 2, a per-pixel one) stays a `mul`, and so does one whose
/// scaled value has another user; each refusal is counted. One per image
/// and channel fuses.
#[test]
fn input_scale_refusals() {
    let text = |s: &str, extra_user: bool| {
        format!(
            "graph g(%x: f32[2,3,4,4], %s: f32[{s}]) {{
  @w = constant : f32[5,3,1,1]
  %m = mul(%x, %s) : f32[2,3,4,4]
  %conv = conv2d(%m, @w) : f32[2,5,4,4]
  return %conv{}
}}",
            if extra_user { ", %m" } else { "" }
        )
    };
    for s in ["1,3,1,1", "2,1,4,4"] {
        let counters = input_scale_counts(&text(s, false));
        assert_eq!(counters.get("matched"), None, "{s}: {counters:?}");
        assert_eq!(counters["skipped.not_per_channel"], 1, "{s}: {counters:?}");
    }
    let counters = input_scale_counts(&text("2,3,1,1", true));
    assert_eq!(counters.get("matched"), None, "{counters:?}");
    assert_eq!(counters["skipped.interior_value_is_graph_output"], 1, "{counters:?}");
    assert_eq!(input_scale_counts(&text("2,3,1,1", false))["matched"], 1);
}

/// A weight that is computed (not a constant) cannot be folded; the refusal is counted.
#[test]
fn refuses_non_constant_parameters() {
    let (matched, counters) = fuse_counts(
        "graph g(%x: f32[1,1,3,3], %w: f32[1,1,1,1]) {
  %conv = conv2d(%x, %w) : f32[1,1,3,3]
  @m = constant : f32[1]
  @v = constant : f32[1]
  %bn = batch_norm(%conv, @m, @v) : f32[1,1,3,3]
  return %bn
}",
    );
    assert_eq!(matched, 0);
    assert_eq!(counters["skipped.parameter_not_constant"], 1);
}

/// Mixed dtypes inside a match are refused (defensive: the verifier already
/// forbids them for conv, but user patterns may span ops that do not).
#[test]
fn refuses_dtype_mismatch() {
    let mut g = Graph::new("g");
    let x = g.add_input("x", TensorFact::new(DType::F32, [1, 1, 2, 2])).unwrap();
    let w = g
        .add_constant_decl("w", TensorFact::new(DType::F32, [1, 1, 1, 1]))
        .unwrap();
    let conv = g.add_node("conv", Op::Conv2d(Default::default()), &[x, w]).unwrap();
    g.node_mut(w).fact.dtype = DType::F16;
    g.set_outputs(vec![conv]);
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let weight = p.constant("weight");
    let root = p.op("conv", Op::Conv2d(Default::default()), &[x, weight]);
    let pattern = p.build(root).unwrap();
    assert!(matches!(
        pattern.match_at(&g, &g.users(), conv),
        MatchOutcome::Refused("dtype_mismatch")
    ));
}

/// Patterns can be written as an example graph, like register_replacement's example inputs;
/// the example's shapes and attributes do not limit what matches.
#[test]
fn pattern_from_example_graph_is_shape_agnostic() {
    let example = Graph::parse(
        "graph relu_relu(%x: f32[1]) {\n  %inner = relu(%x) : f32[1]\n  %outer = relu(%inner) : f32[1]\n  return %outer\n}",
    )
    .unwrap();
    let pass = PatternPass::new("collapse-relu")
        .register_replacement(Pattern::from_graph(&example).unwrap(), |m, _| {
            Ok(Replacement::With(m.node("inner")?))
        });
    let mut manager = PassManager::new();
    manager.add_pass(pass).add_pass(EliminateDeadCode);
    let mut g = graph(
        "graph g(%x: f32[2,3,4,5]) {\n  %a = relu(%x) : f32[2,3,4,5]\n  %b = relu(%a) : f32[2,3,4,5]\n  %c = relu(%b) : f32[2,3,4,5]\n  return %c\n}",
    );
    let report = manager.run(&mut g).unwrap();
    // relu(relu(relu(x))): the second collapse sees the first one's leftovers as dead.
    assert_eq!(report.count("collapse-relu", "matched"), 2);
    assert_eq!(g.nodes().iter().filter(|n| n.op == Op::Relu).count(), 1, "{g}");
}

/// Invalid patterns are errors, not panics.
#[test]
fn invalid_patterns_are_errors() {
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    assert!(matches!(p.build(x), Err(PassError::InvalidPattern(_))));
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let b = p.optional_constant("b");
    let w = p.constant("w");
    let conv = p.op("conv", OpKind::Conv2d, &[x, b, w]);
    assert!(p
        .build(conv)
        .unwrap_err()
        .to_string()
        .contains("optional operands must all come last"));
}

/// A match's typed accessors: bound names give their node and the
/// attributes of their op; a name the pattern lacks, or another kind's
/// attributes, are typed errors that name what was asked.
#[test]
fn match_accessors_are_typed() {
    let g = graph(
        "graph g(%x: f32[1,2,5,5]) {\n  @w = constant : f32[2,2,3,3]\n  %c = conv2d[stride=2](%x, @w) : f32[1,2,2,2]\n  %r = relu(%c) : f32[1,2,2,2]\n  return %r\n}",
    );
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let w = p.constant("w");
    let b = p.optional_constant("b");
    let conv = p.op("conv", OpKind::Conv2d, &[x, w, b]);
    let relu = p.op("relu", Op::Relu, &[conv]);
    let pattern = p.build(relu).unwrap();
    let root = g.find("r").unwrap();
    let MatchOutcome::Matched(found) = pattern.match_at(&g, &g.users(), root) else {
        panic!("conv → relu should match");
    };
    assert_eq!(found.node("conv").unwrap(), g.find("c").unwrap());
    assert_eq!(found.get("b"), None, "absent optional operand");
    let attrs: Conv2dAttrs = found.attrs(&g, "conv").unwrap();
    assert_eq!(attrs.stride, [2, 2]);
    assert!(matches!(found.node("bias"), Err(PassError::UnboundName(ref n)) if n == "bias"));
    let err = found.attrs::<BatchNormAttrs>(&g, "conv").unwrap_err();
    assert_eq!(err.to_string(), "the matched node `conv` is conv2d, not batch_norm");
}
