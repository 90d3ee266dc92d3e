//! See `ferry_sync::fuzzing::sender`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_sync::fuzzing::sender(data));
