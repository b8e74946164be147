//! A refusal record's body, parsed and re-encoded. See `natter_proto::fuzzing::refusal`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::refusal(data);
});
