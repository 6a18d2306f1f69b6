//! The spec v1 test vectors (`spec/vectors/`, made by `spec/vectors/make_vectors.py` with the
//! `safetensors` and `gguf` Python packages) read with this crate.
//!
//! - every vector opens in both containers, with the same config, metadata and tensor bytes, and
//!   the config the manifest states;
//! - our writer re-emits each vector in both containers, byte for byte the same whichever container
//!   it was read from, and the output re-opens to the same tensors;
//! - our GGUF output equals the file gguf-py wrote; our safetensors output differs from the
//!   `safetensors` package's only in where each tensor sits;
//! - the `.npy` inputs and expected outputs have the shapes the manifest declares;
//! - `spec/iapt-v1.md` lists every validation code and limit of this crate, and
//!   `spec/iapt-v1.schema.json` requires the keys this crate requires.
//!
//! The expected soft tokens themselves are checked against the generator in that crate's tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use iapt_format::{
    validate_bytes, Activation, Adapter, AdapterConfig, Code, Container, DType, RationalConfig, RationalVariant, SpecVersion,
    GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, KNOWN_OPTIONAL_KEYS, MAX_BASE_MODEL_TENSORS, MAX_HEADER_BYTES, MAX_KEYS, MAX_N_LAYER,
    MAX_RATIONAL_DEGREE, MAX_SOFT_TOKENS, MAX_STRING_BYTES, MAX_TENSORS, MAX_WIDTH,
};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../spec/vectors")
}

fn manifest() -> Value {
    let path = vectors_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

fn vectors() -> Vec<Value> {
    let v = manifest()["vectors"].as_array().expect("manifest has a vectors array").clone();
    assert!(v.len() >= 5, "the manifest lists {} vectors", v.len());
    v
}

fn name(v: &Value) -> &str {
    v["name"].as_str().expect("vector name")
}

fn file(v: &Value, kind: &str) -> PathBuf {
    vectors_dir().join(v["files"][kind].as_str().unwrap_or_else(|| panic!("{}: no {kind} file", name(v))))
}

fn u32_of(v: &Value, key: &str) -> u32 {
    v[key].as_u64().and_then(|x| u32::try_from(x).ok()).unwrap_or_else(|| panic!("config.{key} is not a u32"))
}

/// The config the manifest states, as this crate's type.
fn manifest_config(v: &Value) -> AdapterConfig {
    let c = &v["config"];
    let activation = match c["activation"].as_str().expect("activation") {
        "rational" => {
            let r = &c["rational"];
            Activation::Rational(RationalConfig {
                variant: RationalVariant::parse(r["variant"].as_str().expect("variant")).expect("known variant"),
                numerator_degree: u32_of(r, "numerator_degree"),
                denominator_degree: u32_of(r, "denominator_degree"),
                groups: u32_of(r, "groups"),
            })
        }
        other => Activation::fixed_from_name(other).unwrap_or_else(|| panic!("unknown activation {other}")),
    };
    AdapterConfig {
        spec_version: SpecVersion::parse(c["spec_version"].as_str().expect("spec_version")).expect("major.minor"),
        n_layer: u32_of(c, "n_layer"),
        n_embd: u32_of(c, "n_embd"),
        n_soft_tokens: u32_of(c, "n_soft_tokens"),
        bottleneck: u32_of(c, "bottleneck"),
        activation,
        pool_scale: c["pool_scale"].as_f64().expect("pool_scale") as f32,
        base_model_arch: c["base_model_arch"].as_str().expect("base_model_arch").to_owned(),
    }
}

fn open(path: &Path) -> Adapter {
    Adapter::open(path).unwrap_or_else(|e| panic!("{e}"))
}

/// (name, dtype, shape, bytes) of every tensor, in the adapter's (canonical) order.
fn tensor_dump(a: &Adapter) -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    a.tensors()
        .iter()
        .map(|t| (t.name().to_string(), t.dtype(), t.shape().to_vec(), t.bytes().expect("tensor bytes").into_owned()))
        .collect()
}

