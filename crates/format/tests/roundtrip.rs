//! Lossless conversion between the containers, byte-identical round trips, interoperability with
//! the `safetensors` reference crate, and a property test over random valid configs.

mod common;

use common::{build, rational_config, sample};
use iapt_format::{
    validate_bytes, Activation, Adapter, AdapterConfig, Container, DType, MetaValue, RationalConfig, RationalVariant, Role, SpecVersion,
};
use proptest::prelude::*;

fn reopen(bytes: &[u8]) -> Adapter {
    let v = validate_bytes(bytes);
    v.adapter.unwrap_or_else(|| panic!("re-read failed:\n{}", v.report))
}

fn assert_same(a: &Adapter, b: &Adapter) {
    assert_eq!(a.config(), b.config());
    assert_eq!(a.extras(), b.extras());
    assert_eq!(a.tensors().len(), b.tensors().len());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(x.name(), y.name());
        assert_eq!(x.dtype(), y.dtype());
        assert_eq!(x.shape(), y.shape());
        assert_eq!(x.bytes().unwrap(), y.bytes().unwrap(), "{}", x.name());
    }
}

fn with_provenance(mut a: Adapter) -> Adapter {
    a.set_extra("iapt.source.file", MetaValue::Str("adapter_model.bin".into())).unwrap();
    a.set_extra("iapt.source.sha256", MetaValue::Str("ab".repeat(32))).unwrap();
    a.set_extra("acme.steps", MetaValue::U64(123_456_789_012)).unwrap();
    a.set_extra("acme.lr", MetaValue::F32(3e-4)).unwrap();
    a.set_extra("acme.tags", MetaValue::Array(iapt_format::MetaType::Str, vec![MetaValue::Str("a".into()), MetaValue::Str("b".into())]))
        .unwrap();
    a
}

#[test]
fn safetensors_to_gguf_to_safetensors_is_byte_identical() {
    for dtype in DType::FLOATS {
        let a = with_provenance(build(&rational_config(), dtype, &[Role::PoolQuery], 3));
        let st = a.to_bytes(Container::Safetensors).unwrap();
        let g = reopen(&st).to_bytes(Container::Gguf).unwrap();
        let st2 = reopen(&g).to_bytes(Container::Safetensors).unwrap();
        assert!(st == st2, "{dtype}: safetensors -> gguf -> safetensors changed bytes");
        let g2 = reopen(&st2).to_bytes(Container::Gguf).unwrap();
        assert!(g == g2, "{dtype}: gguf -> safetensors -> gguf changed bytes");
        assert_same(&a, &reopen(&g));
    }
}

#[test]
fn files_on_disk_round_trip_through_save_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = with_provenance(sample());
    let st = dir.path().join("a.safetensors");
    let gg = dir.path().join("a.gguf");
    a.save(&st, Container::Safetensors).unwrap();
    Adapter::open(&st).unwrap().save(&gg, Container::Gguf).unwrap();
    let back = Adapter::open(&gg).unwrap();
    assert_same(&a, &back);
    assert_eq!(back.source().unwrap().1, Container::Gguf);
    // Content sniffing, not the extension, decides the container.
    let renamed = dir.path().join("actually-gguf.safetensors");
    std::fs::copy(&gg, &renamed).unwrap();
    assert_eq!(Adapter::open(&renamed).unwrap().source().unwrap().1, Container::Gguf);
}

#[test]
fn failed_save_leaves_existing_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    std::fs::write(&out, b"precious").unwrap();
    // Saving into a directory that does not exist fails before anything is renamed.
    let missing = dir.path().join("no/such/dir/out.gguf");
    assert!(sample().save(&missing, Container::Gguf).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left behind: {leftovers:?}");
}

#[test]
fn reference_safetensors_crate_reads_our_files() {
    let a = with_provenance(build(&rational_config(), DType::BF16, &[], 11));
    let bytes = a.to_bytes(Container::Safetensors).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("reference reader accepts our header");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference reader accepts our file");
    let md = meta.metadata().as_ref().expect("metadata present");
    for (k, v) in a.safetensors_metadata() {
        assert_eq!(md.get(&k), Some(&v), "{k}");
    }
    for t in a.tensors() {
        let view = st.tensor(&t.name().to_string()).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::BF16);
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, t.shape());
        assert_eq!(view.data(), &*t.bytes().unwrap());
    }
}

