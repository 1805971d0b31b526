#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_nbd::fuzzing::session(data);
});
