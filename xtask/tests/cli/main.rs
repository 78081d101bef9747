//! The command line as a user meets it: bad inputs exit non-zero with a
//! message naming the problem, and never panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use wick_tests::max_abs_diff;

mod errors;
mod graph;
mod run;
mod timing;

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Runs a command that must succeed and returns its output.
fn xtask_ok(args: &[&str]) -> Output {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that `output` (a command's stdout or stderr) holds every needle.
fn assert_contains(output: &[u8], needles: &[&str]) {
    let text = String::from_utf8_lossy(output);
    for needle in needles {
        assert!(text.contains(needle), "expected `{needle}` in:\n{text}");
    }
}

/// Asserts failure with `needle` in stderr and no panic.
fn assert_fails(args: &[&str], needle: &str) {
    let out = xtask(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in:\n{stderr}");
}

fn write_input(dir: &Path, name: &str, tensor: Tensor) -> String {
    let path = dir.join(name);
    candle_core::safetensors::save(&HashMap::from([("input".to_string(), tensor)]), &path).unwrap();
    path.display().to_string()
}

/// The CLI run with `args` and environment variable `key` set to `value`.
fn run_with_env(args: &[&str], key: &str, value: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env(key, value)
        .output()
        .unwrap()
}
