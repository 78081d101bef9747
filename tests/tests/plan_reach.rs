//! The model-scale graph generator (`wick_tests::fuzz_graph`,
//! `Scale::Model`, the `graph_diff_wide` fuzz target's) reaches what it
//! exists for: over seeded byte strings its graphs agree with the f64
//! reference, and the CPU plan, as the engine's debug log states it, takes
//! every conv kernel the small graphs cannot reach and, on a SIMD path,
//! fuses 1×1 convs into depthwise convs both ways. One test in its own
//! binary: the log is captured by the process's one subscriber (a scoped
//! one misses call sites another test thread reached first).

use std::sync::{Arc, Mutex};
use wick_engine::CpuPath;
use wick_tests::fuzz_graph::{check_bytes, seeded_strings, Scale};

/// The engine's debug log, kept in memory.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;

    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[test]
fn model_scale_graphs_agree_and_reach_the_large_kernels() {
    let log = Log::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(log.clone())
        .init();
    let strings = seeded_strings(200, 64);
    let mut compared = 0;
    for data in &strings {
        compared += check_bytes(data, Scale::Model).unwrap() as usize;
    }
    assert!(
        compared > 100,
        "only {compared} of {} graphs had a reference",
        strings.len()
    );
    let text = String::from_utf8(log.0.lock().expect("not poisoned").clone()).expect("utf-8 log");
    let mut wanted: Vec<String> = [
        "winograd-f4x4",
        "direct-panels",
        "direct-lanes",
        "depthwise",
        "pointwise",
        "pointwise-lanes",
        "pointwise-split",
        "gemv",
        "stem",
    ]
    .iter()
    .map(|kernel| format!("kernel=\"{kernel}\""))
    .collect();
    if CpuPath::selected().expect("a known path") != CpuPath::Scalar {
        wanted.push("conv runs inside its depthwise reader".into());
        wanted.push("1×1 conv runs inside the depthwise conv it reads".into());
    }
    for line in wanted {
        assert!(text.contains(&line), "no graph planned `{line}`");
    }
}
