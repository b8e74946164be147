//! A byte stream, split as its first byte says, into `FrameDecoder` until an error or the end. See `natter_proto::fuzzing::frame_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::frame_stream(data);
});
