#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyrelay::fuzzing::relay_forward(data));
