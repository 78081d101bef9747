//! `wick_onnx::import_bytes` on arbitrary bytes (a `ModelProto` or not),
//! then verify, passes, compile and run of whatever imports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wick_ir::Limits;

fuzz_target!(|data: &[u8]| {
    let _ = wick_tests::hostile::onnx_bytes_pipeline(data, &Limits::default().with_max_elements(1 << 12));
});
