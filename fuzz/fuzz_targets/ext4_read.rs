#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_ext4::read::fuzzing::ext4_read(data);
});
