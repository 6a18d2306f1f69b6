//! `iapt serve` end to end over HTTP (each test starts its own server on an ephemeral loopback
//! port, bounds every wait and always stops it). Expected outputs come from `iapt run`, from the
//! log-softmax of `iapt run --dump-logits`, or from the same request sent alone, never hard-coded.
//! - `completions_and_chat_equal_iapt_run`: greedy text, streamed and not, with the adapter and
//!   the base, for a text prompt and for chat messages (`iapt run --chat`); /v1/models, usage;
//! - `token_id_logprobs_are_the_log_softmax_of_dumped_logits`: to 1e-4, top-5 included;
//! - `sixteen_concurrent_requests_each_equal_alone`: three adapters and the base, streamed and not;
//! - `bad_input_is_a_4xx_error_object_naming_the_field`: every class of bad input;
//! - `queue_full_is_503_with_retry_after` and `client_disconnect_cancels_its_sequence`;
//! - `adapters_load_and_unload_at_run_time_inside_the_directory_only`;
//! - `api_key_guards_everything_but_health`, `metrics_count_requests_and_tokens`;
//! - `hundreds_of_mixed_requests_at_once_are_all_answered`: then /health is still 200;
//! - `sigterm_lets_the_in_flight_request_finish_and_exits_0`;
//! - `the_readme_command_serves_the_demo`: the README's demo server and curl body;
//! - `serve_over_an_rpc_worker_equals_iapt_run`: `--rpc` puts the layers on an `iapt rpc-server`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::*;

fn tiny_model() -> PathBuf {
    fixtures().join("llama-tiny-f32.gguf")
}

fn tiny_adapter() -> PathBuf {
    fixtures().join("llama-tiny.iapt.safetensors")
}

fn tiny_server(extra: &[&str]) -> Server {
    let args = tiny_args(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// The arguments of [`tiny_server`].
fn tiny_args(extra: &[&str]) -> Vec<String> {
    let (m, a) = (tiny_model(), format!("tiny={}", tiny_adapter().display()));
    let mut args = vec!["--model".to_owned(), m.display().to_string(), "--adapter".to_owned(), a];
    if !extra.contains(&"--ctx-size") {
        args.extend(["--ctx-size".to_owned(), "1024".to_owned()]);
    }
    args.extend(EXACT.iter().map(|s| (*s).to_owned()));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn ids_text(ids: &[i64]) -> String {
    ids.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

/// Random adapters for the tiny llama fixture (m = 2 and 3), written to `dir`.
fn random_adapters(dir: &Path) -> Vec<PathBuf> {
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let base = iapt_format::BaseModelInfo::read(&tiny_model()).unwrap();
    [(2, 8), (3, 16)]
        .into_iter()
        .enumerate()
        .map(|(i, (m, r))| {
            let spec = AdapterSpec::small(base.n_layer, base.n_embd, m, r, iapt_format::Activation::Silu);
            let a = random_adapter(&spec, &mut Rng::new(0x5E7 + i as u64)).unwrap();
            let mut cfg = a.config().clone();
            cfg.base_model_arch = base.arch.clone();
            let a = iapt_format::Adapter::from_parts(cfg, a.extras().clone(), a.tensors().to_vec()).unwrap();
            let path = dir.join(format!("r{i}.safetensors"));
            a.save(&path, iapt_format::Container::Safetensors).unwrap();
            path
        })
        .collect()
}

#[test]
fn completions_and_chat_equal_iapt_run() {
    let s = tiny_server(&[]);
    assert!(s.ready_line.contains("llama-tiny-f32") && s.ready_line.contains("tiny"), "{}", s.ready_line);
    assert_eq!(s.get("/health").status, 200);
    let models = s.get("/v1/models").json();
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{models}");
    assert_eq!(data[0]["id"], "llama-tiny-f32");
    assert_eq!((&data[1]["id"], &data[1]["parent"]), (&json!("tiny"), &json!("llama-tiny-f32")));
    let prompt = "write the list backwards: b a c";
    for (model, adapter) in [("tiny", Some(tiny_adapter())), ("llama-tiny-f32", None)] {
        let want = run_alone(&tiny_model(), adapter.as_deref(), prompt, false, false, 12, &EXACT);
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
        let r = s.post_json("/v1/completions", &body).json();
        assert_eq!(r["choices"][0]["text"].as_str().unwrap(), want, "{model}");
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["model"], model);
        let n = r["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(n > 0 && n <= 12 && r["usage"]["total_tokens"].as_u64() == Some(n + r["usage"]["prompt_tokens"].as_u64().unwrap()), "{r}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let chunks = s.open_stream("/v1/completions", &streamed).chunks();
        assert_eq!(stream_text(&chunks), want, "{model} streamed");
        assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

        let want = run_alone(&tiny_model(), adapter.as_deref(), prompt, false, true, 12, &EXACT);
        let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0});
        let r = s.post_json("/v1/chat/completions", &body).json();
        assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), want, "{model} chat");
        assert_eq!(r["choices"][0]["message"]["role"], "assistant");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let chunks = s.open_stream("/v1/chat/completions", &streamed).chunks();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(stream_text(&chunks), want, "{model} chat streamed");
    }
    assert!(s.stop().success());
}

