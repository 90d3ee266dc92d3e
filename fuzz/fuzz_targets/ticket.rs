//! See `ferry_transport::fuzzing::ticket`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_transport::fuzzing::ticket(data));
