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

#[test]
fn validate_against_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    // A minimal GGUF with the three keys the check reads: llama, 3 layers, n_embd 8.
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
        g.extend_from_slice(&5u64.to_le_bytes());
        g.extend_from_slice(b"llama");
    });
    kv("llama.block_count", &|g| {
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&3u32.to_le_bytes());
    });
    kv("llama.embedding_length", &|g| {
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&8u32.to_le_bytes());
    });
    std::fs::write(&base, &g).unwrap();
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
