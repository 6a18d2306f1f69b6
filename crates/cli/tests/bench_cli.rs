//! `iapt bench` on the tiny llama fixture: the prefill/decode table at one sequence and the decode
//! table at several sequences at once (`--batch`), on the terminal and in `--json`. Every measured
//! step of a batch must hold all of its sequences (checked inside the debug build), and every figure
//! must be a real, positive rate; a batch outside 1..=256 is a usage error.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models")
}

#[test]
fn bench_reports_decode_at_one_and_many_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_iapt"))
        .args(["bench", "--model"])
        .arg(fixtures().join("llama-tiny-f32.gguf"))
        .arg("--adapter")
        .arg(fixtures().join("llama-tiny.iapt.safetensors"))
        .args(["--prompt-len", "12", "--gen", "4", "--reps", "2", "--threads", "1", "--batch", "3,8", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let batches = v["decode_at_batch"].as_array().unwrap();
    assert_eq!(batches.iter().map(|b| b["batch"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 3, 8]);
    for b in batches {
        for k in ["base_tps", "iapt_tps"] {
            assert!(b[k].as_f64().unwrap() > 0.0, "{b}");
        }
    }
    assert_eq!(batches[0]["base_tps"], v["base"]["decode_tps"], "batch 1 is the main run");
    for b in [3, 8] {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("| {b} | "))), "{stdout}");
        assert!(stderr.contains(&format!("batch {b}, rep 2:")), "{stderr}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_iapt"))
        .args(["bench", "--model"])
        .arg(fixtures().join("llama-tiny-f32.gguf"))
        .arg("--adapter")
        .arg(fixtures().join("llama-tiny.iapt.safetensors"))
        .args(["--batch", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
}
