#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_deliver::fuzzing::remote_hint(data);
});