fn warnings(a: &Adapter) -> Vec<(String, String)> {
    a.warnings().iter().map(|f| (f.code.as_str().to_owned(), f.subject.clone().unwrap_or_default())).collect()
}

fn manifest_warnings(v: &Value) -> Vec<(String, String)> {
    v["warnings"]
        .as_array()
        .expect("warnings array")
        .iter()
        .map(|w| (w["code"].as_str().expect("code").to_owned(), w["subject"].as_str().expect("subject").to_owned()))
        .collect()
}

#[test]
fn both_containers_open_with_the_manifest_config_and_identical_tensors() {
    for v in vectors() {
        let n = name(&v);
        let st = open(&file(&v, "safetensors"));
        let gg = open(&file(&v, "gguf"));
        assert_eq!(st.source().map(|s| s.1), Some(Container::Safetensors), "{n}");
        assert_eq!(gg.source().map(|s| s.1), Some(Container::Gguf), "{n}");

        let want = manifest_config(&v);
        assert_eq!(st.config(), &want, "{n}: safetensors config");
        assert_eq!(gg.config(), &want, "{n}: gguf config");

        // Same tensors, same order, same bytes; and the manifest's names, dtypes and shapes.
        let (ts, tg) = (tensor_dump(&st), tensor_dump(&gg));
        assert_eq!(ts, tg, "{n}: tensors differ between the containers");
        let listed: Vec<(String, String, Vec<u64>)> = v["tensors"]
            .as_array()
            .expect("tensors")
            .iter()
            .map(|t| {
                let shape = t["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim")).collect();
                (t["name"].as_str().expect("name").to_owned(), t["dtype"].as_str().expect("dtype").to_owned(), shape)
            })
            .collect();
        let got: Vec<(String, String, Vec<u64>)> = ts.iter().map(|(nm, dt, sh, _)| (nm.clone(), dt.to_string(), sh.clone())).collect();
        assert_eq!(got, listed, "{n}: tensors differ from the manifest (or are not in canonical order)");

        // Optional metadata survives both containers with its types.
        assert_eq!(st.extras(), gg.extras(), "{n}: optional metadata differs between the containers");
        assert_eq!(warnings(&st), manifest_warnings(&v), "{n}: safetensors warnings");
        assert_eq!(warnings(&gg), manifest_warnings(&v), "{n}: gguf warnings");

        // Our safetensors text forms are the ones the manifest (and the reference writer) uses.
        let mut ours = st.safetensors_metadata();
        ours.sort();
        let listed: Vec<(String, String)> = v["metadata"]
            .as_object()
            .expect("metadata")
            .iter()
            .map(|(k, x)| (k.clone(), x.as_str().expect("string value").to_owned()))
            .collect();
        assert_eq!(ours, listed, "{n}: safetensors metadata text");
        let mut ours_g = gg.safetensors_metadata();
        ours_g.sort();
        assert_eq!(ours_g, listed, "{n}: safetensors metadata text from the gguf file");
    }
}

#[test]
fn our_writer_output_reopens_to_the_same_tensors_and_is_byte_reproducible() {
    for v in vectors() {
        let n = name(&v);
        let st = open(&file(&v, "safetensors"));
        let gg = open(&file(&v, "gguf"));
        let want = tensor_dump(&st);
        for container in [Container::Safetensors, Container::Gguf] {
            let from_st = st.to_bytes(container).expect("write");
            let from_gg = gg.to_bytes(container).expect("write");
            assert!(from_st == from_gg, "{n}: {container} output depends on the container the adapter was read from");
            let back = validate_bytes(&from_st);
            assert!(!back.report.has_errors(), "{n}: our {container} output is invalid:\n{}", back.report);
            assert_eq!(back.container, Some(container), "{n}");
            let a = back.adapter.expect("valid");
            assert_eq!(a.config(), st.config(), "{n}: {container} round trip changed the config");
            assert_eq!(a.extras(), st.extras(), "{n}: {container} round trip changed the optional metadata");
            assert_eq!(tensor_dump(&a), want, "{n}: {container} round trip changed the tensors");
            // Writing what we read gives the same bytes again.
            assert!(a.to_bytes(container).expect("write") == from_st, "{n}: {container} rewrite is not a fixed point");
        }
    }
}

