//! Safetensors weight loading: arbitrary bytes as toy-sequential's
//! weights, then trace, passes, compile and run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wick_tests::hostile::weights_pipeline(data);
});
