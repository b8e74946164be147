//! An app-state patch, snapshot or served collection, parsed and checked. See `natter_proto::fuzzing::app_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::app_state(data);
});
