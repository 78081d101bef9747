//! The service's image preprocessing (decode with limits, resize, crop,
//! normalise) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wick_serve::preprocess(data);
});
