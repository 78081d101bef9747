//! Differential: bytes -> a small valid graph (any groups, kernel, stride,
//! dilation, padding per axis; pools; a linear head) -> default passes ->
//! wick's f32 CPU kernels, against the unfused graph in f64 on candle's
//! ops. A disagreement beyond 1e-3 of the output's scale, an error on a
//! valid graph, or a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wick_tests::fuzz_graph::{check_bytes, Scale};

fuzz_target!(|data: &[u8]| {
    if let Err(message) = check_bytes(data, Scale::Small) {
        panic!("{message}");
    }
});
