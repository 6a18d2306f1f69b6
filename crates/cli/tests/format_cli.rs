//! CLI tests of `iapt validate`, `iapt inspect` and `iapt pack`: exit codes 0/1/2, the JSON report,
//! every committed broken file under `tests/broken/` refused with its code, lossless and atomic packing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn iapt(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn broken(name: &str) -> PathBuf {
    repo().join("tests/broken").join(name)
}

fn valid_adapter() -> PathBuf {
    // A broken-file set member that is valid (a warning only).
    broken("W001-newer-minor.safetensors")
}

#[test]
fn validate_refuses_every_committed_broken_file_with_its_code() {
    let expected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(repo().join("tests/broken/expected.json")).unwrap()).unwrap();
    assert!(expected.len() >= 40, "expected.json lists too few files");
    for (file, code) in expected {
        let code = code.as_str().unwrap();
        let out = iapt(&[os("validate"), broken(&file).as_os_str(), os("--json")]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{file}: bad JSON ({e})"));
        let codes: Vec<&str> = doc["findings"].as_array().unwrap().iter().map(|f| f["code"].as_str().unwrap()).collect();
        assert!(codes.contains(&code), "{file}: expected {code}, got {codes:?}");
        let want_exit = if code.starts_with('W') { 0 } else { 1 };
        assert_eq!(out.status.code(), Some(want_exit), "{file}: exit code");
        assert_eq!(doc["valid"].as_bool(), Some(want_exit == 0), "{file}");
    }
}

#[test]
fn validate_exit_codes() {
    assert_eq!(iapt(&[os("validate"), valid_adapter().as_os_str()]).status.code(), Some(0));
    let missing = iapt(&[os("validate"), os("/no/such/adapter.gguf")]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("E001"));
    assert_eq!(iapt(&[os("validate")]).status.code(), Some(2), "usage error");
}

/// A minimal GGUF with the three keys the check reads: `arch`, 3 layers, n_embd 8.
fn base_header(path: &Path, arch: &str) {
    let mut g = b"GGUF".to_vec();
    g.extend_from_slice(&3u32.to_le_bytes());
    g.extend_from_slice(&0u64.to_le_bytes());
    g.extend_from_slice(&3u64.to_le_bytes());
    let mut kv = |k: &str, f: &dyn Fn(&mut Vec<u8>)| {
        g.extend_from_slice(&(k.len() as u64).to_le_bytes());
        g.extend_from_slice(k.as_bytes());
        f(&mut g);
    };
    kv("general.architecture", &|g| {
        g.extend_from_slice(&8u32.to_le_bytes());
        g.extend_from_slice(&(arch.len() as u64).to_le_bytes());
        g.extend_from_slice(arch.as_bytes());
    });
    kv(&format!("{arch}.block_count"), &|g| {
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&3u32.to_le_bytes());
    });
    kv(&format!("{arch}.embedding_length"), &|g| {
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&8u32.to_le_bytes());
    });
    std::fs::write(path, &g).unwrap();
}

