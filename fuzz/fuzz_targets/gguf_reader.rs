//! Fuzzes the GGUF reader: inputs are forced to start with the GGUF magic so that every run
//! exercises the GGUF path (version, metadata, tensor infos, extents).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"GGUF") {
        common::check(data);
    } else {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(data);
        common::check(&v);
    }
});
