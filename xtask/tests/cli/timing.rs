//! `bench`, `throughput`, `peak`, `compare` and the environment
//! switches (`WICK_ISA`, `WICK_CACHES`, `WICK_BATCH_TILING`).

use super::*;

/// `bench --json` writes the documented schema, consistent with itself.
#[test]
fn bench_json_schema() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = xtask_ok(&[
        "bench",
        "toy-sequential",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["model"], "toy-sequential");
    assert_eq!(json["batch"], 1);
    assert_eq!(json["device"], "cpu");
    let source = json["caches"]["source"].as_str().unwrap();
    assert!(["sysfs", "fallback"].contains(&source), "{source}");
    assert_eq!(json["caches"]["detected"], source == "sysfs");
    // 2 convs: 16x24x24 outputs x 3*5*5 MACs, 32x18x18 x 16*7*7, x2 FLOPs.
    let flops = 2.0 * (16.0 * 576.0 * 75.0 + 32.0 * 324.0 * 784.0);
    assert!((json["gflop_per_forward"].as_f64().unwrap() - flops / 1e9).abs() < 1e-12);
    let modes = json["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["candle-eager", "wick-unfused", "wick"]);
    for mode in modes {
        let (min, median, max) = (
            mode["min_ms"].as_f64().unwrap(),
            mode["median_ms"].as_f64().unwrap(),
            mode["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{mode}");
        assert!(mode["peak_rss_mib"].as_f64().unwrap() > 0.0);
        assert!(mode["compile_ms"].as_f64().unwrap() >= 0.0);
        assert!(mode["max_abs_diff_vs_eager"].as_f64().unwrap() < 1e-4);
    }
    assert_eq!(json["passes"][0]["counters"]["matched"], 2);
    assert_contains(&out.stdout, &["candle-eager", "fuse-conv-batch-norm [matched=2]"]);
}

/// A mode whose output is wrong makes the bench exit non-zero, naming the mode.
#[test]
fn bench_fails_on_wrong_output() {
    assert_fails(
        &[
            "bench",
            "toy",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--inject-fault",
            "wick-unfused",
        ],
        "outputs disagree with the reference",
    );
}

/// `throughput` reports images/s for each number of caller threads.
#[test]
fn throughput_reports_each_thread_count() {
    let out = xtask_ok(&["throughput", "toy", "--seconds", "0.2", "--threads", "1,2"]);
    assert_contains(&out.stdout, &["threads 1: ", "threads 2: "]);
}

/// `WICK_ISA` forces the CPU kernels' path: every path this CPU has runs
/// and says so; an unknown name is a typed error, exit 1.
#[test]
fn wick_isa_forces_a_path() {
    for path in wick_engine::CpuPath::available() {
        let out = run_with_env(&["run", "toy-sequential"], wick_engine::ISA_ENV, path.name());
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
        assert_contains(&out.stdout, &[&format!("path: {path})")]);
    }
    let out = run_with_env(&["run", "toy"], wick_engine::ISA_ENV, "sse2");
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&out.stderr, &["unknown CPU path `sse2`"]);
}

/// `WICK_CACHES` sizes the kernels' blocks for other caches (and `bench`
/// says so); text that does not parse or a size out of range is a typed
/// error, exit 1, naming it.
#[test]
fn wick_caches_replace_the_detected_sizes() {
    for given in ["l1d=32K, l2=512K", " "] {
        let out = run_with_env(&["run", "toy"], wick_engine::CACHES_ENV, given);
        assert!(
            out.status.success(),
            "`{given}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_env(
        &["bench", "toy", "--modes", "wick", "--iters", "1", "--warmup", "0"],
        wick_engine::CACHES_ENV,
        "l2=512K,l3=0",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_contains(&out.stdout, &["L2 512 KiB / L3 0 KiB (given)"]);
    for (given, expected) in [
        ("l2=1K", "cache l2 of 1024 bytes is outside"),
        ("l2=lots", "invalid cache sizes `l2=lots`: `lots` is not a size"),
        ("l5=1M", "unknown cache `l5`"),
    ] {
        let out = run_with_env(&["run", "toy"], wick_engine::CACHES_ENV, given);
        assert_eq!(out.status.code(), Some(1), "{given}");
        assert_contains(&out.stderr, &[expected]);
    }
}

/// `WICK_BATCH_TILING` takes `on` or `off`; anything else is a typed
/// error at compile, exit 1, naming what was given.
#[test]
fn wick_batch_tiling_switch() {
    for value in ["on", "off"] {
        let out = run_with_env(&["run", "toy"], wick_engine::BATCH_TILING_ENV, value);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_env(&["run", "toy"], wick_engine::BATCH_TILING_ENV, "sometimes");
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&out.stderr, &["invalid batch tiling `sometimes`"]);
}

/// `peak` measures every path this CPU has and the panel product's rate on
/// each shape asked for (no rate is asserted); a malformed shape is a
/// one-line usage error.
#[test]
fn peak_lists_every_available_path() {
    let out = xtask_ok(&[
        "peak",
        "--seconds",
        "0.01",
        "--threads",
        "1",
        "--read-mib",
        "1",
        "--gemm",
        "16x8x32,6x3x20",
    ]);
    let names: Vec<&str> = wick_engine::CpuPath::available().iter().map(|p| p.name()).collect();
    assert_contains(&out.stdout, &names);
    assert_contains(
        &out.stdout,
        &[
            "GFLOP/s",
            "caches L1d",
            "read GB/s",
            "panel product",
            "16x8x32",
            "6x3x20",
        ],
    );
    for bad in ["16x8", "16x0x32", "16xax32"] {
        let out = xtask(&["peak", "--gemm", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert_contains(&out.stderr, &["ROWSxDEPTHxCOLS"]);
    }
}

/// `compare` times two engine settings of one model interleaved and names
/// the ratio; a setting it cannot take is a named error.
#[test]
fn compare_reports_the_ratio_and_refuses_bad_settings() {
    let out = xtask_ok(&[
        "compare",
        "toy",
        "--forwards",
        "4",
        "--warmup",
        "1",
        "--b-passes",
        "none",
        "--b-isa",
        "scalar",
    ]);
    assert_contains(
        &out.stdout,
        &[
            "A default, B passes none, isa scalar",
            "B/A: ratio of medians",
            "(4 pairs)",
        ],
    );
    assert_fails(&["compare", "toy", "--b-isa", "neon"], "unknown CPU path `neon`");
    assert_fails(
        &["compare", "toy", "--b-batch-tiling", "maybe"],
        "--b-batch-tiling takes `on` or `off`",
    );
    assert_fails(&["compare", "toy", "--b-spin", "fast"], "--b-spin takes `on` or `off`");
    assert_fails(&["compare", "toy", "--b-weight-budget", "0.5"], "invalid weight budget");
}
