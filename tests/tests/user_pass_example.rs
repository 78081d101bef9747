//! The worked example from README ("Writing a pass"), compiled and run:
//! a user rewrite registered through the public pattern API at the `end`
//! extension point, property-tested with wick's harness.

use proptest::prelude::*;
use wick_ir::OpKind;
use wick_passes::{ExtensionPoint, PassManager, PatternBuilder, PatternPass, Replacement};
use wick_tests::harness::{arb_graph, check_semantics, config};

/// relu(relu(x)) ⇒ relu(x): the outer relu is replaced by the inner one.
fn collapse_double_relu() -> PatternPass {
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let inner = p.op("inner", OpKind::Relu, &[x]);
    let outer = p.op("outer", OpKind::Relu, &[inner]);
    let pattern = p.build(outer).expect("valid pattern");
    PatternPass::new("collapse-double-relu")
        .register_replacement(pattern, |found, _rewriter| Ok(Replacement::With(found.node("inner")?)))
}

fn pipeline() -> PassManager {
    let mut manager = PassManager::default_pipeline();
    manager
        .register_at(ExtensionPoint::End, collapse_double_relu())
        .expect("the default pipeline has an `end` point");
    manager
}

proptest! {
    #![proptest_config(config(128))]

    /// The user pass, inside the default pipeline, preserves semantics on random graphs.
    #[test]
    fn collapse_double_relu_preserves_semantics(case in arb_graph()) {
        check_semantics(&pipeline(), &case, 1e-4)?;
    }
}

/// The pass fires where it should and its counter says so.
#[test]
fn collapse_double_relu_counts() {
    let mut graph = wick_ir::Graph::parse(
        "graph g(%x: f32[4]) {\n  %a = relu(%x) : f32[4]\n  %b = relu(%a) : f32[4]\n  return %b\n}",
    )
    .unwrap();
    let report = pipeline().run(&mut graph).unwrap();
    assert_eq!(report.count("collapse-double-relu", "matched"), 1);
}
