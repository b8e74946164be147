//! Records into `RecordReader`, a responder handshake and `SecureChannel::open_record`, or tampered
//! genuine traffic of an established channel. See `natter_proto::fuzzing::noise_records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::noise_records(data);
});
