//! An envelope's plaintext into `Content::decode` and the client's field checks. See `natter_proto::fuzzing::content`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::content(data);
});
