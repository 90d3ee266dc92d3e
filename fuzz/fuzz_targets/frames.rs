//! See `ferry_sync::fuzzing::frames`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_sync::fuzzing::frames(data));
