//! Fuzz the safetensors header parser: any input must give Ok or a HeaderError, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mergesmith::checkpoint::header::parse(data);
});
