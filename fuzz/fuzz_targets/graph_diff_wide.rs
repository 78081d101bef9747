//! Differential at models' sizes: bytes -> a valid graph of ResNets' and
//! MobileNets' channel counts, planes and blocks (within a multiply-add
//! budget) -> default passes -> wick's f32 CPU kernels, against the
//! unfused graph in f64 on candle's ops: the kernel choices only large
//! convs take (`graph_diff`'s graphs are too small for them). A
//! disagreement beyond 1e-3 of the output's scale, an error on a valid
//! graph, or a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wick_tests::fuzz_graph::{check_bytes, Scale};

fuzz_target!(|data: &[u8]| {
    if let Err(message) = check_bytes(data, Scale::Model) {
        panic!("{message}");
    }
});
