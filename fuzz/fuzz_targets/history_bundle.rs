//! A decompressed history chunk, parsed and checked. See `natter_proto::fuzzing::history_bundle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::history_bundle(data);
});
