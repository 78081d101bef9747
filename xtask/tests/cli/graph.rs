//! `graph`: the printed IR parses back, the JSON report counts the
//! fusions, the DOT output and the text report.

use super::*;

/// `graph` prints text that `ir` reads back unchanged.
#[test]
fn graph_output_parses_back() {
    let out = xtask(&["graph", "toy-sequential", "--batch", "3"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.ir");
    std::fs::write(&path, &out.stdout).unwrap();
    let again = xtask_ok(&["ir", path.to_str().unwrap()]);
    assert_eq!(again.stdout, out.stdout);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("graph toy-sequential(%x: f32[3,3,28,28]) {"));
}

/// `graph --passes default --json` reports 3 / 2 / 20 fusions in the documented schema.
#[test]
fn graph_json_reports_fusions() {
    for (model, expected) in [("toy", 3), ("toy-sequential", 2), ("resnet18", 20)] {
        let out = xtask_ok(&["graph", model, "--passes", "default", "--json", "--batch", "1"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["model"], model);
        let fuse = &json["passes"][0];
        assert_eq!(fuse["name"], "fuse-conv-batch-norm");
        assert_eq!(fuse["changed"], true);
        assert_eq!(fuse["counters"]["matched"], expected);
        assert!(fuse["nodes_before"].as_u64().unwrap() < fuse["nodes_after"].as_u64().unwrap());
        let names: Vec<&str> = json["passes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "fuse-conv-batch-norm",
                "fuse-conv-add-relu",
                "fuse-conv-relu",
                "fuse-conv-activation",
                "fuse-conv-add",
                "fuse-conv-max-pool",
                "fuse-conv-input-scale",
                "eliminate-dead-code"
            ]
        );
    }
}

/// `--report` prints the fused IR then the pass table; `--dot` writes Graphviz with fused nodes marked.
#[test]
fn graph_report_and_dot() {
    let dir = tempfile::tempdir().unwrap();
    let dot = dir.path().join("toy.dot");
    let out = xtask(&[
        "graph",
        "toy",
        "--passes",
        "default",
        "--report",
        "--dot",
        dot.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("batch_norm"), "{stdout}");
    assert!(
        stdout.contains("fuse-conv-batch-norm") && stdout.contains("matched=3"),
        "{stdout}"
    );
    let dot = std::fs::read_to_string(dot).unwrap();
    assert_eq!(dot.matches("xlabel=\"fused\"").count(), 3, "{dot}");
}