#[test]
fn validate_against_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    base_header(&base, "llama");
    let out = iapt(&[os("validate"), valid_adapter().as_os_str(), os("--model"), base.as_os_str(), os("--json")]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = doc["findings"].as_array().unwrap().iter().map(|f| f["code"].as_str().unwrap()).collect();
    assert!(codes.contains(&"E302"), "{codes:?}");
    // One classification for every command (issue 17): a readable file that is not a GGUF is
    // invalid input (exit 1), a base model that cannot be read is exit 2; both are E304.
    let not_gguf = iapt(&[os("validate"), valid_adapter().as_os_str(), os("--model"), valid_adapter().as_os_str()]);
    assert_eq!(not_gguf.status.code(), Some(1), "a base model that is not a GGUF is exit 1");
    assert!(String::from_utf8_lossy(&not_gguf.stdout).contains("E304"));
    let missing = iapt(&[os("validate"), valid_adapter().as_os_str(), os("--model"), dir.path().join("none.gguf").as_os_str()]);
    assert_eq!(missing.status.code(), Some(2), "an unreadable base model is exit 2");
    assert!(String::from_utf8_lossy(&missing.stdout).contains("E304"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["base_model_arch_supported"], serde_json::json!(true));
}

/// The supported architectures as every refusal must name them.
fn supported_list() -> String {
    ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"].join(", ")
}

#[test]
fn validate_refuses_an_unsupported_base_architecture_naming_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mamba.gguf");
    base_header(&base, "mamba");
    let out = iapt(&[os("validate"), valid_adapter().as_os_str(), os("--model"), base.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "an unsupported architecture is exit 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("architecture \"mamba\", which the IAPT hook does not support"), "{text}");
    assert!(text.contains(&supported_list()), "{text}");
    let out = iapt(&[os("validate"), valid_adapter().as_os_str(), os("--model"), base.as_os_str(), os("--json")]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], serde_json::json!(false));
    assert_eq!(doc["base_model_arch"], serde_json::json!("mamba"));
    assert_eq!(doc["base_model_arch_supported"], serde_json::json!(false));
    assert_eq!(doc["supported_archs"], serde_json::json!(["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]));
}

#[test]
fn every_model_command_refuses_an_unsupported_architecture_naming_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mamba.gguf");
    base_header(&base, "mamba");
    let requests = dir.path().join("r.jsonl");
    std::fs::write(&requests, "{\"prompt_tokens\": [1]}\n").unwrap();
    // One held-out example of the demo, with its prompt format beside it (eval reads both first).
    let demo = repo().join("converters/python/demo/assets");
    let data = dir.path().join("d.jsonl");
    let first = std::fs::read_to_string(demo.join("held_out.jsonl")).unwrap().lines().next().unwrap().to_owned();
    std::fs::write(&data, first + "\n").unwrap();
    std::fs::copy(demo.join("prompt_format.json"), dir.path().join("prompt_format.json")).unwrap();
    let (m, a) = (base.as_os_str(), valid_adapter());
    let a = a.as_os_str();
    let commands: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec![os("run"), os("--model"), m, os("--adapter"), a, os("--prompt-tokens"), os("1")],
        vec![os("batch"), os("--model"), m, os("--adapter"), a, os("--requests"), requests.as_os_str()],
        vec![os("bench"), os("--model"), m, os("--adapter"), a],
        vec![os("eval"), os("--model"), m, os("--adapter"), a, os("--data"), data.as_os_str()],
        vec![os("demo"), os("--model"), m, os("--adapter"), a],
    ];
    for args in commands {
        let out = iapt(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("architecture \"mamba\", which the IAPT hook does not support"), "{args:?}: {err}");
        assert!(err.contains(&supported_list()), "{args:?}: {err}");
    }
}