/// First differing byte, with a little context, for readable failures.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let ctx = |s: &[u8]| format!("{:02x?}", &s[i.saturating_sub(8).min(s.len())..(i + 24).min(s.len())]);
    format!("lengths {} vs {}; first difference at byte {i}: ours {} vs theirs {}", a.len(), b.len(), ctx(a), ctx(b))
}

#[test]
fn our_gguf_is_byte_identical_to_gguf_py() {
    // make_vectors.py adds keys and tensors in the spec's canonical order, so everything else
    // (types, ne order, ggml type ids, offsets, alignment, padding) must match too.
    for v in vectors() {
        let n = name(&v);
        let path = file(&v, "gguf");
        let theirs = std::fs::read(&path).expect("read");
        let ours = open(&path).to_bytes(Container::Gguf).expect("write");
        assert!(ours == theirs, "{n}: our GGUF differs from gguf-py's: {}", first_difference(&ours, &theirs));
    }
}

/// The JSON header of a safetensors file, with entries in file order.
fn safetensors_header(bytes: &[u8]) -> serde_json::Map<String, Value> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!(n % 8, 0, "header length {n} is not a multiple of 8");
    let text = std::str::from_utf8(&bytes[8..8 + n]).expect("UTF-8 header");
    match serde_json::from_str::<Value>(text.trim_end_matches(' ')).expect("JSON header") {
        Value::Object(m) => m,
        _ => panic!("header is not an object"),
    }
}

#[test]
fn our_safetensors_differs_from_the_reference_writer_only_in_tensor_placement() {
    // The `safetensors` package orders tensors by dtype size then name; we write the spec's
    // canonical order. Metadata (sorted by make_vectors.py) and each tensor's dtype, shape and bytes
    // must be the same. (File lengths may differ: the data offsets' digits count toward the header.)
    for v in vectors() {
        let n = name(&v);
        let path = file(&v, "safetensors");
        let theirs = std::fs::read(&path).expect("read");
        let ours = open(&path).to_bytes(Container::Safetensors).expect("write");
        let (ho, ht) = (safetensors_header(&ours), safetensors_header(&theirs));
        assert_eq!(ho.get("__metadata__"), ht.get("__metadata__"), "{n}: __metadata__ differs");
        let keys = |h: &serde_json::Map<String, Value>| h.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&ho), keys(&ht), "{n}: tensor names differ");
        let data = |bytes: &[u8], h: &serde_json::Map<String, Value>, k: &str| -> (Value, Value, Vec<u8>) {
            let e = &h[k];
            let start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
            let o = e["data_offsets"].as_array().expect("offsets");
            let (b, x) = (o[0].as_u64().expect("begin") as usize, o[1].as_u64().expect("end") as usize);
            (e["dtype"].clone(), e["shape"].clone(), bytes[start + b..start + x].to_vec())
        };
        for k in ho.keys().filter(|k| *k != "__metadata__") {
            assert_eq!(data(&ours, &ho, k), data(&theirs, &ht, k), "{n}: tensor {k} differs");
        }
        // Our order is canonical: shared first, then layer by layer, roles in spec order; a Q8_0
        // matrix is its I8 entry then its `_scale` entry (spec 1.1).
        let listed: Vec<String> = v["tensors"]
            .as_array()
            .expect("tensors")
            .iter()
            .flat_map(|t| {
                let nm = t["name"].as_str().expect("name").to_owned();
                match t["dtype"].as_str() == Some("Q8_0") {
                    true => vec![nm.clone(), format!("{nm}_scale")],
                    false => vec![nm],
                }
            })
            .collect();
        let ours_order: Vec<String> = ho.keys().filter(|k| *k != "__metadata__").cloned().collect();
        assert_eq!(ours_order, listed, "{n}: our tensor order is not canonical");
    }
}

