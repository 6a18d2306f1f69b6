//! One broken file per validation rule of spec v1, in both containers where the rule applies: each
//! must be reported with its code, and the file must be refused (warnings: accepted). The same
//! files are committed under `tests/broken/` (with `expected.json`) for the CLI tests; this test
//! checks the committed copies still match the generator (`IAPT_BLESS=1` rewrites them).

mod common;

use std::path::PathBuf;

use common::{raw_tensors, sample};
use iapt_format::raw::{write_gguf, write_safetensors, RawTensorOut};
use iapt_format::{keys, validate_bytes, validate_file, Adapter, BaseModelInfo, Code, Container, MetaValue};

struct Case {
    file: String,
    code: Code,
    bytes: Vec<u8>,
}

fn gguf_meta(a: &Adapter) -> Vec<(String, MetaValue)> {
    a.gguf_metadata()
}

fn st_meta(a: &Adapter) -> Vec<(String, String)> {
    a.safetensors_metadata()
}

/// Both containers with metadata edited the same way (typed for GGUF, text for safetensors).
fn both_meta(a: &Adapter, name: &str, code: Code, edit: impl Fn(&mut Vec<(String, MetaValue)>)) -> Vec<Case> {
    let mut g = gguf_meta(a);
    edit(&mut g);
    let mut s: Vec<(String, MetaValue)> = a.config().to_metadata();
    s.extend(a.extras().iter().cloned());
    edit(&mut s);
    let s: Vec<(String, String)> = s
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), keys::GENERAL_TYPE | keys::ADAPTER_TYPE | keys::GENERAL_ARCHITECTURE))
        .map(|(k, v)| (k, v.to_text()))
        .collect();
    let t = raw_tensors(a);
    vec![
        Case { file: format!("{name}.gguf"), code, bytes: write_gguf(&g, &t) },
        Case { file: format!("{name}.safetensors"), code, bytes: write_safetensors(&s, &t) },
    ]
}

fn both_tensors(a: &Adapter, name: &str, code: Code, edit: impl Fn(&mut Vec<RawTensorOut>)) -> Vec<Case> {
    let mut t = raw_tensors(a);
    edit(&mut t);
    vec![
        Case { file: format!("{name}.gguf"), code, bytes: write_gguf(&gguf_meta(a), &t) },
        Case { file: format!("{name}.safetensors"), code, bytes: write_safetensors(&st_meta(a), &t) },
    ]
}

fn set(m: &mut Vec<(String, MetaValue)>, key: &str, v: MetaValue) {
    match m.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => m.push((key.to_owned(), v)),
    }
}