/// log-softmax of one logits row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn token_id_logprobs_are_the_log_softmax_of_dumped_logits() {
    let s = tiny_server(&[]);
    let ids = instruction("llama-long-iapt");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.npy");
    let mut extra = EXACT.to_vec();
    extra.extend(["--dump-logits", dump.to_str().unwrap()]);
    let want_text = run_alone(&tiny_model(), Some(&tiny_adapter()), &ids_text(&ids), true, false, 8, &extra);
    let logits = iapt_npy::read_f32_file(&dump).unwrap();
    let (steps, n_vocab) = (logits.shape[0], logits.shape[1]);
    let body = json!({"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 5});
    let r = s.post_json("/v1/completions", &body).json();
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), want_text);
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    let lp = &r["choices"][0]["logprobs"];
    let token_lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_lps.len(), steps, "{lp}");
    for (i, got) in token_lps.iter().enumerate() {
        let ls = log_softmax(&logits.data[i * n_vocab..(i + 1) * n_vocab]);
        let mut sorted = ls.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Greedy: the chosen token is the most likely one.
        assert!((got.as_f64().unwrap() - sorted[0]).abs() < 1e-4, "step {i}: {got} vs {}", sorted[0]);
        let mut top: Vec<f64> = lp["top_logprobs"][i].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).collect();
        top.sort_by(|a, b| b.total_cmp(a));
        // Token texts can coincide (byte tokens), merging keys: every value given is one of the top 5.
        assert!(!top.is_empty() && top.len() <= 5);
        for v in &top {
            assert!(sorted[..5].iter().any(|w| (v - w).abs() < 1e-4), "step {i}: {v} not among {:?}", &sorted[..5]);
        }
    }
    // Chat-shaped log-probabilities with the same ids as a completion prompt, streamed: one per token.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = s.open_stream("/v1/completions", &streamed).chunks();
    let streamed_lps: Vec<f64> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"][0].as_f64()).collect();
    let whole: Vec<f64> = token_lps.iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(streamed_lps.len(), whole.len());
    assert!(streamed_lps.iter().zip(&whole).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn sixteen_concurrent_requests_each_equal_alone() {
    let dir = tempfile::tempdir().unwrap();
    let r = random_adapters(dir.path());
    let (a1, a2) = (format!("r1={}", r[0].display()), format!("r2={}", r[1].display()));
    let s = tiny_server(&["--adapter", &a1, "--adapter", &a2, "--parallel", "16", "--ctx-size", "2048", "--batch-tokens", "64"]);
    let prompts = [instruction("llama-short-iapt"), instruction("llama-long-iapt")];
    let models = ["tiny", "r1", "r2", "llama-tiny-f32"];
    let bodies: Vec<serde_json::Value> = (0..16)
        .map(|i| json!({"model": models[i % 4], "prompt": prompts[(i / 4) % 2], "max_tokens": 10, "temperature": 0, "stream": i % 3 == 0, "logprobs": 1}))
        .collect();
    let answer = |s: &Server, b: &serde_json::Value| -> (String, Vec<f64>) {
        if b["stream"] == json!(true) {
            let chunks = s.open_stream("/v1/completions", b).chunks();
            let lps = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"][0].as_f64()).collect();
            (stream_text(&chunks), lps)
        } else {
            let r = s.post_json("/v1/completions", b).json();
            let lps = r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            (r["choices"][0]["text"].as_str().unwrap().to_owned(), lps)
        }
    };
    let alone: Vec<(String, Vec<f64>)> = bodies.iter().map(|b| answer(&s, b)).collect();
    let together: Vec<(String, Vec<f64>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = bodies.iter().map(|b| sc.spawn(|| answer(&s, b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.0, t.0, "request {i} ({})", bodies[i]);
        assert_eq!(a.1.len(), t.1.len(), "request {i}");
        assert!(a.1.iter().zip(&t.1).all(|(x, y)| (x - y).abs() < 1e-4), "request {i}: {:?} vs {:?}", a.1, t.1);
    }
    assert_ne!(alone[0].0, alone[3].0, "the adapter changes the continuation");
    assert_ne!(alone[1].0, alone[2].0, "the two random adapters differ");
}

#[test]
fn bad_input_is_a_4xx_error_object_naming_the_field() {
    let s = tiny_server(&["--ctx-size", "256", "--parallel", "2", "--max-body", "65536"]);
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    s.post(c, "{\"model\": \"tiny\", \"prompt\": ").assert_error(400, None);
    s.post(c, "not json").assert_error(400, None);
    s.post(c, "[1, 2]").assert_error(400, None);
    s.post(c, "").assert_error(400, None);
    let cases: Vec<(&str, serde_json::Value, u16, Option<&str>)> = vec![
        (c, json!({"model": "tiny", "prompt": "x", "temperature": "hot"}), 400, Some("temperature")),
        (c, json!({"model": "tiny", "prompt": "x", "temperature": -1}), 400, Some("temperature")),
        (c, json!({"model": "tiny", "prompt": "x", "top_p": 1.5}), 400, Some("top_p")),
        (c, json!({"model": "tiny", "prompt": "x", "top_k": -2}), 400, Some("top_k")),
        (c, json!({"model": "tiny", "prompt": "x", "min_p": 2}), 400, Some("min_p")),
        (c, json!({"model": "tiny", "prompt": "x", "repeat_penalty": 0}), 400, Some("repeat_penalty")),
        (c, json!({"model": "tiny", "prompt": "x", "max_tokens": 0}), 400, Some("max_tokens")),
        (c, json!({"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400, Some("max_tokens")),
        (c, json!({"model": "tiny", "prompt": "x", "n": 3}), 400, Some("n")),
        (c, json!({"model": "tiny", "prompt": "x", "n": 0}), 400, Some("n")),
        (c, json!({"model": "tiny", "prompt": "x", "echo": true}), 400, Some("echo")),
        (c, json!({"model": "tiny", "prompt": "x", "response_format": {"type": "xml"}}), 400, Some("response_format")),
        (
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}),
            400,
            Some("response_format.json_schema.schema"),
        ),
        (
            c,
            json!({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": 5}}}}),
            400,
            Some("response_format"),
        ),
        (c, json!({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}), 400, Some("logit_bias.abc")),
        (c, json!({"model": "tiny", "prompt": "x", "logit_bias": {"999999": 1}}), 400, Some("logit_bias")),
        (c, json!({"model": "tiny", "prompt": "x", "logit_bias": {"5": -101}}), 400, Some("logit_bias.5")),
        (c, json!({"model": "tiny", "prompt": ["x", {"a": 1}]}), 400, Some("prompt[1]")),
        (c, json!({"model": "tiny", "prompt": "x", "logprobs": 99}), 400, Some("logprobs")),
        (c, json!({"model": "tiny", "prompt": "x", "stop": ["", "a"]}), 400, Some("stop[0]")),
        (c, json!({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, Some("stop")),
        (c, json!({"model": "tiny", "prompt": "x", "seed": 1e20}), 400, Some("seed")),
        (c, json!({"model": "tiny", "prompt": [1, 999999]}), 400, Some("prompt")),
        (c, json!({"model": "tiny", "prompt": [[1, 2], [1, 999999]]}), 400, Some("prompt")),
        (c, json!({"model": "tiny", "prompt": []}), 400, Some("prompt")),
        (c, json!({"model": "tiny", "prompt": {"text": "x"}}), 400, Some("prompt")),
        (c, json!({"model": "tiny"}), 400, Some("prompt")),
        (c, json!({"prompt": "x"}), 400, Some("model")),
        (c, json!({"model": 7, "prompt": "x"}), 400, Some("model")),
        (c, json!({"model": "nope", "prompt": "x"}), 404, Some("model")),
        (c, json!({"model": "tiny", "prompt": vec![1; 300]}), 400, Some("prompt")),
        (c, json!({"model": "tiny", "prompt": "x", "max_tokens": 100000}), 400, Some("prompt")),
        (chat, json!({"model": "tiny", "messages": []}), 400, Some("messages")),
        (chat, json!({"model": "tiny", "messages": "hi"}), 400, Some("messages")),
        (chat, json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400, Some("messages[0].role")),
        (chat, json!({"model": "tiny", "messages": [{"role": "user", "content": {"a": 1}}]}), 400, Some("messages[0].content")),
        (chat, json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}), 400, Some("top_logprobs")),
        (chat, json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}), 400, Some("n")),
        (chat, json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 200}), 400, Some("n")),
        (chat, json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, Some("model")),
        (chat, json!({"model": "tiny", "messages": [{"role": "user", "content": "x ".repeat(400)}]}), 400, Some("messages")),
    ];
    for (path, body, status, param) in &cases {
        let e = s.post_json(path, body).assert_error(*status, *param);
        if *status == 404 {
            assert_eq!(e["code"], "model_not_found");
        }
    }
    let e = s.post_json(c, &json!({"model": "tiny", "prompt": vec![1; 300]})).assert_error(400, Some("prompt"));
    assert_eq!(e["code"], "context_length_exceeded");
    // The body cap: 413 with an error object.
    let big = json!({"model": "tiny", "prompt": "x".repeat(70_000)});
    s.post_json(c, &big).assert_error(413, None);
    // Unknown routes and methods.
    s.get("/v1/nothing").assert_error(404, None);
    s.get("/v1/completions").assert_error(405, None);
    // Nothing broke: a good request still runs, and /health is 200.
    let r = s.post_json(c, &json!({"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.post_json(c, &json!({"model": "tiny", "prompt": "x", "max_tokens": 2, "response_format": {"type": "text"}}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.get("/health").status, 200);
    assert!(s.metric("iapt_http_errors_total{status=\"400\"}") >= 30.0);
}

/// A long request that runs until cancelled (past end-of-generation tokens).
fn long_body(model: &str) -> serde_json::Value {
    json!({"model": model, "prompt": [1, 2, 3], "max_tokens": 30000, "temperature": 0, "ignore_eos": true, "stream": true})
}

#[test]
fn queue_full_is_503_with_retry_after() {
    let s = tiny_server(&["--parallel", "1", "--queue", "1", "--ctx-size", "32768"]);
    let mut running = s.open_stream("/v1/completions", &long_body("tiny"));
    assert!(running.next_data().is_some(), "the first request runs");
    std::thread::scope(|sc| {
        let queued = sc.spawn(|| {
            let mut r = s.open_stream("/v1/completions", &long_body("tiny"));
            r.next_data().is_some()
        });
        s.wait_until("one request queued", |s| s.metric("iapt_requests_queued") == 1.0);
        let r = s.post_json("/v1/completions", &json!({"model": "tiny", "prompt": "x", "max_tokens": 2}));
        let e = r.assert_error(503, None);
        assert_eq!(e["code"], "queue_full");
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        drop(running);
        assert!(queued.join().unwrap(), "the queued request runs once the slot frees");
    });
    s.wait_until("everything cancelled", |s| s.metric("iapt_requests_running") + s.metric("iapt_requests_queued") == 0.0);
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn client_disconnect_cancels_its_sequence() {
    let s = tiny_server(&["--parallel", "2", "--ctx-size", "65536"]);
    let mut stream = s.open_stream("/v1/completions", &long_body("tiny"));
    for _ in 0..3 {
        assert!(stream.next_data().is_some());
    }
    // Another request, alongside: unaffected.
    let body = json!({"model": "tiny", "prompt": "write the list backwards: b a c", "max_tokens": 12, "temperature": 0});
    let alone_before = s.post_json("/v1/completions", &body).json()["choices"][0]["text"].clone();
    drop(stream);
    s.wait_until("the disconnected request cancelled", |s| s.metric("iapt_requests_total{model=\"tiny\",outcome=\"cancelled\"}") == 1.0);
    s.wait_until("no request running", |s| s.metric("iapt_requests_running") == 0.0 && s.metric("iapt_requests_in_flight") == 0.0);
    assert!(s.metric("iapt_completion_tokens_total{model=\"tiny\"}") < 30000.0, "the sequence stopped early");
    let after = s.post_json("/v1/completions", &body).json()["choices"][0]["text"].clone();
    assert_eq!(alone_before, after);
}

#[test]
fn adapters_load_and_unload_at_run_time_inside_the_directory_only() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("adapters");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(tiny_adapter(), dir.join("copy.safetensors")).unwrap();
    std::fs::copy(tiny_adapter(), root.path().join("outside.safetensors")).unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.safetensors"), dir.join("link.safetensors")).unwrap();
    std::fs::write(dir.join("broken.safetensors"), b"not an adapter").unwrap();
    let qwen = fixtures().join("qwen2-tiny.iapt.safetensors");
    std::fs::copy(&qwen, dir.join("qwen.safetensors")).unwrap();
    let s = tiny_server(&["--adapter-dir", dir.to_str().unwrap()]);
    let load = |name: &str, path: &str| s.post_json("/v1/adapters", &json!({"name": name, "path": path}));
    let r = load("copy", "copy.safetensors");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["parent"], "llama-tiny-f32");
    // Resident first (the base, then adapters), then the directory's other files, not resident.
    let resident = |s: &Server| -> Vec<String> {
        let v = s.get("/v1/models").json();
        v["data"].as_array().unwrap().iter().filter(|m| m["resident"] != false).map(|m| m["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(resident(&s), ["llama-tiny-f32", "copy", "tiny"]);
    let ask = |model: &str| s.post_json("/v1/completions", &json!({"model": model, "prompt": "b a c", "max_tokens": 8, "temperature": 0}));
    assert_eq!(ask("copy").json()["choices"][0]["text"], ask("tiny").json()["choices"][0]["text"], "the same file gives the same text");
    for bad in [
        "../outside.safetensors",
        "link.safetensors",
        root.path().join("outside.safetensors").to_str().unwrap(),
        "missing.safetensors",
        "sub/../../outside.safetensors",
    ] {
        load("x", bad).assert_error(403, Some("path"));
    }
    let e = load("x", "broken.safetensors").assert_error(400, Some("path"));
    assert!(e["message"].as_str().unwrap().contains('E'), "spec codes in {e}");
    let e = load("x", "qwen.safetensors").assert_error(400, Some("path"));
    assert!(e["message"].as_str().unwrap().contains("E3"), "spec codes in {e}");
    load("copy", "copy.safetensors").assert_error(409, Some("name"));
    load("llama-tiny-f32", "copy.safetensors").assert_error(409, Some("name"));
    load("bad name!", "copy.safetensors").assert_error(400, Some("name"));
    s.post("/v1/adapters", "{\"name\": 3}").assert_error(400, Some("name"));
    assert_eq!(resident(&s).len(), 3, "refused loads changed nothing");
    let r = agent().delete(&s.url("/v1/adapters/copy")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(resident(&s), ["llama-tiny-f32", "tiny"]);
    let r = agent().delete(&s.url("/v1/adapters/copy")).call().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // The directory's copy.safetensors still serves `model` = "copy", loaded again on demand.
    assert_eq!(ask("copy").json()["choices"][0]["text"], ask("tiny").json()["choices"][0]["text"]);
    assert_eq!(resident(&s), ["llama-tiny-f32", "copy", "tiny"]);
    // Without --adapter-dir both are refused.
    let plain = tiny_server(&[]);
    plain.post_json("/v1/adapters", &json!({"name": "c", "path": "copy.safetensors"})).assert_error(403, None);
    assert_eq!(agent().delete(&plain.url("/v1/adapters/tiny")).call().unwrap().status().as_u16(), 403);
}

/// A GET or POST with `key` as the bearer token; the status.
fn status_with(s: &Server, method: &str, path: &str, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    let r = match method {
        "GET" => agent().get(&s.url(path)).header("authorization", &auth).call(),
        "DELETE" => agent().delete(&s.url(path)).header("authorization", &auth).call(),
        _ => agent()
            .post(&s.url(path))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(json!({"model": "tiny", "prompt": "x", "max_tokens": 2, "name": "a", "path": "missing.gguf"}).to_string()),
    };
    r.unwrap().status().as_u16()
}

/// Issue 27, finding 5: the API key guards the inference routes; the admin routes (adapters,
/// metrics) need the admin key, and an inference key gets 403 there; with an API key and no admin
/// key they are off; keys come from files and the environment; an empty key is refused at start.
#[test]
fn api_and_admin_keys_guard_their_routes() {
    let s = tiny_server(&["--api-key", "k3y"]);
    assert_eq!(s.get("/health").status, 200);
    let e = s.get("/v1/models").assert_error(401, None);
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(status_with(&s, "GET", "/v1/models", "k3"), 401);
    assert_eq!(status_with(&s, "GET", "/v1/models", "k3y"), 200);
    assert_eq!(status_with(&s, "POST", "/v1/completions", "k3y"), 200);
    s.post_json("/v1/completions", &json!({"model": "tiny", "prompt": "x"})).assert_error(401, None);
    // No admin key: the admin routes are off, whatever the key.
    for (m, path) in [("GET", "/metrics"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/a")] {
        assert_eq!(status_with(&s, m, path, "k3y"), 403, "{m} {path}");
    }
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let (api_file, admin_file) = (dir.path().join("api.key"), dir.path().join("admin.key"));
    std::fs::write(&api_file, "user-key\n").unwrap();
    std::fs::write(&admin_file, "admin-key\n").unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir(&adapters).unwrap();
    let s = tiny_server(&[
        "--api-key-file",
        api_file.to_str().unwrap(),
        "--admin-key-file",
        admin_file.to_str().unwrap(),
        "--adapter-dir",
        adapters.to_str().unwrap(),
    ]);
    assert_eq!(status_with(&s, "POST", "/v1/completions", "user-key"), 200);
    assert_eq!(status_with(&s, "POST", "/v1/completions", "admin-key"), 200, "the admin key runs inference too");
    for (m, path) in [("GET", "/metrics"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/a")] {
        assert_eq!(status_with(&s, m, path, "user-key"), 403, "{m} {path}: an inference key cannot manage adapters");
        assert_eq!(status_with(&s, m, path, "nope"), 401, "{m} {path}");
    }
    assert_eq!(status_with(&s, "GET", "/metrics", "admin-key"), 200);
    assert_eq!(status_with(&s, "POST", "/v1/adapters", "admin-key"), 403, "a path outside the directory, with the right key");
    drop(s);

    // The environment, and an empty key refused (it would turn authentication off).
    let env_args = tiny_args(&[]);
    let env_args: Vec<&str> = env_args.iter().map(String::as_str).collect();
    let env_server = Server::start_with_env(&env_args, &[("IAPT_API_KEY", "env-key")]);
    assert_eq!(status_with(&env_server, "GET", "/v1/models", "env-key"), 200);
    assert_eq!(status_with(&env_server, "GET", "/v1/models", "k3y"), 401);
    drop(env_server);
    let model = fixtures().join("llama-tiny-f32.gguf");
    std::fs::write(&api_file, "\n").unwrap();
    for args in [vec!["--api-key", ""], vec!["--api-key-file", api_file.to_str().unwrap()]] {
        let o = Command::new(iapt_bin()).arg("serve").arg("--model").arg(&model).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("the key is empty"), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn metrics_count_requests_and_tokens() {
    let s = tiny_server(&[]);
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    for i in 0..3 {
        let r = s
            .post_json("/v1/completions", &json!({"model": "tiny", "prompt": format!("b a c {i}"), "max_tokens": 5, "temperature": 0}))
            .json();
        prompt_tokens += r["usage"]["prompt_tokens"].as_u64().unwrap();
        completion_tokens += r["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let r = s.get("/metrics");
    assert!(r.body.contains("# TYPE iapt_time_to_first_token_seconds histogram"), "{}", r.body);
    assert_eq!(s.metric("iapt_prompt_tokens_total{model=\"tiny\"}"), prompt_tokens as f64);
    assert_eq!(s.metric("iapt_completion_tokens_total{model=\"tiny\"}"), completion_tokens as f64);
    assert_eq!(s.metric("iapt_time_to_first_token_seconds_count{model=\"tiny\"}"), 3.0);
    assert_eq!(s.metric("iapt_inter_token_latency_seconds_count{model=\"tiny\"}"), (completion_tokens - 3) as f64);
    assert_eq!(s.metric("iapt_requests_total{model=\"tiny\""), 3.0);
    assert_eq!(s.metric("iapt_requests_running"), 0.0);
    // The engine's counters: one request at a time, so one prefill step each and then one
    // decode-only step per further token (one more where a request ended at end-of-generation).
    let decode_tokens = s.metric("iapt_engine_decode_only_tokens_total");
    assert!((completion_tokens - 3) as f64 <= decode_tokens && decode_tokens <= completion_tokens as f64, "{}", r.body);
    assert_eq!(s.metric("iapt_engine_steps_total"), 3.0 + s.metric("iapt_engine_decode_only_steps_total"));
    let (all, llama) = (s.metric("iapt_engine_decode_only_seconds_total"), s.metric("iapt_engine_decode_only_llama_seconds_total"));
    assert!(0.0 < llama && llama <= all && all <= s.metric("iapt_engine_step_seconds_total"), "{}", r.body);
}

#[test]
fn hundreds_of_mixed_requests_at_once_are_all_answered() {
    let s = tiny_server(&["--parallel", "4", "--ctx-size", "1024", "--queue", "512"]);
    let model = |i: usize| if i % 2 == 0 { "tiny" } else { "llama-tiny-f32" };
    let good = |i: usize| json!({"model": model(i), "prompt": format!("b a c {}", i % 5), "max_tokens": 6, "temperature": 0});
    // Alone, one at a time: the expected text of each (model, prompt) pair.
    let alone: Vec<String> =
        (0..10).map(|i| s.post_json("/v1/completions", &good(i)).json()["choices"][0]["text"].as_str().unwrap().to_owned()).collect();
    let check = |i: usize| match i % 6 {
        0 | 1 => {
            let mut b = good(i);
            let text = if i % 4 == 1 {
                b["stream"] = json!(true);
                stream_text(&s.open_stream("/v1/completions", &b).chunks())
            } else {
                s.post_json("/v1/completions", &b).json()["choices"][0]["text"].as_str().unwrap().to_owned()
            };
            assert_eq!(text, alone[i % 10], "request {i}");
        }
        2 => {
            s.post("/v1/completions", "{\"model\": \"tiny\", \"prompt\"").assert_error(400, None);
        }
        3 => {
            s.post_json("/v1/chat/completions", &json!({"model": format!("m{i}"), "messages": [{"role": "user", "content": "x"}]}))
                .assert_error(404, Some("model"));
        }
        4 => {
            s.post_json("/v1/completions", &json!({"model": "tiny", "prompt": "x", "n": 5})).assert_error(400, Some("n"));
        }
        _ => {
            s.post_json("/v1/completions", &json!({"model": model(i), "prompt": vec![1; 2000]})).assert_error(400, Some("prompt"));
        }
    };
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..300).map(|i| sc.spawn(move || check(i))).collect();
        for h in hs {
            h.join().expect("every answer as expected");
        }
    });
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.metric("iapt_requests_running") + s.metric("iapt_requests_queued") + s.metric("iapt_requests_in_flight"), 0.0);
    assert!(s.stop().success());
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_and_exits_0() {
    let s = tiny_server(&["--ctx-size", "32768", "--parallel", "1", "--grace", "30"]);
    let mut body = long_body("tiny");
    body["max_tokens"] = json!(4000);
    let mut stream = s.open_stream("/v1/completions", &body);
    assert!(stream.next_data().is_some());
    let base = s.base.clone();
    let status = std::thread::scope(|sc| {
        let stopping = sc.spawn(|| s.stop());
        let chunks = stream.chunks();
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length", "the in-flight request ran to its end");
        stopping.join().unwrap()
    });
    assert!(status.success(), "{status:?}");
    assert!(agent().get(&format!("{base}/health")).call().is_err(), "nothing listens after the stop");
}

#[test]
fn the_readme_command_serves_the_demo() {
    let assets = repo().join("converters/python/demo/assets");
    let (model, adapter) = (assets.join("base-q4_k_m.gguf"), assets.join("adapter.iapt.gguf"));
    let a = format!("reverse={}", adapter.display());
    let s = Server::start(&["--model", model.to_str().unwrap(), "--adapter", &a]);
    let line = std::fs::read_to_string(assets.join("demo_prompts.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let instruction = first["instruction"].as_str().unwrap();
    // The README's curl body.
    let body = json!({"model": "reverse", "prompt": instruction, "max_tokens": 24, "temperature": 0, "stop": ["\n"]});
    let got = s.post_json("/v1/completions", &body).json()["choices"][0]["text"].as_str().unwrap().to_owned();
    let want = run_alone(&model, Some(&adapter), instruction, false, false, 24, &[]);
    assert_eq!(got, want.split('\n').next().unwrap());
    assert_eq!(got.trim(), first["response"].as_str().unwrap(), "the adapter answers the held-out instruction");
    // The demo model ships its prompt format as a chat template (the instruction alone): chat gives
    // the completions path's prompt tokens and, at temperature 0, its tokens.
    let chat = json!({"model": "reverse", "messages": [{"role": "user", "content": instruction}], "max_tokens": 24, "temperature": 0,
        "logprobs": true});
    let c = s.post_json("/v1/chat/completions", &chat).json();
    let mut plain = body.clone();
    plain["logprobs"] = json!(0);
    plain.as_object_mut().unwrap().remove("stop");
    let p = s.post_json("/v1/completions", &plain).json();
    assert_eq!(c["usage"]["prompt_tokens"], p["usage"]["prompt_tokens"]);
    let chat_tokens: Vec<&str> =
        c["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap()).collect();
    let plain_tokens: Vec<&str> = p["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(!plain_tokens.is_empty());
    assert_eq!(chat_tokens, plain_tokens, "chat and completions, token for token");
    // A conversation the template refuses is a 400 naming messages, with the template's words.
    let two = json!({"model": "reverse", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": instruction}]});
    let e = s.post_json("/v1/chat/completions", &two).assert_error(400, Some("messages"));
    assert!(e["message"].as_str().unwrap().contains("exactly one user message"), "{e}");
}

/// `iapt serve --rpc`: the base model's layers on an `iapt rpc-server` worker (127.0.0.1, an
/// ephemeral port, killed on drop); greedy text equals the local `iapt run` with the same adapter.
#[test]
fn serve_over_an_rpc_worker_equals_iapt_run() {
    struct Worker(std::process::Child);
    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _worker = Worker(
        std::process::Command::new(iapt_bin())
            .args(["rpc-server", "--host", "127.0.0.1", "--port", &port.to_string(), "--threads", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start iapt rpc-server"),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the worker did not listen within {WAIT:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let endpoint = format!("127.0.0.1:{port}");
    let s = tiny_server(&["--rpc", &endpoint, "--verbose"]);
    let ids = instruction("llama-long-iapt");
    let want_text = run_alone(&tiny_model(), Some(&tiny_adapter()), &ids_text(&ids), true, false, 8, &EXACT);
    let body = json!({"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0});
    let r = s.post_json("/v1/completions", &body).json();
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), want_text, "over RPC vs local");
    let err = s.stderr_text();
    assert!(err.contains(&format!("RPC0 ({endpoint})")), "the worker's device must be listed: {err}");
}

/// `/tokenize` and `/detokenize` (llama-server's shapes): the ids `/tokenize` gives for a text,
/// sent as `prompt` ids, make the same greedy completion as the text itself (so they are the ids
/// the server feeds the model), and as many as the text's `usage.prompt_tokens`; BOS only when
/// asked; pieces that join to the text `/detokenize` gives back; bad input a 400 naming the field.
#[test]
fn tokenize_and_detokenize_agree_with_the_completions_path() {
    let server = tiny_server(&[]);
    let text = "hello world, caf\u{e9} \u{1f600} 42";
    let toks = |body: serde_json::Value| -> Vec<i64> {
        let r = server.post_json("/tokenize", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
    };
    let with_bos = toks(json!({"content": text, "add_special": true}));
    let plain = toks(json!({"content": text}));
    assert!(with_bos.len() == plain.len() + 1 && with_bos[1..] == plain[..], "{with_bos:?} vs {plain:?}");

    for model in ["llama-tiny-f32", "tiny"] {
        let by_text = server.post_json("/v1/completions", &json!({"model": model, "prompt": text, "max_tokens": 6, "temperature": 0}));
        let by_ids = server.post_json("/v1/completions", &json!({"model": model, "prompt": with_bos, "max_tokens": 6, "temperature": 0}));
        assert_eq!(by_text.status, 200, "{}", by_text.body);
        let (a, b) = (by_text.json(), by_ids.json());
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "{model}");
        assert_eq!(a["usage"]["prompt_tokens"].as_u64(), Some(with_bos.len() as u64), "{model}");
    }
    // Special-token text is parsed, by /tokenize and in a completions prompt alike (llama-server's
    // rule): "</s>" is the end-of-sequence token, one id.
    let special = toks(json!({"content": "a</s>", "add_special": true}));
    assert_eq!(special.last(), Some(&2), "{special:?}");
    let r = server.post_json("/v1/completions", &json!({"model": "tiny", "prompt": "a</s>", "max_tokens": 1})).json();
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(special.len() as u64));

    let r = server.post_json("/tokenize", &json!({"content": text, "with_pieces": true}));
    let pieces = r.json()["tokens"].as_array().unwrap().clone();
    assert_eq!(pieces.iter().map(|p| p["id"].as_i64().unwrap()).collect::<Vec<_>>(), plain);
    let mut joined = Vec::new();
    for p in &pieces {
        match &p["piece"] {
            serde_json::Value::String(s) => joined.extend_from_slice(s.as_bytes()),
            serde_json::Value::Array(b) => joined.extend(b.iter().map(|x| x.as_u64().unwrap() as u8)),
            other => panic!("piece {other}"),
        }
    }
    let back = server.post_json("/detokenize", &json!({"tokens": plain}));
    assert_eq!(back.status, 200, "{}", back.body);
    let content = back.json()["content"].as_str().unwrap().to_owned();
    assert_eq!(content.as_bytes(), &joined[..]);
    // The tokenizer may add its leading space (SentencePiece); the text comes back otherwise whole.
    assert!(content == text || content.strip_prefix(' ') == Some(text), "{content:?}");

    server.post_json("/detokenize", &json!({"tokens": [1, -1]})).assert_error(400, Some("tokens[1]"));
    server.post_json("/detokenize", &json!({"tokens": [1_000_000]})).assert_error(400, Some("tokens[0]"));
    server.post_json("/detokenize", &json!({"tokens": "1,2"})).assert_error(400, Some("tokens"));
    server.post_json("/tokenize", &json!({"content": 5})).assert_error(400, Some("content"));
    server.post_json("/tokenize", &json!({"text": "x"})).assert_error(400, None);
    server.stop();
}

/// Issue 33's surface on the tiny fixture, each answer against the same request sent another way:
/// - `n = 4` at temperature 1: choice i is the single request with seed + i; the prompt is counted
///   once in `usage`; streamed, every chunk names its choice and the texts are the same;
/// - a `prompt` array with `n = 2`: choice `i * 2 + j` is prompt i's choice j sent alone;
/// - `logit_bias`: -100 on the greedy first token changes it, +100 on another token makes it
///   first;
/// - `response_format` `json_schema`: 8 choices at temperature 1 all parse and satisfy the schema.
#[test]
fn choices_batches_logit_bias_and_json_output() {
    let s = tiny_server(&["--parallel", "8", "--ctx-size", "4096"]);
    let c = "/v1/completions";
    let p = instruction("llama-long-iapt");
    let body = |extra: serde_json::Value| {
        let mut b = json!({"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 1, "seed": 5});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let text = |r: &serde_json::Value, i: usize| r["choices"][i]["text"].as_str().unwrap().to_owned();
    let four = s.post_json(c, &body(json!({"n": 4}))).json();
    assert_eq!(four["choices"].as_array().unwrap().len(), 4);
    let single: Vec<serde_json::Value> = (0..4).map(|i| s.post_json(c, &body(json!({"seed": 5 + i}))).json()).collect();
    for (i, one) in single.iter().enumerate() {
        assert_eq!(four["choices"][i]["index"], json!(i));
        assert_eq!(text(&four, i), text(one, 0), "choice {i} = the request with seed {}", 5 + i);
    }
    assert_eq!(four["usage"]["prompt_tokens"], single[0]["usage"]["prompt_tokens"], "the prompt counted once");
    let generated: u64 = single.iter().map(|r| r["usage"]["completion_tokens"].as_u64().unwrap()).sum();
    assert_eq!(four["usage"]["completion_tokens"], json!(generated));
    let chunks = s.open_stream(c, &body(json!({"n": 4, "stream": true, "stream_options": {"include_usage": true}}))).chunks();
    for i in 0..4 {
        let t: String =
            chunks.iter().filter(|k| k["choices"][0]["index"] == json!(i)).map(|k| k["choices"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(t, text(&four, i), "streamed choice {i}");
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        (&usage["prompt_tokens"], &usage["completion_tokens"]),
        (&four["usage"]["prompt_tokens"], &four["usage"]["completion_tokens"])
    );
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], four["usage"]["prompt_tokens"], "the same prompt again: all of it cached");

    let short = instruction("llama-short-iapt");
    let batch =
        s.post_json(c, &json!({"model": "tiny", "prompt": [p, short], "n": 2, "max_tokens": 6, "temperature": 1, "seed": 9})).json();
    for (i, prompt) in [&p, &short].into_iter().enumerate() {
        let alone =
            s.post_json(c, &json!({"model": "tiny", "prompt": prompt, "n": 2, "max_tokens": 6, "temperature": 1, "seed": 9})).json();
        for j in 0..2 {
            assert_eq!(text(&batch, i * 2 + j), text(&alone, j), "prompt {i} choice {j}");
        }
    }

    // +100 makes a token the greedy one; of two at +100 one wins, and at -100 it loses to the other.
    let first = |bias: serde_json::Value| {
        let b = json!({"model": "tiny", "prompt": p, "max_tokens": 1, "temperature": 0, "logprobs": 0, "logit_bias": bias});
        s.post_json(c, &b).json()["choices"][0]["logprobs"]["tokens"][0].clone()
    };
    let piece = |t: u32| s.post_json("/detokenize", &json!({"tokens": [t]})).json()["content"].clone();
    assert_eq!(first(json!({"70": 100})), piece(70));
    let both = first(json!({"70": 100, "80": 100}));
    let (w, other) = if both == piece(70) { (70, 80) } else { (80, 70) };
    assert_eq!(both, piece(w));
    assert_eq!(first(json!({ w.to_string(): -100, other.to_string(): 100 })), piece(other));

    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
        "required": ["n", "b"], "additionalProperties": false});
    let rf = json!({"type": "json_schema", "json_schema": {"name": "t", "strict": true, "schema": schema}});
    let r = s.post_json(c, &body(json!({"n": 8, "max_tokens": 60, "response_format": rf}))).json();
    for i in 0..8 {
        let t = text(&r, i);
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("choice {i}: {t:?} is not JSON: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{t}");
        assert!(o["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)) && o["b"].is_boolean(), "{t}");
        assert_eq!(r["choices"][i]["finish_reason"], "stop", "{t}");
    }
}

/// The prefix cache through the server: the same long prompt twice (and a longer one after it)
/// gives the cold text, with `usage.prompt_tokens_details.cached_tokens` saying what was reused and
/// `/metrics` counting the hits; `--cache-mib 0` turns it off.
#[test]
fn the_prefix_cache_reuses_prompts_and_says_so() {
    let prompt: Vec<i64> = (0..300).map(|i| 3 + (i * 37 % 290)).collect();
    let longer: Vec<i64> = prompt.iter().copied().chain(3..40).collect();
    let body = |p: &[i64]| json!({"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0});
    let off = tiny_server(&["--cache-mib", "0", "--parallel", "2"]);
    let cold: Vec<serde_json::Value> = [&prompt, &longer].iter().map(|p| off.post_json("/v1/completions", &body(p)).json()).collect();
    for r in &cold {
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
    assert_eq!(off.metric("iapt_prefix_cache_hits_total"), 0.0);
    let s = tiny_server(&["--parallel", "2"]);
    let first = s.post_json("/v1/completions", &body(&prompt)).json();
    let again = s.post_json("/v1/completions", &body(&prompt)).json();
    let grown = s.post_json("/v1/completions", &body(&longer)).json();
    for (r, want) in [(&first, &cold[0]), (&again, &cold[0]), (&grown, &cold[1])] {
        assert_eq!(r["choices"][0]["text"], want["choices"][0]["text"]);
        assert_eq!(r["usage"]["prompt_tokens"], want["usage"]["prompt_tokens"]);
    }
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 300, "the whole instruction reused: {again}");
    assert_eq!(grown["usage"]["prompt_tokens_details"]["cached_tokens"], 300);
    assert_eq!(s.metric("iapt_prefix_cache_hits_total"), 2.0);
    assert_eq!(s.metric("iapt_prefix_cache_tokens_reused_total"), 600.0);
    assert!(s.metric("iapt_prefix_cache_bytes") > 0.0);
}
