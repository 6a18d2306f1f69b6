//! `iapt serve --adapter-dir DIR` serving adapters on demand with a bounded resident set (issue 29),
//! on the tiny llama fixture in exact mode; every text is compared with `iapt run` alone on the
//! same adapter file, never with hard-coded outputs.
//!
//! - `first_use_loads_once_and_the_cap_evicts_the_least_recently_used`: eight concurrent first
//!   requests for one adapter load it once and all get its text; with room for two on-demand
//!   adapters beside the pinned `--adapter`, a third evicts the least recently used; every text
//!   is alone's; `/v1/models` lists resident and available adapters; two files for one name are a
//!   409.
//! - `a_pinned_adapter_is_never_evicted`: `--pin` loads one at start and keeps it through churn.
//! - `eviction_while_decoding_leaves_the_stream_exact`: an adapter whose sequence decodes is
//!   evicted to make room for another; the stream still ends with alone's text.
//! - `a_replaced_file_is_reloaded_never_mixed`: a file replaced on disk serves its new content.
//! - `a_full_resident_set_is_a_503`: when every resident adapter is pinned, a new one is refused
//!   with 503, `Retry-After` and code `adapter_cache_full`, and nothing changes.

mod support;

use std::path::{Path, PathBuf};

use serde_json::json;
use support::{fixtures, run_alone, Server, EXACT};

fn tiny_model() -> PathBuf {
    fixtures().join("llama-tiny-f32.gguf")
}

/// Random adapters for the tiny llama fixture (m = 2, 3, 1, 4), one per seed, written to `dir` as
/// `names[i]`.
fn write_adapters(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let base = iapt_format::BaseModelInfo::read(&tiny_model()).unwrap();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (m, r) = [(2, 8), (3, 16), (1, 4), (4, 8)][i % 4];
            let spec = AdapterSpec::small(base.n_layer, base.n_embd, m, r, iapt_format::Activation::Silu);
            let a = random_adapter(&spec, &mut Rng::new(0xAD0 + i as u64)).unwrap();
            let mut cfg = a.config().clone();
            cfg.base_model_arch = base.arch.clone();
            let a = iapt_format::Adapter::from_parts(cfg, a.extras().clone(), a.tensors().to_vec()).unwrap();
            let path = dir.join(name);
            let container = if name.ends_with(".gguf") { iapt_format::Container::Gguf } else { iapt_format::Container::Safetensors };
            a.save(&path, container).unwrap();
            path
        })
        .collect()
}