#[allow(clippy::vec_init_then_push)]
fn cases() -> Vec<Case> {
    let a = sample();
    let good_g = a.to_bytes(Container::Gguf).unwrap();
    let good_s = a.to_bytes(Container::Safetensors).unwrap();
    let mut out = Vec::new();

    // E002: truncated inside the data, and inside the header.
    out.push(Case { file: "E002-truncated-data.gguf".into(), code: Code::Truncated, bytes: good_g[..good_g.len() - 40].to_vec() });
    out.push(Case { file: "E002-truncated-data.safetensors".into(), code: Code::Truncated, bytes: good_s[..good_s.len() - 5].to_vec() });
    out.push(Case { file: "E002-truncated-header.gguf".into(), code: Code::Truncated, bytes: good_g[..60].to_vec() });
    out.push(Case { file: "E002-truncated-header.safetensors".into(), code: Code::Truncated, bytes: good_s[..30].to_vec() });
    // E003: neither container.
    out.push(Case {
        file: "E003-unknown-container.bin".into(),
        code: Code::UnknownContainer,
        bytes: b"PK\x03\x04 this is a zip, not an adapter".to_vec(),
    });
    // E004: malformed headers.
    let mut bad_json = Vec::new();
    let text = b"{\"__metadata__\": {\"a\": \"b\"}, oops}";
    bad_json.extend_from_slice(&(text.len() as u64).to_le_bytes());
    bad_json.extend_from_slice(text);
    out.push(Case { file: "E004-malformed-header.safetensors".into(), code: Code::MalformedHeader, bytes: bad_json });
    let mut g = good_g.clone();
    // The first key's type id sits after magic(4) version(4) counts(16) key length(8) key bytes.
    let klen = u64::from_le_bytes(g[24..32].try_into().unwrap()) as usize;
    g[32 + klen..36 + klen].copy_from_slice(&99u32.to_le_bytes());
    out.push(Case { file: "E004-malformed-header.gguf".into(), code: Code::MalformedHeader, bytes: g });
    // E005: a tensor whose data length disagrees with dtype x shape (overlap in GGUF, size in safetensors).
    out.extend(both_tensors(&a, "E005-bad-offsets", Code::BadOffsets, |t| {
        let n = t[0].data.len() - 64;
        t[0].data.truncate(n);
    }));
    // E006: GGUF version 2.
    let mut g = good_g.clone();
    g[4..8].copy_from_slice(&2u32.to_le_bytes());
    out.push(Case { file: "E006-gguf-version.gguf".into(), code: Code::UnsupportedContainerVersion, bytes: g });
    // E007: duplicate metadata key.
    let mut m = gguf_meta(&a);
    m.push((keys::N_LAYER.into(), MetaValue::U32(2)));
    out.push(Case { file: "E007-duplicate-key.gguf".into(), code: Code::DuplicateKey, bytes: write_gguf(&m, &raw_tensors(&a)) });
    out.push(Case { file: "E007-duplicate-key.safetensors".into(), code: Code::DuplicateKey, bytes: duplicate_st_key(&good_s) });

    out.extend(both_meta(&a, "E101-missing-key", Code::MissingKey, |m| m.retain(|(k, _)| k != keys::N_EMBD)));
    out.extend(both_meta(&a, "E102-bad-key-type", Code::BadKeyType, |m| set(m, keys::N_LAYER, MetaValue::Str("two".into()))));
    out.extend(both_meta(&a, "E103-bad-key-value", Code::BadKeyValue, |m| set(m, keys::POOL_TYPE, MetaValue::Str("mean".into()))));
    out.extend(both_meta(&a, "E104-unknown-spec-major", Code::UnknownSpecMajor, |m| {
        set(m, keys::SPEC_VERSION, MetaValue::Str("2.0".into()))
    }));
    out.extend(both_meta(&a, "E105-unknown-activation", Code::UnknownActivation, |m| {
        set(m, keys::ACTIVATION, MetaValue::Str("swish".into()))
    }));
    out.extend(both_meta(&a, "E106-unknown-rational-variant", Code::UnknownRationalVariant, |m| {
        set(m, keys::RATIONAL_VARIANT, MetaValue::Str("E".into()))
    }));
    out.extend(both_meta(&a, "E107-degree-out-of-range", Code::DegreeOutOfRange, |m| set(m, keys::RATIONAL_NUM_DEGREE, MetaValue::U32(9))));
    out.extend(both_meta(&a, "E108-groups-do-not-divide", Code::GroupsDoNotDivide, |m| set(m, keys::RATIONAL_GROUPS, MetaValue::U32(3))));
    let mut m = gguf_meta(&a);
    set(&mut m, keys::GENERAL_TYPE, MetaValue::Str("model".into()));
    out.push(Case { file: "E109-bad-container-key.gguf".into(), code: Code::BadContainerKey, bytes: write_gguf(&m, &raw_tensors(&a)) });

    out.extend(both_tensors(&a, "E201-missing-tensor", Code::MissingTensor, |t| t.retain(|x| x.name != "iapt.blk.1.up.weight")));
    out.extend(both_tensors(&a, "E202-unexpected-tensor", Code::UnexpectedTensor, |t| {
        let mut extra = t[0].clone();
        extra.name = "lm_head.weight".into();
        t.push(extra);
    }));
    let mut t = raw_tensors(&a);
    t.push(t[0].clone());
    out.push(Case { file: "E203-duplicate-tensor.gguf".into(), code: Code::DuplicateTensor, bytes: write_gguf(&gguf_meta(&a), &t) });
    out.push(Case { file: "E203-duplicate-tensor.safetensors".into(), code: Code::DuplicateTensor, bytes: duplicate_st_tensor(&good_s) });
    out.extend(both_tensors(&a, "E204-shared-and-per-layer", Code::SharedAndPerLayer, |t| {
        let mut s = t.iter().find(|x| x.name == "iapt.blk.0.pool.query").unwrap().clone();
        s.name = "iapt.shared.pool.query".into();
        t.push(s);
    }));
    out.extend(both_tensors(&a, "E205-shape-mismatch", Code::ShapeMismatch, |t| {
        let x = t.iter_mut().find(|x| x.name == "iapt.blk.0.down.weight").unwrap();
        x.shape.reverse();
    }));
    out.extend(both_tensors(&a, "E206-dtype-not-allowed", Code::DTypeNotAllowed, |t| {
        let x = t.iter_mut().find(|x| x.name == "iapt.blk.0.up.bias").unwrap();
        // I32 in both containers (ggml type 26): 4 bytes per element like F32.
        x.ggml_type = 26;
        x.st_dtype = "I32".into();
    }));
    out.extend(both_tensors(&a, "E207-non-finite", Code::NonFinite, |t| {
        let x = t.iter_mut().find(|x| x.name == "iapt.blk.1.pool.query").unwrap();
        x.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    }));
    // E206 also: a Q8_0 matrix in a file that says 1.0 (spec 1.1 feature). The sample's rows (8
    // values) cannot be Q8_0, so this file has d = 32.
    let q = q8_sample();
    let q8_10 = |c: Container| {
        let mut m = if c == Container::Gguf { gguf_meta(&q) } else { q.config().to_metadata() };
        set(&mut m, keys::SPEC_VERSION, MetaValue::Str("1.0".into()));
        let t = raw_tensors(&q);
        match c {
            Container::Gguf => write_gguf(&m, &t),
            Container::Safetensors => write_safetensors(&m.into_iter().map(|(k, v)| (k, v.to_text())).collect::<Vec<_>>(), &st_q8(&t)),
        }
    };
    out.push(Case { file: "E206-q8-in-1.0-file.gguf".into(), code: Code::DTypeNotAllowed, bytes: q8_10(Container::Gguf) });
    out.push(Case { file: "E206-q8-in-1.0-file.safetensors".into(), code: Code::DTypeNotAllowed, bytes: q8_10(Container::Safetensors) });
    // E208: Q8_0 on rows of 8 values (GGUF: ggml type 8 with ne[0] = 8; safetensors: an I8 matrix
    // of 8 columns with its scales), in a file that says 1.1.
    let mut t = raw_tensors(&a);
    let mut m = gguf_meta(&a);
    set(&mut m, keys::SPEC_VERSION, MetaValue::Str("1.1".into()));
    t.iter_mut().find(|x| x.name == "iapt.blk.0.down.weight").unwrap().ggml_type = 8;
    out.push(Case { file: "E208-bad-q8-layout.gguf".into(), code: Code::BadQ8Layout, bytes: write_gguf(&m, &t) });
    let mut t = raw_tensors(&a);
    let x = t.iter_mut().find(|x| x.name == "iapt.blk.0.down.weight").unwrap();
    x.st_dtype = "I8".into();
    x.data = vec![1u8; 4 * 8];
    let mut scale = x.clone();
    scale.name = "iapt.blk.0.down.weight_scale".into();
    scale.st_dtype = "F16".into();
    scale.shape = vec![4, 1];
    scale.data = half::f16::from_f32(0.5).to_bits().to_le_bytes().repeat(4);
    t.push(scale);
    let mut sm = st_meta(&a);
    sm.iter_mut().find(|(k, _)| k == keys::SPEC_VERSION).unwrap().1 = "1.1".into();
    out.push(Case { file: "E208-bad-q8-layout.safetensors".into(), code: Code::BadQ8Layout, bytes: write_safetensors(&sm, &t) });
    out.extend(both_tensors(&a, "W003-large-weight", Code::LargeWeight, |t| {
        let x = t.iter_mut().find(|x| x.name == "iapt.blk.1.up.weight").unwrap();
        x.data[4..8].copy_from_slice(&1.0e30f32.to_le_bytes());
    }));
    out.extend(both_meta(&a, "W001-newer-minor", Code::NewerMinor, |m| set(m, keys::SPEC_VERSION, MetaValue::Str("1.7".into()))));
    out.extend(both_meta(&a, "W002-unknown-optional-key", Code::UnknownOptionalKey, |m| {
        set(m, "acme.training_run", MetaValue::Str("run-42".into()))
    }));
    out
}

