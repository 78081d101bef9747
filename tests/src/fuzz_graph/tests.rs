//! The small generator's reach, and agreement on what it draws (the
//! model-scale one's: `tests/tests/plan_reach.rs`).

use super::*;
use std::collections::BTreeSet;

/// Every byte string gives a valid graph; over a few thousand seeded
/// strings every op kind appears and wick agrees with the reference.
#[test]
fn generated_graphs_are_valid_and_agree() {
    let mut seen = BTreeSet::new();
    let mut compared = 0;
    for data in seeded_strings(300, 48) {
        seen.extend(op_kinds(&data, Scale::Small));
        compared += check_bytes(&data, Scale::Small).unwrap() as usize;
    }
    for kind in [
        "conv2d",
        "batch_norm",
        "relu",
        "add",
        "max_pool2d",
        "concat",
        "avg_pool2d",
        "global_avg_pool2d",
        "mul",
        "pad",
        "flatten",
        "linear",
    ] {
        assert!(seen.contains(kind), "{kind} never generated: {seen:?}");
    }
    assert!(compared > 100, "only {compared} of 300 graphs had a reference");
}
