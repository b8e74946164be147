//! One frame's protobuf bytes into `decode_frame` (limits checked). See `natter_proto::fuzzing::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::frame(data);
});
