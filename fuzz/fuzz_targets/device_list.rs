//! A `SignedDeviceList`, its content decoded and `validate()`d. See `natter_proto::fuzzing::device_list`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = natter_proto::fuzzing::device_list(data);
});