#[test]
fn pack_round_trips_byte_identically() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("a.safetensors");
    let gg = dir.path().join("a.gguf");
    let st2 = dir.path().join("b.safetensors");
    let gg2 = dir.path().join("b.gguf");
    for (i, o) in [(valid_adapter(), st.clone()), (st.clone(), gg.clone()), (gg.clone(), st2.clone()), (st2.clone(), gg2.clone())] {
        let out = iapt(&[os("pack"), i.as_os_str(), os("-o"), o.as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(std::fs::read(&st).unwrap(), std::fs::read(&st2).unwrap());
    assert_eq!(std::fs::read(&gg).unwrap(), std::fs::read(&gg2).unwrap());
    assert!(std::fs::read(&gg).unwrap().starts_with(b"GGUF"));
}

/// `pack --dtype q8_0` quantizes the matrices whose rows are whole blocks (the fixture's
/// down.weight, rows of 64) and keeps the others (up.weight, rows of 16), says so, writes spec 1.1;
/// the result validates and round-trips between the containers byte for byte; `--dtype f32`
/// decodes it back, each value within half a quantization step (plus the F16 scale's rounding) of
/// the original.
#[test]
fn pack_to_q8_0_quantizes_the_matrices_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo().join("converters/python/fixtures/models/llama-tiny.iapt.safetensors");
    let (q_st, q_gg, q_st2, back) =
        (dir.path().join("q.safetensors"), dir.path().join("q.gguf"), dir.path().join("q2.safetensors"), dir.path().join("back.gguf"));
    let out = iapt(&[os("pack"), src.as_os_str(), os("--dtype"), os("q8_0"), os("-o"), q_st.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("spec 1.1") && err.contains("keep their dtype") && err.contains("up.weight"), "{err}");
    for (i, o) in [(&q_st, &q_gg), (&q_gg, &q_st2)] {
        let out = iapt(&[os("pack"), i.as_os_str(), os("-o"), o.as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(std::fs::read(&q_st).unwrap(), std::fs::read(&q_st2).unwrap(), "safetensors -> gguf -> safetensors");
    let v = iapt(&[os("validate"), q_gg.as_os_str(), os("--json")]);
    assert_eq!(v.status.code(), Some(0), "{}", String::from_utf8_lossy(&v.stdout));
    let info: serde_json::Value = serde_json::from_slice(&iapt(&[os("inspect"), q_gg.as_os_str(), os("--json")]).stdout).unwrap();
    let dtype_of = |name: &str| info["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()["dtype"].clone();
    assert_eq!(dtype_of("iapt.blk.0.down.weight"), "Q8_0");
    assert_eq!(dtype_of("iapt.blk.0.up.weight"), "F32");
    let out = iapt(&[os("pack"), q_gg.as_os_str(), os("--dtype"), os("f32"), os("-o"), back.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let (orig, back) = (iapt_format::Adapter::open(&src).unwrap(), iapt_format::Adapter::open(&back).unwrap());
    for (a, b) in orig.tensors().iter().zip(back.tensors()) {
        let (x, y) = (a.to_f32().unwrap(), b.to_f32().unwrap());
        let row = *a.shape().last().unwrap() as usize;
        for (xr, yr) in x.chunks(row).zip(y.chunks(row)) {
            for (xb, yb) in xr.chunks(32).zip(yr.chunks(32)) {
                let step = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                let bound = if b.name().role.is_matrix() && row % 32 == 0 { 0.5 * step + 127.0 * step / 1024.0 } else { 0.0 };
                for (p, q) in xb.iter().zip(yb) {
                    assert!((p - q).abs() <= bound, "{}: {p} vs {q} (step {step})", a.name());
                }
            }
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn pack_refuses_invalid_input_and_leaves_output_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.gguf");
    std::fs::write(&out_path, b"existing").unwrap();
    let out = iapt(&[os("pack"), broken("E207-non-finite.safetensors").as_os_str(), os("-o"), out_path.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E207"));
    assert_eq!(std::fs::read(&out_path).unwrap(), b"existing");
    assert_eq!(entries(dir.path()), vec!["out.gguf".to_string()], "no temporary file left");
    let bad_ext = iapt(&[os("pack"), valid_adapter().as_os_str(), os("-o"), dir.path().join("out.bin").as_os_str()]);
    assert_eq!(bad_ext.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_ext.stderr).contains(".safetensors or *.gguf"));
}

#[test]
fn inspect_prints_config_and_tensor_table() {
    let out = iapt(&[os("inspect"), valid_adapter().as_os_str(), os("--json")]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["config"]["n_layer"], 2);
    assert_eq!(doc["config"]["activation"]["kind"], "rational");
    let tensors = doc["tensors"].as_array().unwrap();
    let params: u64 = tensors.iter().map(|t| t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>()).sum();
    assert_eq!(doc["parameters"].as_u64(), Some(params));
    let text = iapt(&[os("inspect"), valid_adapter().as_os_str()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("iapt.blk.1.act.den"));
    assert_eq!(iapt(&[os("inspect"), broken("E003-unknown-container.bin").as_os_str()]).status.code(), Some(1));
}