/// A minimal `.npy` reader: little-endian `<f4` / `<f8`, C order, format versions 1-3.
fn read_npy(path: &Path) -> (String, Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an .npy file", path.display());
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12),
        v => panic!("{}: .npy version {v}", path.display()),
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).expect("ASCII header");
    let field = |key: &str| -> &str {
        let at = header.find(&format!("'{key}':")).unwrap_or_else(|| panic!("no {key} in {header}"));
        header[at + key.len() + 3..].trim_start()
    };
    let descr = field("descr").trim_start_matches('\'').split('\'').next().expect("descr").to_owned();
    assert!(field("fortran_order").starts_with("False"), "{}: Fortran order", path.display());
    let shape_text = field("shape");
    let shape: Vec<usize> = shape_text[1..shape_text.find(')').expect("shape tuple")]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dimension"))
        .collect();
    let data = &bytes[start + hlen..];
    let values: Vec<f64> = match descr.as_str() {
        "<f4" => data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4")))).collect(),
        "<f8" => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect(),
        other => panic!("{}: dtype {other} (only <f4 and <f8 are read)", path.display()),
    };
    assert_eq!(values.len(), shape.iter().product::<usize>(), "{}: data length", path.display());
    (descr, shape, values)
}

#[test]
fn hidden_and_expected_arrays_have_the_declared_shapes() {
    for v in vectors() {
        let n = name(&v);
        let c = manifest_config(&v);
        let tokens = v["n_instruction_tokens"].as_u64().expect("n_instruction_tokens") as usize;
        let (l, m, d) = (c.n_layer as usize, c.n_soft_tokens as usize, c.n_embd as usize);
        let (dt, shape, hidden) = read_npy(&file(&v, "hidden"));
        assert_eq!((dt.as_str(), shape), ("<f4", vec![l, tokens, d]), "{n}: hidden");
        let (dt, shape, expected) = read_npy(&file(&v, "expected"));
        assert_eq!((dt.as_str(), shape), ("<f8", vec![l, m, d]), "{n}: expected");
        assert!(hidden.iter().chain(&expected).all(|x| x.is_finite()), "{n}: non-finite values");
    }
}

