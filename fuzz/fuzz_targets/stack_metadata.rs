//! Fuzz the ASIF metadata block that carries a layer's stack information.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| diskkit::fuzzing::stack_metadata(data));
