//! Fuzzes the safetensors reader: the first two input bytes choose how much of the rest is the
//! JSON header, the remainder is the data buffer, so every run reaches the JSON and extent checks.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 9 && data[8] == b'{' {
        common::check(data);
        return;
    }
    if data.len() < 2 {
        return;
    }
    let rest = &data[2..];
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(rest.len());
    let mut v = (n as u64).to_le_bytes().to_vec();
    v.extend_from_slice(rest);
    common::check(&v);
});
