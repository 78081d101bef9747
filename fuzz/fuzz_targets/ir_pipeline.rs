//! IR text -> parse -> verify -> default passes -> compile -> run, on small
//! tensors (at most 2^12 elements each, so every run is quick). Any panic,
//! abort or sanitizer report is a finding; typed errors are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wick_ir::Limits;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wick_tests::hostile::ir_text_pipeline(text, &Limits::default().with_max_elements(1 << 12));
    }
});
