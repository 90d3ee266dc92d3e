//! See `ferry_sync::fuzzing::receiver`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_sync::fuzzing::receiver(data));
