//! `saved::from_bytes` (the checks of `saved::load`) on arbitrary bytes
//! split into graph text and weights, then passes, compile and run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wick_ir::Limits;

fuzz_target!(|data: &[u8]| {
    let _ = wick_tests::hostile::saved_bytes_pipeline(data, &Limits::default().with_max_elements(1 << 12));
});
