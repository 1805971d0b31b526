#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = diskkit_deliver::fuzzing::bundle_read(data);
});