/// A valid spec 1.1 adapter with Q8_0 matrices (d = 32, r = 32: whole blocks).
fn q8_sample() -> Adapter {
    let cfg = iapt_format::AdapterConfig { n_embd: 32, bottleneck: 32, ..common::rational_config() };
    common::build(&cfg, iapt_format::DType::F32, &[], 8).with_dtype(iapt_format::DType::Q8_0).unwrap()
}

/// The raw tensors of a safetensors file for `t` (GGUF raw tensors, Q8_0 ones as blocks): each
/// Q8_0 tensor split into its I8 values and F16 `_scale` tensor.
fn st_q8(t: &[RawTensorOut]) -> Vec<RawTensorOut> {
    let mut out = Vec::new();
    for x in t {
        if x.ggml_type != 8 {
            out.push(x.clone());
            continue;
        }
        let (mut values, mut scales) = (Vec::new(), Vec::new());
        for b in x.data.chunks_exact(34) {
            scales.extend_from_slice(&b[..2]);
            values.extend_from_slice(&b[2..]);
        }
        let rows = x.shape[0];
        out.push(RawTensorOut { st_dtype: "I8".into(), data: values, ..x.clone() });
        out.push(RawTensorOut {
            name: format!("{}_scale", x.name),
            shape: vec![rows, x.shape[1] / 32],
            ggml_type: 1,
            st_dtype: "F16".into(),
            data: scales,
        });
    }
    out
}

