//! A QR code's text or an opened link offer/answer, parsed and checked. See `natter_proto::fuzzing::link`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::link(data);
});
