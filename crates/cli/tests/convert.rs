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