/// Re-writes a safetensors header with a `__metadata__` key repeated.
fn duplicate_st_key(good: &[u8]) -> Vec<u8> {
    edit_st_header(good, |h| h.replacen("\"iapt.activation\":", "\"iapt.activation\":\"rational\",\"iapt.activation\":", 1))
}

/// Re-writes a safetensors header with a tensor entry repeated.
fn duplicate_st_tensor(good: &[u8]) -> Vec<u8> {
    edit_st_header(good, |h| {
        let start = h.find("\"iapt.blk.0.down.weight\":").unwrap();
        let end = start + h[start..].find('}').unwrap() + 1;
        let entry = h[start..end].to_string();
        format!("{},{}{}", &h[..end], entry, &h[end..])
    })
}

fn edit_st_header(good: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().trim_end();
    let mut new = edit(header).into_bytes();
    while new.len() % 8 != 0 {
        new.push(b' ');
    }
    let mut out = (new.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&new);
    out.extend_from_slice(&good[8 + n..]);
    out
}

fn broken_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/broken")
}

#[test]
fn every_rule_has_a_broken_file_that_reports_its_code() {
    let cases = cases();
    for c in &cases {
        let v = validate_bytes(&c.bytes);
        assert!(v.report.has(c.code), "{}: expected {} but got:\n{}", c.file, c.code, v.report);
        let is_warning = c.code.as_str().starts_with('W');
        assert_eq!(v.adapter.is_some(), is_warning, "{}: validity wrong:\n{}", c.file, v.report);
        assert_eq!(!v.report.has_errors(), is_warning, "{}:\n{}", c.file, v.report);
    }
    // Every code is covered, here or in the tests below (E001, E301-E304 need files or a base model).
    for code in Code::ALL {
        let elsewhere = matches!(
            code,
            Code::Unreadable | Code::BaseArchMismatch | Code::BaseLayerMismatch | Code::BaseEmbdMismatch | Code::BaseModelUnreadable
        );
        assert!(elsewhere || cases.iter().any(|c| c.code == code), "no broken file for {code}");
    }
}

#[test]
fn committed_broken_files_match_the_generator() {
    let dir = broken_dir();
    let cases = cases();
    let expected: serde_json::Map<String, serde_json::Value> =
        cases.iter().map(|c| (c.file.clone(), serde_json::Value::String(c.code.as_str().to_owned()))).collect();
    if std::env::var_os("IAPT_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for c in &cases {
            std::fs::write(dir.join(&c.file), &c.bytes).unwrap();
        }
        let json = serde_json::to_string_pretty(&serde_json::Value::Object(expected.clone())).unwrap();
        std::fs::write(dir.join("expected.json"), json + "\n").unwrap();
    }
    for c in &cases {
        let on_disk = std::fs::read(dir.join(&c.file)).unwrap_or_else(|e| panic!("{}: {e} (run with IAPT_BLESS=1 to write)", c.file));
        assert!(on_disk == c.bytes, "{} differs from the generator (run with IAPT_BLESS=1 to rewrite)", c.file);
    }
    let on_disk: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(on_disk, serde_json::Value::Object(expected));
}

