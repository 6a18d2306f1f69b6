//! Issue 2 (GGUF interop): adapters written by iapt-format are parsed by llama.cpp's own GGUF parser
//! (`gguf_init_from_file`), and llama.cpp sees exactly the keys, types, values, tensor names,
//! shapes, types and data offsets that iapt-format's reader sees; the bytes at llama.cpp's offsets
//! are the tensor data iapt-format returns; Q8_0 matrices (spec 1.1) included.

use iapt_format::{Activation, Adapter, Container, DType, MetaValue, RationalConfig, RationalVariant, Role};
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_llama::{gguf_probe, GgufSummary, GgufValue};

fn rational(variant: RationalVariant, num: u32, den: u32, groups: u32) -> Activation {
    Activation::Rational(RationalConfig { variant, numerator_degree: num, denominator_degree: den, groups })
}

/// The configurations exercised: fixed and rational activations, every dtype, shared tensors, no
/// biases, and a zero-length `act.den` (denominator degree 0).
fn specs() -> Vec<(&'static str, AdapterSpec)> {
    let mut out = Vec::new();
    out.push(("fixed gelu f32", AdapterSpec::small(3, 16, 4, 8, Activation::Gelu)));
    let mut s = AdapterSpec::small(2, 32, 2, 8, rational(RationalVariant::B, 6, 5, 1));
    s.dtype = DType::F16;
    out.push(("rational B f16", s));
    let mut s = AdapterSpec::small(4, 16, 3, 4, rational(RationalVariant::A, 3, 2, 2));
    s.dtype = DType::BF16;
    s.shared = vec![Role::ActNum, Role::ActDen, Role::PoolQuery];
    out.push(("rational A bf16 shared", s));
    let mut s = AdapterSpec::small(2, 24, 4, 6, Activation::Silu);
    s.biases = false;
    s.shared = vec![Role::DownWeight, Role::UpWeight];
    out.push(("silu no biases shared projections", s));
    out.push(("rational C den degree 0", AdapterSpec::small(2, 16, 2, 4, rational(RationalVariant::C, 4, 0, 1))));
    out.push(("rational B den degree 0 (zero-length act.den)", AdapterSpec::small(2, 16, 2, 4, rational(RationalVariant::B, 4, 0, 1))));
    out
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Compares llama.cpp's view with iapt-format's; returns the first difference.
fn compare(label: &str, adapter: &Adapter, path: &std::path::Path, seen: &GgufSummary) {
    let reread = Adapter::open(path).unwrap_or_else(|e| panic!("{label}: iapt-format cannot re-read its own file: {e}"));
    assert_eq!(seen.version, iapt_format::GGUF_VERSION, "{label}: version");
    assert_eq!(seen.alignment as u64, iapt_format::GGUF_DEFAULT_ALIGNMENT, "{label}: alignment");
    assert_eq!(seen.data_offset % seen.alignment, 0, "{label}: data offset must be aligned");

    // Keys: same keys, same order, same GGUF types, same values.
    let meta = reread.gguf_metadata();
    let keys_seen: Vec<&str> = seen.kvs.iter().map(|k| k.key.as_str()).collect();
    let keys_ours: Vec<&str> = meta.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys_seen, keys_ours, "{label}: metadata keys");
    for (kv, (key, value)) in seen.kvs.iter().zip(&meta) {
        assert_eq!(kv.type_id, value.meta_type().gguf_id(), "{label}: type of {key}");
        match (&kv.value, value) {
            (GgufValue::Str(a), MetaValue::Str(b)) => assert_eq!(a, b, "{label}: value of {key}"),
            (GgufValue::U32(a), MetaValue::U32(b)) => assert_eq!(a, b, "{label}: value of {key}"),
            (GgufValue::F32(a), MetaValue::F32(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{label}: value of {key}"),
            (a, b) => panic!("{label}: {key}: llama.cpp sees {a:?}, iapt-format {b:?}"),
        }
    }

    // Tensors: same names in the same order, ne = reversed row-major shape, ggml type, offsets
    // that follow the aligned layout, and identical bytes.
    let bytes = std::fs::read(path).expect("read file");
    assert_eq!(seen.tensors.len(), reread.tensors().len(), "{label}: tensor count");
    let mut expect_offset = 0usize;
    for (t, ours) in seen.tensors.iter().zip(reread.tensors()) {
        assert_eq!(t.name, ours.name().to_string(), "{label}: tensor order/name");
        let mut ne = [1i64; 4];
        for (i, d) in ours.shape().iter().rev().enumerate() {
            ne[i] = *d as i64;
        }
        assert_eq!(t.ne, ne, "{label}: ne of {}", t.name);
        assert_eq!(t.ggml_type, ours.dtype().ggml_type(), "{label}: ggml type of {}", t.name);
        assert_eq!(t.size as u64, ours.byte_len(), "{label}: size of {}", t.name);
        assert_eq!(t.offset, expect_offset, "{label}: offset of {}", t.name);
        expect_offset = align_up(expect_offset + t.size, seen.alignment);
        let start = seen.data_offset + t.offset;
        let data = ours.bytes().expect("tensor bytes");
        assert_eq!(&bytes[start..start + t.size], &data[..], "{label}: data of {} at llama.cpp's offset", t.name);
        let original = adapter.tensors().iter().find(|o| o.name() == ours.name()).expect("same tensor set");
        assert_eq!(original.bytes().unwrap(), data, "{label}: data of {} round trip", t.name);
    }
    assert!(seen.data_offset + expect_offset <= bytes.len() + seen.alignment, "{label}: data section fits the file");
}

#[test]
fn llama_cpp_parser_sees_what_iapt_format_wrote() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (label, spec)) in specs().into_iter().enumerate() {
        let adapter = random_adapter(&spec, &mut Rng::new(100 + i as u64)).unwrap_or_else(|r| panic!("{label}: {r}"));
        let path = dir.path().join(format!("a{i}.gguf"));
        adapter.save(&path, Container::Gguf).unwrap();
        let seen = gguf_probe(&path).unwrap_or_else(|e| panic!("{label}: {e}"));
        compare(label, &adapter, &path, &seen);
    }
    // Spec 1.1: Q8_0 matrices (ggml type 8, blocks of 32 values in 34 bytes): llama.cpp's parser
    // sizes and places them as iapt-format wrote them.
    let spec = AdapterSpec::small(2, 64, 4, 32, Activation::Gelu);
    let q8 = random_adapter(&spec, &mut Rng::new(7)).unwrap().with_dtype(DType::Q8_0).unwrap();
    assert_eq!(q8.tensors().iter().filter(|t| t.dtype() == DType::Q8_0).count(), 4, "both matrices of both layers");
    let path = dir.path().join("q8_0.gguf");
    q8.save(&path, Container::Gguf).unwrap();
    compare("q8_0 matrices", &q8, &path, &gguf_probe(&path).unwrap_or_else(|e| panic!("q8_0: {e}")));
}

#[test]
fn zero_length_den_tensor_is_accepted_by_llama_cpp() {
    // Denominator degree 0 with variant B gives act.den of shape [G, 0]: ne = [0, G].
    let spec = AdapterSpec::small(1, 8, 1, 4, rational(RationalVariant::B, 2, 0, 1));
    let adapter = random_adapter(&spec, &mut Rng::new(5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("den0.gguf");
    adapter.save(&path, Container::Gguf).unwrap();
    let seen = gguf_probe(&path).expect("llama.cpp must accept a zero-size dimension");
    let den = seen.tensors.iter().find(|t| t.name == "iapt.blk.0.act.den").expect("act.den present");
    assert_eq!(den.ne, [0, 1, 1, 1]);
    assert_eq!(den.size, 0);
}

#[test]
fn llama_cpp_rejects_a_corrupt_adapter_with_an_error() {
    let adapter = random_adapter(&AdapterSpec::small(1, 8, 1, 4, Activation::Relu), &mut Rng::new(9)).unwrap();
    let mut bytes = adapter.to_bytes(Container::Gguf).unwrap();
    bytes.truncate(bytes.len() / 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = gguf_probe(&path).expect_err("truncated file");
    assert!(err.to_string().contains("rejected"), "{err}");
}
