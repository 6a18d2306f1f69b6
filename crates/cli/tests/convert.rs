//! `iapt convert` end to end: the binary on the committed PyTorch fixtures
//! (`converters/python/fixtures/`), exit codes, messages, and that `iapt validate` accepts its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures")
}

fn iapt(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn malicious_pickle_exits_1_names_the_global_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("evil.gguf");
    let ckpt = fixtures().join("malicious.pt");
    let o = iapt(&[os("convert"), os(&ckpt), os("-o"), os(&out)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("posix.system"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(!Path::new("/tmp/iapt-convert-pwned").exists());
}

#[test]
fn good_checkpoints_convert_and_validate_in_both_containers() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 3] = [
        ("ref_bf16.pt", "ref_bf16_config.json", &["--dtype", "f16"]),
        ("sharded_bin/pytorch_model.bin.index.json", "sharded_bin/config.json", &[]),
        ("blocks.pt", "blocks_config.json", &["--profile", "blocks"]),
    ];
    for (ckpt, cfg, extra) in cases {
        for ext in ["gguf", "safetensors"] {
            let out = dir.path().join(format!("a.{ext}"));
            let mut args: Vec<std::ffi::OsString> = vec!["convert".into(), fixtures().join(ckpt).into()];
            args.extend(["--config".into(), fixtures().join(cfg).into(), "-o".into(), out.clone().into()]);
            args.extend(extra.iter().map(|a| a.into()));
            let o = Command::new(env!("CARGO_BIN_EXE_iapt")).args(&args).output().unwrap();
            assert_eq!(o.status.code(), Some(0), "{ckpt}: {}", String::from_utf8_lossy(&o.stderr));
            let v = iapt(&[os("validate"), os(&out)]);
            assert_eq!(v.status.code(), Some(0), "{ckpt}: {}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        }
    }
}

#[test]
fn legacy_files_exit_1_with_the_resave_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    let o = iapt(&[os("convert"), os(&fixtures().join("legacy.pt")), os("-o"), os(&out)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("legacy") && stderr.contains("torch.save("), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn usage_problems_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixtures().join("ref_f32.pt");
    // Unknown output extension.
    let o = iapt(&[os("convert"), os(&ckpt), os("-o"), os(&dir.path().join("a.bin"))]);
    assert_eq!(o.status.code(), Some(2));
    // Missing input.
    let o = iapt(&[os("convert"), os(&dir.path().join("nope.pt")), os("-o"), os(&dir.path().join("a.gguf"))]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    // Unknown profile.
    let o = iapt(&[os("convert"), os(&ckpt), os("--profile"), os("nonesuch"), os("-o"), os(&dir.path().join("a.gguf"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reference"));
    // Missing hyperparameters are bad input (1), and say how to give them.
    let o = iapt(&[os("convert"), os(&ckpt), os("-o"), os(&dir.path().join("a.gguf"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--config"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `iapt convert --base` on every architecture of the hook's table: the committed parity adapter of
/// each tiny fixture model (spec tensor names, read with a profile that maps them) converts with
/// the base model's GGUF, as llama.cpp's converter wrote it, filling `base_model_arch`, `n_layer`
/// and `n_embd`; the result validates against that model and `iapt run` gives the reference's 16
/// greedy tokens with it.
#[test]
fn convert_with_base_fills_every_supported_architecture_and_runs() {
    let models = fixtures().join("models");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(models.join("manifest.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("spec-names.json");
    let roles = ["down.weight", "down.bias", "pool.query", "up.weight", "up.bias", "act.num", "act.den"];
    let tensors: Vec<serde_json::Value> =
        roles.iter().map(|r| serde_json::json!({"pattern": format!("iapt.blk.{{layer}}.{r}"), "role": r})).collect();
    std::fs::write(&profile, serde_json::json!({"name": "spec-names", "description": "spec v1 names", "tensors": tensors}).to_string())
        .unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"activation": {"kind": "rational", "variant": "B"}, "pool_scale": 0.5}"#).unwrap();
    for arch in iapt_llama::ARCHS.iter().map(|a| a.name) {
        let case = manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == format!("{arch}-short-iapt").as_str()).unwrap();
        let base = models.join(case["model"].as_str().unwrap());
        let out = dir.path().join(format!("{arch}.iapt.gguf"));
        let ckpt = models.join(case["adapter"].as_str().unwrap());
        let o = iapt(&[
            os("convert"),
            os(&ckpt),
            os("--profile"),
            os(&profile),
            os("--config"),
            os(&config),
            os("--base"),
            os(&base),
            os("-o"),
            os(&out),
        ]);
        assert!(o.status.success(), "{arch}: {}", String::from_utf8_lossy(&o.stderr));
        let o = iapt(&[os("inspect"), os(&out), os("--json")]);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["config"]["base_model_arch"], serde_json::json!(arch), "{arch}: {doc}");
        let o = iapt(&[os("validate"), os(&out), os("--model"), os(&base)]);
        assert!(o.status.success(), "{arch}: {}", String::from_utf8_lossy(&o.stdout));
        let ids: Vec<String> = case["instruction"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let dump = dir.path().join(format!("{arch}.npy"));
        let ids = ids.join(",");
        let o = iapt(&[
            os("run"),
            os("--model"),
            os(&base),
            os("--adapter"),
            os(&out),
            os("--prompt-tokens"),
            os(&ids),
            os("--n-predict"),
            os("16"),
            os("--temp"),
            os("0"),
            os("--kv-type"),
            os("f32"),
            os("--flash-attn"),
            os("off"),
            os("--threads"),
            os("1"),
            os("--ctx-size"),
            os("256"),
            os("--dump-logits"),
            os(&dump),
        ]);
        assert!(o.status.success(), "{arch}: {}", String::from_utf8_lossy(&o.stderr));
        let got = iapt_npy::read_f32_file(&dump).unwrap();
        let n_vocab = got.shape[1];
        let tokens: Vec<i64> = got
            .data
            .chunks(n_vocab)
            .map(|g| g.iter().enumerate().fold(0, |best, (i, v)| if *v > g[best] { i } else { best }) as i64)
            .collect();
        let want: Vec<i64> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
        assert_eq!(tokens, want, "{arch}: greedy tokens with the converted adapter");
    }
}
