//! Converts the checkpoints `converters/python/make_fixtures.py` wrote with real PyTorch and checks
//! every tensor bit for bit against the SHA-256 the script recorded (`fixtures/expected.json`), in
//! both containers, after writing and re-opening with full validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iapt_convert::{convert, convert_to_file, ConvertError, DTypeChoice, Options, PickleError, Profile, TorchZipError};
use iapt_format::{keys, Adapter, Container, DType, MetaValue, Role};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures")
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `expected.json`: fixture -> tensor name -> (dtype, shape, sha256, f16_sha256, f32_sha256).
fn expected(fixture: &str) -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all[fixture].as_object().unwrap_or_else(|| panic!("no {fixture} in expected.json")).clone().into_iter().collect()
}

/// Every fixture the script converts: (checkpoint, config, profile).
const CASES: [(&str, &str, &str); 8] = [
    ("ref_f32.pt", "ref_config.json", "reference"),
    ("ref_f32.safetensors", "ref_config.json", "reference"),
    ("ref_bf16.pt", "ref_bf16_config.json", "reference"),
    ("sharded_st/model.safetensors.index.json", "sharded_st/config.json", "reference"),
    ("sharded_bin/pytorch_model.bin.index.json", "sharded_bin/config.json", "reference"),
    ("views.pt", "views_config.json", "reference"),
    ("big_endian.pt", "ref_config.json", "reference"),
    ("blocks.pt", "blocks_config.json", "blocks"),
];

fn options(config: &str, profile: &str, dtype: DTypeChoice) -> Options {
    Options { config: Some(fixtures().join(config)), profile: Profile::load(profile).unwrap(), base: None, dtype }
}

/// Checks every tensor of `adapter` against the recorded hashes (`field` picks the dtype column).
fn check(adapter: &Adapter, fixture: &str, dtype: DTypeChoice) {
    let want = expected(fixture);
    let got: Vec<String> = adapter.tensors().iter().map(|t| t.name().to_string()).collect();
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted.iter().collect::<Vec<_>>(), names, "{fixture}: tensor set");
    for t in adapter.tensors() {
        let name = t.name().to_string();
        let w = &want[&name];
        let shape: Vec<u64> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.shape(), &shape[..], "{fixture}: {name} shape");
        let (dt, field) = match dtype {
            DTypeChoice::Keep => (DType::from_safetensors_name(w["dtype"].as_str().unwrap()).unwrap(), "sha256"),
            DTypeChoice::To(DType::F16) => (DType::F16, "f16_sha256"),
            DTypeChoice::To(DType::F32) => (DType::F32, "f32_sha256"),
            DTypeChoice::To(other) => panic!("no recorded hashes for {other}"),
        };
        assert_eq!(t.dtype(), dt, "{fixture}: {name} dtype");
        assert_eq!(sha(&t.bytes().unwrap()), w[field].as_str().unwrap(), "{fixture}: {name} bytes ({field})");
    }
}

#[test]
fn every_fixture_converts_bit_exact_in_every_dtype() {
    for (fixture, config, profile) in CASES {
        for dtype in [DTypeChoice::Keep, DTypeChoice::To(DType::F16), DTypeChoice::To(DType::F32)] {
            let conv = convert(&fixtures().join(fixture), &options(config, profile, dtype), &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{fixture}: {e}"));
            check(&conv.adapter, fixture, dtype);
        }
    }
}

#[test]
fn both_containers_round_trip_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, config, profile) in CASES {
        for container in [Container::Gguf, Container::Safetensors] {
            let out = dir.path().join(format!("out.{container}"));
            let conv = convert_to_file(&fixtures().join(fixture), &out, &options(config, profile, DTypeChoice::Keep), &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{fixture}: {e}"));
            let back = Adapter::open(&out).unwrap_or_else(|e| panic!("{fixture} ({container}): {e}"));
            check(&back, fixture, DTypeChoice::Keep);
            assert_eq!(back.config(), conv.adapter.config());
            let extra = |k: &str| back.extras().iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let file_name = Path::new(fixture).file_name().unwrap().to_str().unwrap();
            assert_eq!(extra(keys::SOURCE_FILE), Some(MetaValue::Str(file_name.into())));
            let src = std::fs::read(fixtures().join(fixture)).unwrap();
            assert_eq!(extra(keys::SOURCE_SHA256), Some(MetaValue::Str(sha(&src))));
            assert_eq!(extra(keys::CONVERTER_VERSION), Some(MetaValue::Str(iapt_convert::CONVERTER_VERSION.into())));
        }
    }
}

#[test]
fn configs_and_shapes_give_the_expected_hyperparameters() {
    let conv =
        convert(&fixtures().join("ref_bf16.pt"), &options("ref_bf16_config.json", "reference", DTypeChoice::Keep), &mut |_, _| {}).unwrap();
    let c = conv.adapter.config();
    assert_eq!((c.n_layer, c.n_embd, c.bottleneck, c.n_soft_tokens), (3, 48, 16, 4));
    let rc = c.activation.rational().unwrap();
    assert_eq!((rc.numerator_degree, rc.denominator_degree, rc.groups), (6, 5, 2));
    // One activation module for all layers: written once.
    assert_eq!(conv.shared, vec![Role::ActNum, Role::ActDen]);
    assert!(conv.adapter.is_shared(Role::ActNum) && !conv.adapter.is_shared(Role::DownWeight));

    let conv =
        convert(&fixtures().join("views.pt"), &options("views_config.json", "reference", DTypeChoice::Keep), &mut |_, _| {}).unwrap();
    let c = conv.adapter.config();
    assert_eq!((c.activation.name(), c.pool_scale, c.base_model_arch.as_str()), ("gelu", 0.5, "qwen2"));

    // Unmapped base-model weights and non-tensor buffers are reported, not converted.
    let conv =
        convert(&fixtures().join("ref_f32.pt"), &options("ref_config.json", "reference", DTypeChoice::Keep), &mut |_, _| {}).unwrap();
    assert!(conv.ignored.iter().any(|k| k.ends_with("layers.0.input_layernorm.weight")), "{:?}", conv.ignored);
    assert!(conv.ignored.iter().any(|k| k == "step"), "{:?}", conv.ignored);
}