fn server(dir: &Path, extra: &[&str]) -> Server {
    let tiny = format!("tiny={}", fixtures().join("llama-tiny.iapt.safetensors").display());
    let model = tiny_model();
    let mut args =
        vec!["--model", model.to_str().unwrap(), "--adapter", &tiny, "--adapter-dir", dir.to_str().unwrap(), "--ctx-size", "1024"];
    args.extend(EXACT);
    args.extend(extra);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

const PROMPT: &str = "b a c";

fn text(s: &Server, model: &str) -> String {
    let r = s.post_json("/v1/completions", &json!({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}));
    assert_eq!(r.status, 200, "{model}: {}", r.body);
    r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
}

fn alone(adapter: &Path) -> String {
    run_alone(&tiny_model(), Some(adapter), PROMPT, false, false, 8, &EXACT)
}

/// (id, resident) of every adapter `/v1/models` lists.
fn listed(s: &Server) -> Vec<(String, bool)> {
    let v = s.get("/v1/models").json();
    v["data"].as_array().unwrap().iter().skip(1).map(|m| (m["id"].as_str().unwrap().to_owned(), m["resident"].as_bool().unwrap())).collect()
}

#[test]
fn first_use_loads_once_and_the_cap_evicts_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_adapters(dir.path(), &["a.safetensors", "b.iapt.gguf", "c.gguf"]);
    std::fs::copy(&paths[0], dir.path().join("d.gguf")).unwrap();
    std::fs::copy(&paths[0], dir.path().join("d.safetensors")).unwrap();
    let want: Vec<String> = paths.iter().map(|p| alone(p)).collect();
    assert!(want[0] != want[1] && want[1] != want[2], "the adapters are distinguishable: {want:?}");
    // Room for the pinned tiny and two more.
    let s = server(dir.path(), &["--max-resident-adapters", "3", "--parallel", "4"]);
    assert_eq!(listed(&s), [("tiny", true), ("a", false), ("b", false), ("c", false), ("d", false)].map(|(n, r)| (n.to_owned(), r)));
    std::thread::scope(|scope| {
        let got: Vec<_> = (0..8).map(|_| scope.spawn(|| text(&s, "a"))).collect();
        for g in got {
            assert_eq!(g.join().unwrap(), want[0]);
        }
    });
    assert_eq!(s.metric("iapt_adapter_loads_total{model=\"a\"}"), 1.0, "eight first requests, one load");
    assert_eq!(text(&s, "b"), want[1]);
    assert_eq!(s.metric("iapt_adapter_evictions_total"), 0.0);
    // a was used before b: c evicts a.
    assert_eq!(text(&s, "c"), want[2]);
    assert_eq!(s.metric("iapt_adapter_evictions_total"), 1.0);
    assert_eq!(listed(&s), [("b", true), ("c", true), ("tiny", true), ("a", false), ("d", false)].map(|(n, r)| (n.to_owned(), r)));
    assert_eq!(s.metric("iapt_adapter_loads_total{model=\"a\"}"), 0.0, "an evicted adapter's series are dropped");
    // a comes back (evicting b, now the least recently used) with the same text.
    assert_eq!(text(&s, "a"), want[0]);
    assert_eq!(s.metric("iapt_adapters_resident"), 3.0);
    assert_eq!(s.metric("iapt_adapter_evictions_total"), 2.0);
    assert_eq!(s.metric("iapt_adapter_loads_all_total"), 4.0, "a, b, c, a");
    assert_eq!(s.get("/v1/models/b").json()["resident"], false);
    assert_eq!(s.get("/v1/models/a").json()["resident"], true);
    s.post_json("/v1/completions", &json!({"model": "d", "prompt": PROMPT, "max_tokens": 2})).assert_error(409, Some("model"));
    s.post_json("/v1/completions", &json!({"model": "e", "prompt": PROMPT, "max_tokens": 2})).assert_error(404, Some("model"));
    s.post_json("/v1/completions", &json!({"model": "../a", "prompt": PROMPT, "max_tokens": 2})).assert_error(404, Some("model"));
    s.get("/v1/models/e").assert_error(404, Some("model"));
}

#[test]
fn a_pinned_adapter_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_adapters(dir.path(), &["a.safetensors", "b.safetensors", "c.safetensors"]);
    let s = server(dir.path(), &["--max-resident-adapters", "3", "--pin", "b"]);
    assert!(listed(&s).contains(&("b".to_owned(), true)), "--pin loads at start");
    for model in ["a", "c", "a", "c"] {
        text(&s, model);
        assert!(listed(&s).contains(&("b".to_owned(), true)), "b stays resident");
    }
    assert_eq!(s.metric("iapt_adapter_evictions_total"), 3.0, "a and c take turns in the one free slot");
    assert_eq!(text(&s, "b"), alone(&paths[1]));
    assert_eq!(s.metric("iapt_adapter_loads_total{model=\"b\"}"), 1.0);
}

