//! Size bombs (issue 27, finding 9: the readers' defences that held, kept as regression tests): a
//! GGUF whose metadata declares a 2^40-element array, a GGUF tensor with absurd dimensions, and a
//! safetensors file whose tensor offsets run past its end. Each is a few dozen bytes; each must be
//! refused with a finding in well under a second without the process growing past a few MiB
//! (the peak resident size, `VmHWM`, measured around the three reads; this binary holds this one
//! test, so nothing else allocates meanwhile). libiapt and the server read adapters through the same
//! reader (`Adapter::open`, `validate_bytes`).

use std::time::{Duration, Instant};

use iapt_format::validate_bytes;

/// The process's peak resident size, in KiB.
fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn gguf_header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn gguf_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A metadata array of 2^40 u32 values, of which the file holds none.
fn gguf_huge_array() -> Vec<u8> {
    let mut b = gguf_header(0, 1);
    gguf_string(&mut b, "iapt.bomb");
    b.extend(9u32.to_le_bytes()); // GGUF_TYPE_ARRAY
    b.extend(4u32.to_le_bytes()); // of UINT32
    b.extend((1u64 << 40).to_le_bytes());
    b
}

/// One tensor of 2^40 x 2^40 F32 elements.
fn gguf_absurd_dims() -> Vec<u8> {
    let mut b = gguf_header(1, 0);
    gguf_string(&mut b, "iapt.blk.0.down.weight");
    b.extend(2u32.to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(0u64.to_le_bytes());
    b
}

/// A safetensors tensor of 2^40 F32 elements whose data would end 4 TiB past the header.
fn safetensors_offsets_past_the_end() -> Vec<u8> {
    let header = r#"{"iapt.blk.0.down.weight":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b
}

#[test]
fn size_bombs_are_refused_fast_and_small() {
    let before = peak_kib();
    for (name, bytes) in [
        ("GGUF array of 2^40 elements", gguf_huge_array()),
        ("GGUF tensor of 2^40 x 2^40", gguf_absurd_dims()),
        ("safetensors offsets past the file", safetensors_offsets_past_the_end()),
    ] {
        assert!(bytes.len() < 256, "{name}: {} bytes", bytes.len());
        let t0 = Instant::now();
        let v = validate_bytes(&bytes);
        let dt = t0.elapsed();
        assert!(v.adapter.is_none() && v.report.has_errors(), "{name}: accepted");
        assert!(dt < Duration::from_secs(1), "{name}: {dt:?}");
        eprintln!("{name}: refused in {dt:?}: {}", v.report.to_string().lines().next().unwrap_or(""));
    }
    let grown = peak_kib().saturating_sub(before);
    assert!(grown < 4 * 1024, "the peak resident size grew by {grown} KiB reading three bombs");
}