#[test]
fn we_read_files_written_by_the_reference_safetensors_crate() {
    let a = sample();
    let datas: Vec<(String, Vec<usize>, Vec<u8>)> = a
        .tensors()
        .iter()
        .map(|t| (t.name().to_string(), t.shape().iter().map(|&d| d as usize).collect(), t.bytes().unwrap().into_owned()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = datas
        .iter()
        .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    let meta: std::collections::HashMap<String, String> = a.safetensors_metadata().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    assert_same(&a, &reopen(&bytes));
}

fn arb_config() -> impl Strategy<Value = AdapterConfig> {
    let act = prop_oneof![
        (0usize..4, 0u32..=8, 0u32..=8, 1u32..=4).prop_map(|(v, m, n, g)| Activation::Rational(RationalConfig {
            variant: [RationalVariant::A, RationalVariant::B, RationalVariant::C, RationalVariant::D][v],
            numerator_degree: m,
            denominator_degree: n,
            groups: g,
        })),
        Just(Activation::Identity),
        Just(Activation::Relu),
        Just(Activation::Gelu),
        Just(Activation::GeluTanh),
        Just(Activation::Silu),
        Just(Activation::Tanh),
    ];
    (1u32..4, 1u32..12, 1u32..5, 1u32..4, act, -4.0f32..4.0, 0usize..3).prop_map(|(l, d, m, rmul, act, scale, arch)| {
        let groups = act.rational().map_or(1, |r| r.groups);
        AdapterConfig {
            spec_version: SpecVersion::V1_0,
            n_layer: l,
            n_embd: d,
            n_soft_tokens: m,
            bottleneck: groups * rmul,
            activation: act,
            pool_scale: scale,
            base_model_arch: ["llama", "qwen2", "gemma3"][arch].into(),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_valid_configs_round_trip(cfg in arb_config(), dtype in 0usize..3, shared_mask in 0u8..128, seed in any::<u64>()) {
        let shared: Vec<Role> = Role::ALL.iter().enumerate().filter(|(i, _)| shared_mask & (1 << i) != 0).map(|(_, r)| *r).collect();
        let a = build(&cfg, DType::FLOATS[dtype], &shared, seed);
        for c in [Container::Safetensors, Container::Gguf] {
            let bytes = a.to_bytes(c).unwrap();
            let b = reopen(&bytes);
            assert_same(&a, &b);
            prop_assert_eq!(b.to_bytes(c).unwrap(), bytes);
        }
    }
}

/// Q8_0 needs rows of whole blocks: a tensor with rows of 40 values cannot become Q8_0 (an error,
/// not a tensor of the wrong length); rows of 64 can, at 34 bytes per 32 values; and a Q8_0
/// adapter (both matrices quantized, spec 1.1) round-trips between the containers byte for byte.
#[test]
fn q8_0_needs_whole_blocks_and_round_trips() {
    let name = iapt_format::TensorName::layer(0, Role::DownWeight);
    let t = iapt_format::Tensor::from_f32(name, DType::F32, vec![2, 40], &[0.5; 80]).unwrap();
    assert_eq!(t.to_dtype(DType::Q8_0).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert!(iapt_format::Tensor::from_f32(name, DType::Q8_0, vec![2, 40], &[0.5; 80]).is_err());
    let t = iapt_format::Tensor::from_f32(name, DType::F32, vec![2, 64], &[0.5; 128]).unwrap();
    assert_eq!(t.to_dtype(DType::Q8_0).unwrap().byte_len(), 2 * 2 * 34);

    let cfg = AdapterConfig { n_embd: 64, bottleneck: 32, ..rational_config() };
    let a = build(&cfg, DType::F16, &[Role::UpWeight], 11).with_dtype(DType::Q8_0).unwrap();
    assert_eq!(a.config().spec_version, SpecVersion::V1_1);
    assert_eq!(a.tensors().iter().filter(|t| t.dtype() == DType::Q8_0).count(), 3, "two down.weight, one shared up.weight");
    let st = a.to_bytes(Container::Safetensors).unwrap();
    let g = reopen(&st).to_bytes(Container::Gguf).unwrap();
    assert!(reopen(&g).to_bytes(Container::Safetensors).unwrap() == st);
    assert_same(&a, &reopen(&g));
}
