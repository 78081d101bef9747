//! Write a rewrite with wick's pattern API, register it at the `end` point
//! of the default pipeline (torch.compile's `post_grad_custom_post_pass`),
//! and run it on a graph written as IR text:
//!
//! ```sh
//! cargo run -p wick-custom-pass
//! ```
//!
//! Property-testing such a pass on random graphs takes a few lines with
//! `wick_tests::harness` (see `tests/tests/user_pass_example.rs`).

use anyhow::Result;
use wick_ir::{Graph, OpKind};
use wick_passes::{EliminateDeadCode, ExtensionPoint, PassManager, PatternBuilder, PatternPass, Replacement};

/// relu(relu(x)) ⇒ relu(x).
fn collapse_double_relu() -> Result<PatternPass> {
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let inner = p.op("inner", OpKind::Relu, &[x]);
    let outer = p.op("outer", OpKind::Relu, &[inner]);
    let pattern = p.build(outer)?;
    Ok(PatternPass::new("collapse-double-relu")
        .register_replacement(pattern, |found, _rewriter| Ok(Replacement::With(found.node("inner")?))))
}

fn main() -> Result<()> {
    let mut graph = Graph::parse(
        "graph demo(%x: f32[2,8]) {
  %a = relu(%x) : f32[2,8]
  %b = relu(%a) : f32[2,8]
  %c = add(%b, %x) : f32[2,8]
  return %c
}",
    )?;
    let mut pipeline = PassManager::default_pipeline();
    pipeline.register_at(ExtensionPoint::End, collapse_double_relu()?)?;
    // The built-in DCE ran before `end`; clean up after our rewrite too.
    pipeline.register_at(ExtensionPoint::End, EliminateDeadCode)?;
    let report = pipeline.run(&mut graph)?;
    print!("{graph}\n{report}");
    assert_eq!(report.count("collapse-double-relu", "matched"), 1);
    Ok(())
}