#[test]
fn the_manifest_lists_every_vector_file() {
    let mut listed = BTreeSet::new();
    for v in vectors() {
        let q8 = v["files"].get("q8_source").is_some();
        for kind in ["safetensors", "gguf", "hidden", "expected", "q8_source"] {
            if kind == "q8_source" && !q8 {
                continue;
            }
            assert!(file(&v, kind).is_file(), "{}: {} is missing", name(&v), file(&v, kind).display());
            listed.insert(v["files"][kind].as_str().expect("file name").to_owned());
        }
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(vectors_dir())
        .expect("spec/vectors")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8 name"))
        .filter(|f| [".safetensors", ".gguf", ".npy"].iter().any(|x| f.ends_with(x)))
        .collect();
    assert_eq!(on_disk, listed, "files in spec/vectors that the manifest does not list, or the reverse");
}

/// Our Q8_0 quantizer gives gguf-py's blocks byte for byte: each vector's `q8_source` holds the
/// f32 values gguf-py quantized into its Q8_0 tensors (read here with the `safetensors` crate).
#[test]
fn our_q8_0_quantizer_gives_gguf_py_blocks() {
    let mut checked = 0;
    for v in vectors() {
        let Some(src) = v["files"].get("q8_source").and_then(Value::as_str) else { continue };
        let n = name(&v);
        let bytes = std::fs::read(vectors_dir().join(src)).expect("read q8 source");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("q8 source is safetensors");
        let gg = open(&file(&v, "gguf"));
        for t in gg.tensors().iter().filter(|t| t.dtype() == DType::Q8_0) {
            let view = st.tensor(&t.name().to_string()).unwrap_or_else(|e| panic!("{n}: {}: {e}", t.name()));
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{n}");
            assert_eq!(view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), t.shape(), "{n}: {}", t.name());
            let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
            assert!(DType::Q8_0.encode(&values) == *t.bytes().expect("bytes"), "{n}: {}: our blocks differ from gguf-py's", t.name());
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} Q8_0 tensors were checked");
}

fn spec_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../spec").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_spec_lists_every_validation_code_and_limit() {
    let spec = spec_file("iapt-v1.md");
    for code in Code::ALL {
        let row = format!("| {} |", code.as_str());
        assert!(spec.contains(&row), "spec/iapt-v1.md has no table row for {}", code.as_str());
        let line = spec.lines().find(|l| l.starts_with(&row)).expect("row");
        assert!(line.ends_with(&format!("| `{}` |", code.slug())), "{}: the row does not end with its slug {}", code.as_str(), code.slug());
    }
    let limits: [(&str, u64); 11] = [
        ("MAX_HEADER_BYTES", MAX_HEADER_BYTES),
        ("MAX_TENSORS", MAX_TENSORS),
        ("MAX_BASE_MODEL_TENSORS", MAX_BASE_MODEL_TENSORS),
        ("MAX_KEYS", MAX_KEYS),
        ("MAX_STRING_BYTES", MAX_STRING_BYTES),
        ("GGUF_VERSION", u64::from(GGUF_VERSION)),
        ("GGUF_DEFAULT_ALIGNMENT", GGUF_DEFAULT_ALIGNMENT),
        ("MAX_N_LAYER", u64::from(MAX_N_LAYER)),
        ("MAX_WIDTH", u64::from(MAX_WIDTH)),
        ("MAX_SOFT_TOKENS", u64::from(MAX_SOFT_TOKENS)),
        ("MAX_RATIONAL_DEGREE", u64::from(MAX_RATIONAL_DEGREE)),
    ];
    for (name, value) in limits {
        assert!(spec.contains(&format!("| `{name}` | {value}")), "spec/iapt-v1.md does not give {name} = {value}");
    }
}

#[test]
fn the_schema_requires_what_the_crate_requires() {
    let schema: Value = serde_json::from_str(&spec_file("iapt-v1.schema.json")).expect("schema is JSON");
    let strings =
        |v: &Value| -> BTreeSet<String> { v.as_array().expect("array").iter().map(|x| x.as_str().expect("string").to_owned()).collect() };
    let fixed = AdapterConfig {
        spec_version: SpecVersion::CURRENT,
        n_layer: 1,
        n_embd: 8,
        n_soft_tokens: 4,
        bottleneck: 4,
        activation: Activation::Identity,
        pool_scale: 1.0,
        base_model_arch: "llama".into(),
    };
    let required: BTreeSet<String> = fixed.to_metadata().into_iter().map(|(k, _)| k).collect();
    assert_eq!(strings(&schema["required"]), required, "schema required keys");
    let rational = AdapterConfig {
        activation: Activation::Rational(RationalConfig {
            variant: RationalVariant::B,
            numerator_degree: 6,
            denominator_degree: 5,
            groups: 1,
        }),
        ..fixed
    };
    let extra: BTreeSet<String> = rational.to_metadata().into_iter().map(|(k, _)| k).filter(|k| !required.contains(k)).collect();
    assert_eq!(strings(&schema["allOf"][0]["then"]["required"]), extra, "schema keys required when rational");
    assert_eq!(
        strings(&schema["properties"]["iapt.activation"]["enum"]),
        Activation::NAMES.iter().map(|s| s.to_string()).collect(),
        "schema activation names"
    );
    for key in KNOWN_OPTIONAL_KEYS {
        assert!(schema["properties"].get(key).is_some(), "schema does not describe the optional key {key}");
    }
}
