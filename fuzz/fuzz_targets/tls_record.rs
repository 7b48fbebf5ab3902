#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyrelay::fuzzing::tls_record(data));