#[test]
fn validate_reports_every_finding_not_only_the_first() {
    let a = sample();
    let mut m = a.gguf_metadata();
    set(&mut m, keys::RATIONAL_VARIANT, MetaValue::Str("Z".into()));
    m.retain(|(k, _)| k != keys::N_EMBD);
    let mut t = raw_tensors(&a);
    t.retain(|x| x.name != "iapt.blk.0.up.bias");
    t[1].data[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let v = validate_bytes(&write_gguf(&m, &t));
    for code in [Code::UnknownRationalVariant, Code::MissingKey, Code::NonFinite] {
        assert!(v.report.has(code), "missing {code} in\n{}", v.report);
    }
}

#[test]
fn e001_unreadable_file() {
    let v = validate_file(std::path::Path::new("/nonexistent/dir/adapter.gguf"), None);
    assert!(v.report.has(Code::Unreadable), "{}", v.report);
    assert!(v.adapter.is_none());
}

/// A base model GGUF that has only the keys the check reads.
fn fake_base(arch: &str, n_layer: u32, n_embd: u32) -> Vec<u8> {
    write_gguf(
        &[
            ("general.architecture".into(), MetaValue::Str(arch.into())),
            (format!("{arch}.block_count"), MetaValue::U32(n_layer)),
            (format!("{arch}.embedding_length"), MetaValue::U32(n_embd)),
        ],
        &[],
    )
}

#[test]
fn e301_e302_e303_base_model_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("a.gguf");
    sample().save(&adapter, Container::Gguf).unwrap();
    let cases = [
        ("llama", 2, 8, None),
        ("qwen2", 2, 8, Some(Code::BaseArchMismatch)),
        ("llama", 3, 8, Some(Code::BaseLayerMismatch)),
        ("llama", 2, 16, Some(Code::BaseEmbdMismatch)),
    ];
    for (arch, l, d, want) in cases {
        let base = dir.path().join("base.gguf");
        std::fs::write(&base, fake_base(arch, l, d)).unwrap();
        let info = BaseModelInfo::read(&base).unwrap();
        let v = validate_file(&adapter, Some(&info));
        match want {
            None => assert!(!v.report.has_errors(), "{}", v.report),
            Some(code) => {
                assert!(v.report.has(code), "{arch}/{l}/{d}: {}", v.report);
                assert!(v.adapter.is_none());
            }
        }
    }
}

#[test]
fn e304_base_model_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("base.gguf");
    std::fs::write(&not_gguf, b"not a gguf").unwrap();
    assert!(BaseModelInfo::read(&not_gguf).is_err());
    let no_keys = dir.path().join("nokeys.gguf");
    std::fs::write(&no_keys, write_gguf(&[("general.architecture".into(), MetaValue::Str("llama".into()))], &[])).unwrap();
    let err = BaseModelInfo::read(&no_keys).unwrap_err();
    assert!(err.to_string().contains("llama.block_count"), "{err}");
}

#[test]
fn each_broken_file_reports_its_own_code_and_no_other_error() {
    // Some rules imply others by construction; those pairs are listed here and nowhere else.
    for c in cases() {
        let v = validate_bytes(&c.bytes);
        let others: Vec<String> = v.report.errors().filter(|f| f.code != c.code).map(|f| f.to_string()).collect();
        assert!(others.is_empty(), "{}: besides {} also reported:\n{}", c.file, c.code, others.join("\n"));
    }
}

#[test]
fn reserved_keys_cannot_be_set_as_optional_metadata() {
    let mut a = sample();
    for key in [keys::N_LAYER, keys::RATIONAL_GROUPS, keys::GENERAL_TYPE, "iapt.meta_types"] {
        assert!(a.set_extra(key, MetaValue::U32(9)).is_err(), "{key}");
    }
    assert!(a.set_extra("iapt.source.file", MetaValue::Str("x.bin".into())).is_ok());
    let mut extras = a.extras().clone();
    extras.push((keys::N_LAYER.into(), MetaValue::U32(9)));
    let report = Adapter::from_parts(a.config().clone(), extras, a.tensors().to_vec()).unwrap_err();
    assert!(report.has(Code::DuplicateKey), "{report}");
}