#[test]
fn eviction_while_decoding_leaves_the_stream_exact() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_adapters(dir.path(), &["a.safetensors", "b.safetensors"]);
    let n = 480;
    let want = run_alone(&tiny_model(), Some(&paths[0]), PROMPT, false, false, n, &EXACT);
    let s = server(dir.path(), &["--max-resident-adapters", "2", "--parallel", "2"]);
    let body = json!({"model": "a", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": true, "ignore_eos": true});
    let mut stream = s.open_stream("/v1/completions", &body);
    let first = stream.next_data().expect("a first chunk: a's prefill is done");
    // b needs a's slot in the resident set: a's sequence decodes, so a goes.
    assert_eq!(text(&s, "b"), alone(&paths[1]));
    assert!(listed(&s).contains(&("a".to_owned(), false)), "a was evicted");
    assert_eq!(s.metric("iapt_requests_in_flight{model=\"a\"}"), 1.0, "while its request decoded");
    let mut chunks = vec![serde_json::from_str::<serde_json::Value>(&first).unwrap()];
    chunks.extend(stream.chunks());
    let got = support::stream_text(&chunks);
    let alone_ignoring_eos = want.len() <= got.len() && got.starts_with(&want);
    assert!(alone_ignoring_eos || got == want, "the stream of an evicted adapter:\n{got:?}\nalone:\n{want:?}");
}

#[test]
fn a_replaced_file_is_reloaded_never_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_adapters(dir.path(), &["a.safetensors", "b.safetensors"]);
    let s = server(dir.path(), &[]);
    let (want_a, want_b) = (alone(&paths[0]), alone(&paths[1]));
    assert_eq!(text(&s, "a"), want_a);
    assert_eq!(text(&s, "a"), want_a);
    assert_eq!(s.metric("iapt_adapter_loads_total{model=\"a\"}"), 1.0);
    // Replaced atomically by b's bytes (a new inode), as a deployment would.
    let tmp = dir.path().join(".a.tmp");
    std::fs::copy(&paths[1], &tmp).unwrap();
    std::fs::rename(&tmp, &paths[0]).unwrap();
    assert_eq!(text(&s, "a"), want_b, "the new file's adapter");
    assert_eq!(s.metric("iapt_adapter_loads_total{model=\"a\"}"), 2.0);
}

#[test]
fn a_full_resident_set_is_a_503() {
    let dir = tempfile::tempdir().unwrap();
    write_adapters(dir.path(), &["a.safetensors"]);
    // One resident adapter at most, and it is the pinned `--adapter`.
    let s = server(dir.path(), &["--max-resident-adapters", "1"]);
    let r = s.post_json("/v1/completions", &json!({"model": "a", "prompt": PROMPT, "max_tokens": 2}));
    let e = r.assert_error(503, Some("model"));
    assert_eq!(e["code"], "adapter_cache_full", "{e}");
    assert!(e["message"].as_str().unwrap().contains("pinned"), "{e}");
    assert_eq!(listed(&s), [("tiny", true), ("a", false)].map(|(n, r)| (n.to_owned(), r)));
    text(&s, "tiny"); // The resident adapter still serves (200).
}

/// Churn: eight clients at once over six adapters with room for two beside the pinned one. Each
/// answer is the adapter's own text (200), or, when every resident adapter is held by a queued
/// request or a prefill, 503 `adapter_cache_full`: never a 404, 409 or 500 from a load racing an
/// eviction.
#[test]
fn churn_over_a_small_resident_set_answers_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("t{i}.safetensors")).collect();
    let paths = write_adapters(dir.path(), &names.iter().map(String::as_str).collect::<Vec<_>>());
    let want: Vec<String> = paths.iter().map(|p| alone(p)).collect();
    let s = server(dir.path(), &["--max-resident-adapters", "3", "--parallel", "2", "--queue", "64"]);
    let (ok, full) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (s, want) = (&s, &want);
                scope.spawn(move || {
                    let (mut ok, mut full) = (0, 0);
                    for i in 0..6 {
                        let t = (w * 5 + i * 7) % 6;
                        let body = json!({"model": format!("t{t}"), "prompt": PROMPT, "max_tokens": 8, "temperature": 0});
                        let r = s.post_json("/v1/completions", &body);
                        match r.status {
                            200 => {
                                assert_eq!(r.json()["choices"][0]["text"], want[t], "t{t}");
                                ok += 1;
                            }
                            503 => {
                                assert_eq!(r.json()["error"]["code"], "adapter_cache_full", "{}", r.body);
                                full += 1;
                            }
                            _ => panic!("t{t}: {} {}", r.status, r.body),
                        }
                    }
                    (ok, full)
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert_eq!(ok + full, 48);
    assert!(ok > 0, "{full} refused");
    assert!(s.metric("iapt_adapter_evictions_total") > 0.0);
    assert!(s.metric("iapt_adapters_resident") <= 3.0);
}
