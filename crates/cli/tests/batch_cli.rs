//! `iapt batch` end to end on the tiny fixture model: three requests (the adapter, the base alone,
//! the adapter again on another prompt) give, request by request, exactly the text that `iapt run`
//! gives for each alone; so do five requests through 2 slots with 8 tokens per step (requests enter
//! as slots free up, prompts prefilled in chunks), with `--json` statistics; bad requests, and one
//! that can never fit its sequence's context, exit 1 naming the line, a missing file 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models")
}

fn iapt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn instruction(name: &str) -> Vec<i64> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    let c = m["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    c["instruction"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

const CTX: [&str; 10] = ["--kv-type", "f32", "--flash-attn", "off", "--threads", "1", "--ctx-size", "256", "--n-predict", "12"];

/// `iapt run` alone, greedy; the generated text without the trailing newline.
fn run_alone(model: &Path, adapter: Option<&Path>, ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
    let ids = ids.join(",");
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--prompt-tokens", &ids, "--temp", "0"];
    match adapter {
        Some(a) => args.extend(["--adapter", a.to_str().unwrap()]),
        None => args.push("--no-adapter"),
    }
    args.extend(CTX);
    let o = iapt(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The random tiny model emits byte tokens that are not UTF-8; both sides decode lossily.
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.strip_suffix('\n').unwrap_or(&s).to_owned()
}

#[test]
fn batch_equals_each_request_run_alone() {
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let (long, short) = (instruction("llama-long-iapt"), instruction("llama-short-iapt"));
    let dir = tempfile::tempdir().unwrap();
    let requests = dir.path().join("requests.jsonl");
    let lines = [
        serde_json::json!({"id": "a", "adapter": "tiny", "prompt_tokens": long}),
        serde_json::json!({"id": "b", "prompt_tokens": short}),
        serde_json::json!({"adapter": "tiny", "prompt_tokens": short}),
    ];
    std::fs::write(&requests, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = dir.path().join("out.jsonl");
    let adapter_arg = format!("tiny={}", adapter.display());
    let mut args = vec!["batch", "--model", model.to_str().unwrap(), "--adapter", &adapter_arg];
    args.extend(["--requests", requests.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    args.extend(CTX);
    let o = iapt(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["id"], "a");
    assert_eq!(results[1]["id"], "b");
    assert_eq!(results[2]["id"], 3, "a request without id is named by its line number");
    assert_eq!(results[1]["adapter"], serde_json::Value::Null);
    let want = [run_alone(&model, Some(&adapter), &long), run_alone(&model, None, &short), run_alone(&model, Some(&adapter), &short)];
    for (i, (r, w)) in results.iter().zip(&want).enumerate() {
        assert_eq!(r["text"].as_str().unwrap(), w, "request {i}");
    }
    assert_ne!(want[1], want[2], "the adapter changes the continuation of the short prompt");
}

#[test]
fn bad_requests_exit_1_naming_the_line_and_missing_files_2() {
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let requests = dir.path().join("r.jsonl");
    let adapter_arg = format!("tiny={}", adapter.display());
    let run = |body: &str| {
        std::fs::write(&requests, body).unwrap();
        iapt(&["batch", "--model", model.to_str().unwrap(), "--adapter", &adapter_arg, "--requests", requests.to_str().unwrap()])
    };
    let o = run("{\"prompt_tokens\": [1, 2]}\n{\"adapter\": \"other\", \"prompt_tokens\": [1]}\n");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("r.jsonl:2") && e.contains("unknown adapter \"other\""), "{e}");
    let o = run("{\"prompt_tokens\": [1]}\n\n{\"promt\": \"typo\"}\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("r.jsonl:3"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run("{\"prompt\": \"x\", \"prompt_tokens\": [1]}\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exactly one of"));
    let o = iapt(&["batch", "--model", model.to_str().unwrap(), "--requests", dir.path().join("none.jsonl").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read the requests"));
}

#[test]
fn requests_enter_as_slots_free_up_and_json_reports_throughput() {
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let (long, short) = (instruction("llama-long-iapt"), instruction("llama-short-iapt"));
    let dir = tempfile::tempdir().unwrap();
    let requests = dir.path().join("r.jsonl");
    let reqs: Vec<(Option<&str>, &Vec<i64>)> =
        vec![(Some("tiny"), &long), (None, &short), (Some("tiny"), &short), (None, &long), (Some("tiny"), &long)];
    let body: String = reqs.iter().map(|(a, p)| serde_json::json!({"adapter": a, "prompt_tokens": p}).to_string() + "\n").collect();
    std::fs::write(&requests, body).unwrap();
    let out = dir.path().join("out.jsonl");
    let adapter_arg = format!("tiny={}", adapter.display());
    // 2 slots for 5 requests, 8 tokens per step: prompts are prefilled in chunks beside other sequences' decode tokens.
    let mut args = vec!["batch", "--model", model.to_str().unwrap(), "--adapter", &adapter_arg, "--parallel", "2", "--batch-tokens", "8"];
    args.extend(["--requests", requests.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    args.extend(CTX);
    let o = iapt(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, ((a, p), r)) in reqs.iter().zip(&results).enumerate() {
        let want = run_alone(&model, a.map(|_| adapter.as_path()), p);
        assert_eq!(r["text"].as_str().unwrap(), want, "request {i}");
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stats: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).expect("--json: one JSON object");
    let total: u64 = results.iter().map(|r| r["n_tokens"].as_u64().unwrap()).sum();
    assert_eq!(stats["generated_tokens"].as_u64(), Some(total));
    assert_eq!(stats["parallel"].as_u64(), Some(2));
    assert!(stats["tokens_per_s"].as_f64().unwrap() > 0.0 && stats["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{stats}");

    // A request that can never fit its sequence's context (64 / 2 = 32 tokens) is refused, naming its line.
    let mut args = vec!["batch", "--model", model.to_str().unwrap(), "--adapter", &adapter_arg, "--parallel", "2"];
    args.extend(["--requests", requests.to_str().unwrap(), "--ctx-size", "64", "--n-predict", "4", "--threads", "1"]);
    let o = iapt(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("r.jsonl:1") && e.contains("exceeds the per-sequence context of 32 tokens"), "{e}");
}