#[test]
fn a_profile_file_path_works_like_its_builtin_name() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/profiles/blocks.json");
    let by_path = Profile::load(path.to_str().unwrap()).unwrap();
    assert_eq!(by_path, Profile::builtin("blocks").unwrap());
}

#[test]
fn malicious_pickle_is_refused_naming_the_global_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("evil.gguf");
    let err = convert_to_file(&fixtures().join("malicious.pt"), &out, &Options::default(), &mut |_, _| {}).unwrap_err();
    match &err {
        ConvertError::TorchZip { source: TorchZipError::Pickle(PickleError::ForbiddenGlobal { name, .. }), .. } => {
            assert_eq!(name, "posix.system")
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("posix.system"));
    assert!(!err.is_unreadable());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary left behind");
    assert!(!Path::new("/tmp/iapt-convert-pwned").exists(), "the payload must never run");
}

#[test]
fn legacy_torch_files_are_explained() {
    let err = convert(&fixtures().join("legacy.pt"), &Options::default(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ConvertError::LegacyTorch { .. }), "{err}");
    assert!(err.to_string().contains("torch.save(torch.load("), "{err}");
}

#[test]
fn missing_hyperparameters_are_named_with_how_to_give_them() {
    let err = convert(&fixtures().join("ref_f32.pt"), &Options::default(), &mut |_, _| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("base_model_arch") && msg.contains("--base"), "{msg}");
    assert!(msg.contains("activation.variant") && msg.contains("\"variant\""), "{msg}");
}

#[test]
fn the_wrong_profile_says_so() {
    let err = convert(&fixtures().join("blocks.pt"), &Options::default(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ConvertError::NoTensors { .. }), "{err}");
    assert!(err.to_string().contains("encoder."), "{err}");
}

#[test]
fn a_config_that_contradicts_the_shapes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        r#"{"n_soft_tokens": 4, "bottleneck": 9, "activation": {"kind": "rational", "variant": "B"}, "base_model_arch": "llama"}"#,
    )
    .unwrap();
    let opts = Options { config: Some(cfg), ..Options::default() };
    let err = convert(&fixtures().join("ref_f32.pt"), &opts, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("bottleneck"), "{err}");
}

#[test]
fn progress_reaches_the_total() {
    let mut last = (0, 1);
    convert(&fixtures().join("ref_f32.pt"), &options("ref_config.json", "reference", DTypeChoice::Keep), &mut |d, t| last = (d, t))
        .unwrap();
    assert_eq!(last.0, last.1);
    assert_eq!(last.1, 1192 * 4);
}

/// A base-model GGUF with only the three facts `--base` reads (no tensors).
fn base_gguf(dir: &Path, arch: &str, n_layer: u32, n_embd: u32) -> PathBuf {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    let key = |b: &mut Vec<u8>, k: &str| {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
    };
    key(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    key(&mut b, arch);
    for (k, v) in [(format!("{arch}.block_count"), n_layer), (format!("{arch}.embedding_length"), n_embd)] {
        key(&mut b, &k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    let path = dir.join(format!("base-{arch}-{n_layer}-{n_embd}.gguf"));
    std::fs::write(&path, b).unwrap();
    path
}

#[test]
fn base_model_fills_and_checks_arch_layers_and_width() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"activation": {"kind": "rational", "variant": "B"}}"#).unwrap();
    let with_base = |arch: &str, n_layer: u32, n_embd: u32| Options {
        config: Some(cfg.clone()),
        base: Some(iapt_format::BaseModelInfo::read(&base_gguf(dir.path(), arch, n_layer, n_embd)).unwrap()),
        ..Options::default()
    };
    let conv = convert(&fixtures().join("ref_f32.pt"), &with_base("mistral", 2, 32), &mut |_, _| {}).unwrap();
    assert_eq!(conv.adapter.config().base_model_arch, "mistral");
    check(&conv.adapter, "ref_f32.pt", DTypeChoice::Keep);
    let err = convert(&fixtures().join("ref_f32.pt"), &with_base("llama", 32, 32), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("n_layer") && err.to_string().contains("--base"), "{err}");
    let err = convert(&fixtures().join("ref_f32.pt"), &with_base("llama", 2, 4096), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("n_embd"), "{err}");
}

#[test]
fn every_shipped_profile_is_built_in() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/profiles");
    let mut shipped = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        shipped += 1;
        let name = path.file_stem().unwrap().to_str().unwrap();
        let builtin = iapt_convert::BUILTIN_PROFILES.iter().find(|(n, _)| *n == name);
        assert_eq!(builtin.map(|(_, text)| *text), Some(std::fs::read_to_string(&path).unwrap().as_str()), "{name}");
        assert_eq!(Profile::load(name).unwrap().name(), name, "a profile's name is its file stem");
    }
    assert_eq!(shipped, iapt_convert::BUILTIN_PROFILES.len());
}
