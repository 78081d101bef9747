//! Open Inference Protocol requests: arbitrary bytes as an inference
//! request (JSON, or a JSON header and binary tensor data) decoded for a
//! two-input model, and the response to what decoded encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wick_serve::fuzzing::request_round_trip(data);
});
