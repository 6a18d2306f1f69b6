//! `iapt batch` end to end on the tiny fixture model: three requests (the adapter, the base alone,
//! the adapter again on another prompt) give, request by request, exactly the text that `iapt run`
//! gives for each alone; so do five requests through 2 slots with 8 tokens per step (requests enter
//! as slots free up, prompts prefilled in chunks), with `--json` statistics. One bad request never
//! sinks the file (issue 27, finding 3): a malformed line, an unknown adapter, a bad sampler value
//! and a request that can never fit its sequence's context each get their own error line naming
//! the line and the rule, every other request (21 of them here) is answered as alone, and the exit
//! code (1) says some failed; a missing file is 2.

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

const CTX: [&str; 12] =
    ["--kv-type", "f32", "--flash-attn", "off", "--threads", "1", "--ctx-size", "256", "--n-predict", "12", "--temp", "0"];

/// `iapt run` alone, greedy; the generated text without the trailing newline.
fn run_alone(model: &Path, adapter: Option<&Path>, ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
    let ids = ids.join(",");
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--prompt-tokens", &ids];
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
fn bad_requests_get_their_own_error_lines_and_the_rest_is_answered() {
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let short = instruction("llama-short-iapt");
    let dir = tempfile::tempdir().unwrap();
    let requests = dir.path().join("r.jsonl");
    let out = dir.path().join("out.jsonl");
    let adapter_arg = format!("tiny={}", adapter.display());
    // 25 lines: 21 good ones (with and without the adapter) around 4 bad ones.
    let bad_lines: [(usize, String, &str); 4] = [
        (3, serde_json::json!({"adapter": "other", "prompt_tokens": short}).to_string(), "unknown adapter \"other\""),
        (8, "{\"promt\": \"typo\"}".to_owned(), "not a request"),
        (13, serde_json::json!({"prompt_tokens": short, "top_p": 0.0}).to_string(), "top_p"),
        (
            20,
            serde_json::json!({"adapter": "tiny", "prompt_tokens": vec![1; 100]}).to_string(),
            "exceeds the per-sequence context of 64 tokens",
        ),
    ];
    let mut body = String::new();
    let mut good = Vec::new();
    for line in 1..=25usize {
        match bad_lines.iter().find(|(l, ..)| *l == line) {
            Some((_, text, _)) => body.push_str(text),
            None => {
                let a = (line % 2 == 0).then_some("tiny");
                body.push_str(&serde_json::json!({"adapter": a, "prompt_tokens": short}).to_string());
                good.push((line, a));
            }
        }
        body.push('\n');
    }
    assert_eq!(good.len(), 21);
    std::fs::write(&requests, body).unwrap();
    let mut args = vec!["batch", "--model", model.to_str().unwrap(), "--adapter", &adapter_arg, "--parallel", "4"];
    args.extend(["--requests", requests.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    args.extend(["--kv-type", "f32", "--flash-attn", "off", "--threads", "1", "--ctx-size", "256", "--n-predict", "12", "--temp", "0"]);
    let o = iapt(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "some requests failed: {stderr}");
    assert!(stderr.contains("4 of 25 requests failed"), "{stderr}");
    let results: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 25, "one output line per request, in order");
    for (line, _, rule) in &bad_lines {
        let r = &results[line - 1];
        assert_eq!(r["error"]["line"].as_u64(), Some(*line as u64), "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(rule), "line {line}: {r}");
        assert!(stderr.contains(&format!("r.jsonl:{line}: ")), "{stderr}");
    }
    let (with, without) = (run_alone(&model, Some(&adapter), &short), run_alone(&model, None, &short));
    for (line, a) in good {
        let r = &results[line - 1];
        assert!(r.get("error").is_none(), "line {line}: {r}");
        assert_eq!(r["text"].as_str().unwrap(), if a.is_some() { &with } else { &without }, "line {line}");
    }
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
}
