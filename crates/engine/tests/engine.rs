//! The engine on the tiny parity fixtures (converters/python/fixtures/models: 3-layer llama and
//! qwen2 models, F32 weights), in exact mode (F32 KV cache, flash attention off, one thread).
//!
//! "Alone" is the same request on a fresh engine with one slot and the whole prompt in one
//! decode; every batched result is compared with it, never with hard-coded outputs.
//! - `alone_*_matches_the_reference`: alone, the fixture adapter gives the float64 reference's
//!   greedy tokens (Hugging Face transformers with the PyTorch twin's injection).
//! - `continuous_batching_*`: 12 requests over 4 adapters (m = 4, 2, 3, 1) and the base, arriving
//!   at different steps, 3 slots, a budget of 16 tokens per step and ubatches of 8 (prefill
//!   chunks, decode tokens and chunks of other sequences mixed in one decode): each gives its
//!   alone tokens.
//! - `sixteen_*`: 16 mixed-adapter sequences in 16 slots, prefilled in one decode and decoded
//!   together, each equal to alone; seeded sampling too.
//! - `chunked_prefill_*`: budgets of 1, 3, 5, 7 and 16 tokens per step give the one-shot
//!   log-probabilities (top 20, every step) to a relative 1e-5, and the same tokens.
//! - `cancellation_*`: cancelling queued, prefilling and decoding sequences frees their cells at
//!   once; more sequences than the cache holds run one after another.
//! - `unload_*`: unloading an adapter in use is deferred; its requests finish as alone.
//! - `resident_set_*`: with a cap on resident adapters (count or bytes), loading one more evicts
//!   the least recently used that is neither pinned nor in a prefill; an adapter whose sequences
//!   decode is evicted while they go on, and they finish as alone; when nothing can go, the load
//!   is refused and nothing changes.
//! - `logprobs_*`: log-probabilities equal the log-softmax (computed here, in f64) of the logits
//!   row each token was drawn from (`Request::logits`), and the greedy token is the most likely.
//! - `gpu_emulated_*`: the adapters on the GPU generator (its kernels on the CPU emulator): the
//!   fixture adapter alone gives the reference tokens, and continuous batching equals alone.
//! - `stop_strings_*`, `bad_input_*`, `handle_*`: stop rules, every refused input, the threaded
//!   handle (a dropped event stream cancels its request).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use iapt_engine::{
    AdapterCache, Engine, EngineConfig, EngineError, EngineHandle, EngineSpec, EventKind, EventSink, FinishReason, Finished, InsertOptions,
    Request, SeqId, TokenOut, Unloaded,
};
use iapt_format::{Activation, Adapter};
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_generator_cuda::GpuRuntime;
use iapt_llama::{KvType, Model, SamplerSettings, Token};

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../../converters/python/fixtures/models")
}

struct Case {
    instruction: Vec<Token>,
    tokens: Vec<Token>,
}

fn case(name: &str) -> Case {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    let ints = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as Token).collect();
    Case { instruction: ints(&c["instruction"]), tokens: ints(&c["tokens"]) }
}

fn model(arch: &str) -> Model {
    Model::load(&fixtures().join(format!("{arch}-tiny-f32.gguf"))).expect("model")
}

/// The fixture adapter and three random ones for `arch` (m = 4, 2, 3, 1), named a0..a3.
fn adapters(arch: &str, model: &Model) -> Vec<(String, Adapter)> {
    let fixture = Adapter::open(fixtures().join(format!("{arch}-tiny.iapt.safetensors"))).unwrap();
    let mut out = vec![("a0".to_owned(), fixture)];
    let shapes = [(2, 8, Activation::Silu), (3, 16, Activation::Relu), (1, 4, Activation::Silu)];
    for (i, (m, r, act)) in shapes.into_iter().enumerate() {
        let spec = AdapterSpec::small(model.n_layer() as u32, model.n_embd() as u32, m, r, act);
        let a = random_adapter(&spec, &mut Rng::new(0xE461 + i as u64)).unwrap();
        let mut cfg = a.config().clone();
        cfg.base_model_arch = arch.to_owned();
        let a = Adapter::from_parts(cfg, a.extras().clone(), a.tensors().to_vec()).unwrap();
        out.push((format!("a{}", i + 1), a));
    }
    out
}

fn exact(parallel: usize, batch_tokens: usize, n_ubatch: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        seq_ctx: 64,
        batch_tokens,
        min_step_rows: 0,
        n_ubatch,
        queue_capacity: 64,
        n_threads: 1,
        kv_type: KvType::F32,
        flash_attn: Some(false),
        kv_unified: false,
        generator_threads: 1,
        adapter_cache: AdapterCache::default(),
        gpu: None,
        prefix_cache_bytes: 0,
    }
}

fn engine<'m>(model: &'m Model, adapters: &[(String, Adapter)], cfg: EngineConfig) -> Engine<'m> {
    let mut e = Engine::new(model, cfg).expect("engine");
    for (name, a) in adapters {
        e.load_adapter(name, a).expect("load");
    }
    e
}

/// Everything one request produced.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<TokenOut>,
    done: Option<Finished>,
    error: Option<String>,
}

impl Outcome {
    /// How the request ended, without its timings: reason, last text, token counts.
    fn ending(&self) -> Option<(FinishReason, Vec<u8>, usize, usize, usize)> {
        self.done.as_ref().map(|d| (d.reason, d.text.clone(), d.n_prompt, d.n_soft, d.n_generated))
    }

    /// Every event of one request's stream, in order, until it ends; a failure fails the test.
    fn collect(events: impl IntoIterator<Item = iapt_engine::Event>) -> Outcome {
        let mut got = Outcome::default();
        for ev in events {
            match ev.kind {
                EventKind::Token(t) => got.tokens.push(t),
                EventKind::Done(d) => got.done = Some(d),
                EventKind::Failed(e) => panic!("{e}"),
            }
        }
        got
    }

    fn ids(&self) -> Vec<Token> {
        self.tokens.iter().map(|t| t.token).collect()
    }
    fn text(&self) -> Vec<u8> {
        let mut t: Vec<u8> = self.tokens.iter().flat_map(|t| t.text.clone()).collect();
        t.extend(self.done.as_ref().map(|d| d.text.clone()).unwrap_or_default());
        t
    }
}

fn record(out: &mut BTreeMap<SeqId, Outcome>, ev: iapt_engine::Event) {
    let o = out.entry(ev.id).or_default();
    match ev.kind {
        EventKind::Token(t) => o.tokens.push(t),
        EventKind::Done(d) => o.done = Some(d),
        EventKind::Failed(e) => o.error = Some(e.to_string()),
    }
}

fn run_all(e: &mut Engine<'_>) -> BTreeMap<SeqId, Outcome> {
    let mut out = BTreeMap::new();
    e.run_until_idle(&mut |ev| record(&mut out, ev));
    out
}

/// The request alone: one slot, the whole prompt in one decode.
fn alone(model: &Model, adapters: &[(String, Adapter)], req: &Request) -> Outcome {
    alone_with(model, adapters, req, exact(1, 256, 256))
}

fn alone_with(model: &Model, adapters: &[(String, Adapter)], req: &Request, cfg: EngineConfig) -> Outcome {
    let mut e = engine(model, adapters, cfg);
    let id = e.submit(req.clone()).expect("submit alone");
    let out = run_all(&mut e).remove(&id).unwrap();
    assert!(out.error.is_none(), "alone: {:?}", out.error);
    out
}

fn greedy(prompt: &[Token], adapter: Option<&str>, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt.to_vec(), max_tokens);
    r.adapter = adapter.map(str::to_owned);
    r.stop_at_eog = false;
    r
}

fn alone_matches_reference(arch: &str) {
    let m = model(arch);
    let ads = adapters(arch, &m);
    for name in ["short", "long"] {
        let c = case(&format!("{arch}-{name}-iapt"));
        let out = alone(&m, &ads[..1], &greedy(&c.instruction, Some("a0"), c.tokens.len()));
        assert_eq!(out.ids(), c.tokens, "{arch}-{name}: engine alone vs the float64 reference");
        assert_eq!(out.done.unwrap().reason, FinishReason::Length);
    }
    let c = case(&format!("{arch}-short-base"));
    assert_eq!(alone(&m, &[], &greedy(&c.instruction, None, c.tokens.len())).ids(), c.tokens, "{arch} base");
}

#[test]
fn alone_llama_matches_the_reference() {
    alone_matches_reference("llama");
}

#[test]
fn alone_qwen2_matches_the_reference() {
    alone_matches_reference("qwen2");
}

/// Prompts of several lengths from the fixture instructions.
fn prompts(arch: &str) -> Vec<Vec<Token>> {
    let long = case(&format!("{arch}-long-iapt")).instruction;
    let short = case(&format!("{arch}-short-iapt")).instruction;
    vec![long.clone(), short.clone(), long[..20].to_vec(), short[..5].to_vec(), long[3..].to_vec(), vec![short[0]]]
}

fn mixed_requests(arch: &str, n: usize, max_tokens: usize) -> Vec<Request> {
    let names = [Some("a0"), None, Some("a1"), Some("a2"), Some("a3")];
    let ps = prompts(arch);
    (0..n).map(|i| greedy(&ps[i % ps.len()], names[i % names.len()], max_tokens - i % 3)).collect()
}

fn continuous_batching(arch: &str) {
    let m = model(arch);
    let ads = adapters(arch, &m);
    let reqs = mixed_requests(arch, 12, 10);
    let mut e = engine(&m, &ads, exact(3, 16, 8));
    let mut ids = Vec::new();
    let mut out = BTreeMap::new();
    // Arrivals: 2 at once, then one more every other step (while others prefill and decode).
    let mut next = 0;
    let mut step = 0;
    while next < reqs.len() || !e.is_idle() {
        let arrivals = if step == 0 { 2 } else { usize::from(step % 2 == 1) };
        for r in reqs.iter().skip(next).take(arrivals) {
            ids.push(e.submit(r.clone()).unwrap());
        }
        next = (next + arrivals).min(reqs.len());
        for ev in e.step() {
            record(&mut out, ev);
        }
        step += 1;
        assert!(step < 1000, "no progress");
    }
    assert!(e.stats().steps > 20, "the requests overlapped: {:?}", e.stats());
    for (i, (id, r)) in ids.iter().zip(&reqs).enumerate() {
        let got = &out[id];
        assert!(got.error.is_none(), "request {i}: {:?}", got.error);
        let want = alone(&m, &ads, r);
        assert_eq!(got.ids(), want.ids(), "{arch} request {i} ({:?}, {} prompt tokens): batched vs alone", r.adapter, r.prompt.len());
        assert_eq!(got.ending(), want.ending(), "{arch} request {i}");
    }
    assert_eq!(e.cells_in_use(), 0, "every cell freed");
}

#[test]
fn continuous_batching_llama_equals_alone() {
    continuous_batching("llama");
}

#[test]
fn continuous_batching_qwen2_equals_alone() {
    continuous_batching("qwen2");
}

fn sixteen_together(arch: &str) {
    let m = model(arch);
    let ads = adapters(arch, &m);
    let mut reqs = mixed_requests(arch, 16, 12);
    // Four of them sample (seeded): a sequence's draws do not depend on its neighbours either.
    for (i, r) in reqs.iter_mut().enumerate().filter(|(i, _)| i % 4 == 3) {
        r.sampling = SamplerSettings { temperature: 0.9, top_k: 40, top_p: 0.95, min_p: 0.02, seed: i as u32, ..Default::default() };
    }
    let mut e = engine(&m, &ads, exact(16, 512, 512));
    let ids: Vec<SeqId> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let out = run_all(&mut e);
    assert_eq!(e.stats().steps, 12, "one prefill decode, then the 16 decoded together");
    for (i, (id, r)) in ids.iter().zip(&reqs).enumerate() {
        assert_eq!(out[id].ids(), alone(&m, &ads, r).ids(), "{arch} request {i} ({:?})", r.adapter);
    }
}

#[test]
fn sixteen_mixed_adapter_sequences_together_equal_alone_llama() {
    sixteen_together("llama");
}

#[test]
fn sixteen_mixed_adapter_sequences_together_equal_alone_qwen2() {
    sixteen_together("qwen2");
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-long-iapt");
    for adapter in ["a0", "a2"] {
        let mut req = greedy(&c.instruction, Some(adapter), 8);
        req.logprobs = Some(20);
        let one = alone(&m, &ads, &req);
        for (budget, n_ubatch) in [(1, 1), (3, 3), (5, 2), (7, 7), (16, 8)] {
            let mut e = engine(&m, &ads, exact(1, budget, n_ubatch));
            let id = e.submit(req.clone()).unwrap();
            let got = run_all(&mut e).remove(&id).unwrap();
            assert!(e.stats().steps as usize >= (c.instruction.len() + 4).div_ceil(budget), "chunked over steps");
            assert_eq!(got.ids(), one.ids(), "{adapter}, budget {budget}");
            for (step, (a, b)) in got.tokens.iter().zip(&one.tokens).enumerate() {
                let top = |t: &TokenOut| t.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>();
                assert_eq!(top(a), top(b), "{adapter}, budget {budget}, step {step}: top tokens");
                let scale = b.top_logprobs.iter().map(|x| x.1.abs()).fold(0.0f32, f32::max);
                let err = a.top_logprobs.iter().zip(&b.top_logprobs).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0f32, f32::max) / scale;
                assert!(err <= 1e-5, "{adapter}, budget {budget}, step {step}: rel err {err:e}");
            }
        }
    }
}

/// `min_step_rows`: a step ends right after a prompt whose prefill completes once the step holds
/// that many rows, so first tokens come one step after another instead of all at the end of one
/// full step; every request's output is unchanged (chunking equals one shot).
#[test]
fn a_step_ends_after_a_completed_prompt_once_it_holds_min_step_rows() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let (short, long) = (case("llama-short-iapt").instruction, case("llama-long-iapt").instruction);
    // Prompt rows (instruction + soft): 12 + 4 (a0), 5, 30 + 2 (a1), 1.
    let reqs = [greedy(&short, Some("a0"), 4), greedy(&short[..5], None, 4), greedy(&long, Some("a1"), 4), greedy(&short[..1], None, 4)];
    let run = |min_step_rows: usize| {
        let mut e = engine(&m, &ads, EngineConfig { min_step_rows, ..exact(4, 64, 64) });
        let ids: Vec<SeqId> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let (mut out, mut started) = (BTreeMap::new(), Vec::new());
        while !e.is_idle() {
            for ev in e.step() {
                record(&mut out, ev);
            }
            started.push(
                ids.iter()
                    .enumerate()
                    .filter(|(_, id)| out.get(*id).is_some_and(|o: &Outcome| !o.tokens.is_empty()))
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>(),
            );
            assert!(started.len() < 100, "no progress");
        }
        (started, ids.iter().map(|id| out.remove(id).unwrap()).collect::<Vec<_>>())
    };
    let (off, off_out) = run(0);
    assert_eq!(off[0], [0, 1, 2, 3], "off: one step of 54 rows gives every first token");
    let (on, on_out) = run(8);
    // 8: the first step ends after request 0 (16 rows); the second holds its next token, request 1
    // (6 rows in all: fewer than 8, go on) and request 2, and ends there; the third gives 3's.
    assert_eq!(on[..3], [vec![0], vec![0, 1, 2], vec![0, 1, 2, 3]], "on: first tokens step by step");
    for (i, r) in reqs.iter().enumerate() {
        let want = alone(&m, &ads, r);
        assert_eq!(off_out[i].ids(), want.ids(), "off, request {i}");
        assert_eq!(on_out[i].ids(), want.ids(), "on, request {i}");
        assert_eq!(on_out[i].ending(), want.ending(), "on, request {i}");
    }
}

#[test]
fn cancellation_frees_cells_at_once() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let long = case("llama-long-iapt").instruction;
    let cfg = exact(2, 8, 8);
    let mut e = engine(&m, &ads, cfg);
    let kv = e.kv_cells();
    let per_seq = long.len() + 4 + 20;
    // Far more cells over the run than the cache holds: a leak would fail a decode.
    let n = 3 * kv / per_seq + 4;
    let req = greedy(&long, Some("a0"), 20);
    let want = alone(&m, &ads, &req);
    let mut done = 0;
    for i in 0..n {
        let a = e.submit(req.clone()).unwrap();
        let b = e.submit(req.clone()).unwrap();
        let queued = e.submit(req.clone()).unwrap();
        // `a` and `b` run (prefill chunks of 8, `a` first, then decode), `queued` waits for a slot.
        let mut out = BTreeMap::new();
        for _ in 0..3 + i % 5 {
            for ev in e.step() {
                record(&mut out, ev);
            }
        }
        assert!(e.cells_in_use() > 0);
        assert!(e.cancel(queued), "cancel a queued request");
        assert!(e.cancel(b), "cancel a running request");
        assert!(!e.cancel(b), "a cancelled request is gone");
        let before = e.cells_in_use();
        assert!(before <= per_seq, "b's cells freed at once: {before} in use");
        e.run_until_idle(&mut |ev| record(&mut out, ev));
        assert_eq!(e.cells_in_use(), 0);
        assert!(!out.contains_key(&queued));
        assert!(out.get(&b).is_none_or(|o| o.done.is_none()), "no completion after cancel");
        assert_eq!(out[&a].ids(), want.ids(), "round {i}: the survivor is unaffected");
        assert!(out.values().all(|o| o.error.is_none()), "round {i}: {out:?}");
        done += per_seq;
    }
    assert!(done > 2 * kv, "ran {done} cells' worth through a cache of {kv}");
}

#[test]
fn unload_while_in_use_is_deferred_and_safe() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-long-iapt");
    let req = greedy(&c.instruction, Some("a1"), 10);
    let want = alone(&m, &ads, &req);
    let mut e = engine(&m, &ads, exact(1, 8, 8));
    let running = e.submit(req.clone()).unwrap();
    let queued = e.submit(req.clone()).unwrap();
    let mut out = BTreeMap::new();
    for ev in e.step() {
        record(&mut out, ev);
    }
    let users = e.adapters().iter().find(|a| a.name == "a1").unwrap().users;
    assert_eq!(users, 2);
    assert_eq!(e.unload_adapter("a1").unwrap(), Unloaded::Deferred { users: 2 });
    assert!(e.adapters().iter().all(|a| a.name != "a1"));
    assert!(matches!(e.submit(req.clone()), Err(EngineError::UnknownAdapter { .. })));
    e.run_until_idle(&mut |ev| record(&mut out, ev));
    assert_eq!(out[&running].ids(), want.ids());
    assert_eq!(out[&queued].ids(), want.ids());
    // Loaded again under the same name: usable, and unloading an idle adapter frees it at once.
    e.load_adapter("a1", &ads[2].1).unwrap();
    assert_eq!(e.unload_adapter("a1").unwrap(), Unloaded::Freed);
    assert!(matches!(e.unload_adapter("a1"), Err(EngineError::UnknownAdapter { .. })));
}

#[test]
fn logprobs_are_the_log_softmax_of_the_logits_row() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-short-iapt");
    let mut req = greedy(&c.instruction, Some("a0"), 6);
    req.logprobs = Some(5);
    req.logits = true;
    let mut e = engine(&m, &ads, exact(2, 4, 4));
    let id = e.submit(req).unwrap();
    let got = run_all(&mut e).remove(&id).unwrap();
    assert_eq!(got.tokens.len(), 6);
    for t in &got.tokens {
        let logits = t.logits.as_ref().expect("kept");
        assert_eq!(logits.len(), m.n_vocab());
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let want = logits[t.token as usize] as f64 - lse;
        assert!((t.logprob.unwrap() as f64 - want).abs() < 1e-4, "{:?} vs {want}", t.logprob);
        assert_eq!(t.top_logprobs.len(), 5);
        assert_eq!(t.top_logprobs[0].0, t.token, "greedy picks the most likely token");
        let argmax = logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        assert_eq!(t.token as usize, argmax);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn stop_strings_end_generation_and_are_not_emitted() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-long-iapt");
    let base = greedy(&c.instruction, Some("a0"), 16);
    let full = alone(&m, &ads, &base);
    let text = full.text();
    // A stop string that spans a token boundary (taken from the run itself; the random tiny model
    // also emits bytes that are not UTF-8, which a stop string cannot hold).
    let cut = |k: usize| full.tokens[..k].iter().map(|t| t.text.len()).sum::<usize>();
    let stop = (3..full.tokens.len() - 1)
        .flat_map(|k| [(1, 1), (2, 1), (1, 2)].map(move |(l, r)| (k, l, r)))
        .filter(|&(k, l, r)| cut(k) >= l && cut(k) + r <= text.len() && full.tokens[k].text.len() >= r)
        .find_map(|(k, l, r)| String::from_utf8(text[cut(k) - l..cut(k) + r].to_vec()).ok())
        .expect("a UTF-8 window across a token boundary");
    let first = text.windows(stop.len()).position(|w| w == stop.as_bytes()).unwrap();
    let mut req = base.clone();
    req.stop = vec!["never appears \u{1F600}".to_owned(), stop.clone()];
    let got = alone(&m, &ads, &req);
    assert_eq!(got.done.as_ref().unwrap().reason, FinishReason::Stop { index: 1 });
    assert_eq!(got.text(), text[..first].to_vec(), "the text before the stop string, and nothing of it");
    assert_eq!(got.ids(), full.ids()[..got.tokens.len()].to_vec());
    // max_tokens ends a run with reason Length and exactly that many tokens.
    let mut short = base.clone();
    short.max_tokens = 3;
    let got = alone(&m, &ads, &short);
    assert_eq!((got.tokens.len(), got.done.unwrap().reason), (3, FinishReason::Length));
}

#[test]
fn bad_input_is_refused_with_typed_errors() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let mut cfg = exact(1, 8, 8);
    cfg.queue_capacity = 2;
    let mut e = engine(&m, &ads, cfg);
    let ok = || greedy(&[1, 2, 3], Some("a0"), 4);
    let err = |e: &mut Engine<'_>, r: Request| e.submit(r).expect_err("refused");
    let with = |f: &dyn Fn(&mut Request)| {
        let mut r = ok();
        f(&mut r);
        r
    };
    assert!(matches!(err(&mut e, with(&|r| r.adapter = Some("nope".into()))), EngineError::UnknownAdapter { .. }));
    assert!(matches!(err(&mut e, with(&|r| r.prompt.clear())), EngineError::EmptyPrompt));
    assert!(matches!(err(&mut e, with(&|r| r.prompt.push(-1))), EngineError::TokenOutOfVocab { token: -1, .. }));
    assert!(matches!(err(&mut e, with(&|r| r.prompt.push(99_999))), EngineError::TokenOutOfVocab { token: 99_999, .. }));
    assert!(matches!(err(&mut e, with(&|r| r.max_tokens = 0)), EngineError::MaxTokensZero));
    assert!(matches!(err(&mut e, with(&|r| r.max_tokens = usize::MAX)), EngineError::TooLong { .. }));
    // 64 = prompt 3 + 4 soft + 57 fits exactly; one more does not.
    assert!(e.submit(with(&|r| r.max_tokens = 57)).is_ok());
    assert!(matches!(
        err(&mut e, with(&|r| r.max_tokens = 58)),
        EngineError::TooLong { n_prompt: 3, n_soft: 4, max_tokens: 58, seq_ctx: 64 }
    ));
    assert!(matches!(err(&mut e, with(&|r| r.prompt = vec![1; 61])), EngineError::TooLong { .. }));
    for (field, f) in [
        ("temperature", &(|r: &mut Request| r.sampling.temperature = -1.0) as &dyn Fn(&mut Request)),
        ("top_p", &|r: &mut Request| r.sampling.top_p = 0.0),
        ("top_p", &|r: &mut Request| r.sampling.top_p = 1.01),
        ("min_p", &|r: &mut Request| r.sampling.min_p = 2.0),
        ("top_k", &|r: &mut Request| r.sampling.top_k = -3),
        ("repeat_penalty", &|r: &mut Request| r.sampling.repeat_penalty = f32::NAN),
    ] {
        match err(&mut e, with(f)) {
            EngineError::Sampling(s) => assert_eq!(s.field, field),
            other => panic!("{field}: {other}"),
        }
    }
    assert!(matches!(err(&mut e, with(&|r| r.logprobs = Some(21))), EngineError::TooManyLogprobs { n: 21, max: 20 }));
    assert!(matches!(err(&mut e, with(&|r| r.stop = vec![String::new()])), EngineError::EmptyStop));
    // The queue holds 2 (one is already queued above).
    e.submit(ok()).unwrap();
    assert!(matches!(err(&mut e, ok()), EngineError::QueueFull { capacity: 2 }));
    // Adapters: for another base (spec codes in the message), bad names, duplicates, bad files.
    let qwen = Adapter::open(fixtures().join("qwen2-tiny.iapt.safetensors")).unwrap();
    let msg = e.load_adapter("q", &qwen).unwrap_err().to_string();
    assert!(msg.contains("[E") && msg.contains("wrong base model"), "{msg}");
    assert!(matches!(e.load_adapter("a0", &ads[0].1), Err(EngineError::AdapterExists { .. })));
    assert!(matches!(e.load_adapter("../x", &ads[0].1), Err(EngineError::BadAdapterName { .. })));
    let file = fixtures().join("llama-tiny-f32.gguf");
    assert!(matches!(e.load_adapter_file("m", &file), Err(EngineError::AdapterFile { .. })));
    assert!(matches!(Engine::new(&m, exact(4, 2, 2)), Err(EngineError::Config { .. })));
    // Nothing refused changed anything: the accepted requests run.
    assert_eq!(run_all(&mut e).values().filter(|o| o.done.is_some()).count(), 2);
}

#[test]
fn handle_streams_events_and_cancels_when_the_stream_is_dropped() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-long-iapt");
    let dir = std::env::temp_dir().join(format!("iapt-engine-handle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a0.safetensors");
    ads[0].1.save(&path, iapt_format::Container::Safetensors).unwrap();
    let spec = EngineSpec {
        model: fixtures().join("llama-tiny-f32.gguf"),
        model_params: Default::default(),
        config: exact(1, 8, 8),
        adapters: vec![("a0".to_owned(), path.clone())],
    };
    let h = Arc::new(EngineHandle::spawn(spec).unwrap());
    let req = greedy(&c.instruction, Some("a0"), 30);
    let want = alone(&m, &ads, &req);
    let (_, rx) = h.submit(req.clone()).unwrap();
    // One slot: the second request waits in the queue and its stream is dropped at once. That
    // usually happens long before the first request's 35 steps end, but on a loaded machine this
    // thread can sleep through them, and the second request is then admitted and starts its
    // prefill before the drop (seen: 24 of its rows). Either way the drop cancels it before its
    // next step and frees its cells; that it never runs when nobody listens from the start is
    // `handle_sinks_get_every_event_and_a_false_sink_cancels`'s last case.
    let (_, dropped) = h.submit(greedy(&c.instruction, Some("a0"), 12)).unwrap();
    drop(dropped);
    let got = Outcome::collect(rx);
    assert_eq!(got.ids(), want.ids());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let st = loop {
        let st = h.status().unwrap();
        if (st.running, st.queued) == (0, 0) || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!((st.running, st.queued, st.cells_in_use), (0, 0, 0), "{st:?}");
    assert!(st.stats.generated < 30 + 12, "the dropped request was cancelled before its end: {st:?}");
    assert!(matches!(h.submit(greedy(&[1], Some("zz"), 1)), Err(EngineError::UnknownAdapter { .. })));
    assert_eq!(h.unload_adapter("a0").unwrap(), Unloaded::Freed);
    assert!(h.adapters().unwrap().is_empty());
    h.load_adapter("b", path).unwrap();
    assert_eq!(h.adapters().unwrap()[0].name, "b");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn handle_sinks_get_every_event_and_a_false_sink_cancels() {
    let m = model("llama");
    let c = case("llama-short-base");
    let spec = EngineSpec {
        model: fixtures().join("llama-tiny-f32.gguf"),
        model_params: Default::default(),
        config: exact(2, 8, 8),
        adapters: Vec::new(),
    };
    let h = EngineHandle::spawn(spec).unwrap();
    let want = alone(&m, &[], &greedy(&c.instruction, None, 10));
    let (tx, rx) = std::sync::mpsc::channel();
    h.submit_to(greedy(&c.instruction, None, 10), Box::new(ChannelSink { tx, listen_for: usize::MAX, alive: None })).unwrap();
    let got = Outcome::collect(rx);
    assert_eq!(got.ids(), want.ids());
    // A sink that stops listening after its first event: the request is cancelled, its cells freed.
    let (tx, rx) = std::sync::mpsc::channel();
    h.submit_to(greedy(&c.instruction, None, 40), Box::new(ChannelSink { tx, listen_for: 1, alive: None })).unwrap();
    assert!(matches!(rx.recv().unwrap().kind, EventKind::Token(_)));
    assert!(rx.recv().is_err(), "nothing follows a sink's false");
    let st = h.status().unwrap();
    assert_eq!((st.running, st.queued, st.cells_in_use), (0, 0, 0), "{st:?}");
    assert!(st.stats.generated < 10 + 40, "{st:?}");
    // A sink that says nobody listens before its request ever ran: cancelled with no event.
    let (tx, rx) = std::sync::mpsc::channel();
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(false));
    h.submit_to(greedy(&c.instruction, None, 40), Box::new(ChannelSink { tx, listen_for: usize::MAX, alive: Some(alive) })).unwrap();
    assert!(rx.recv().is_err(), "cancelled before any step");
    let st2 = h.status().unwrap();
    assert_eq!((st2.running, st2.queued, st2.stats.generated), (0, 0, st.stats.generated), "{st2:?}");
    // The model, on the engine thread: the same tokens as here.
    let text = "hello world";
    let ids = h.with_model(move |m| m.tokenize(text, true, false).unwrap()).unwrap();
    assert_eq!(ids, m.tokenize(text, true, false).unwrap());
}

#[test]
fn gpu_emulated_adapters_batch_like_alone() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let gpu = |cfg: EngineConfig| EngineConfig { gpu: Some(GpuRuntime::emulated()), ..cfg };
    let c = case("llama-long-iapt");
    let reference = alone_with(&m, &ads, &greedy(&c.instruction, Some("a0"), c.tokens.len()), gpu(exact(1, 256, 256)));
    assert_eq!(reference.ids(), c.tokens, "the fixture adapter on the emulated GPU vs the float64 reference");
    let reqs = mixed_requests("llama", 8, 8);
    let mut e = engine(&m, &ads, gpu(exact(3, 16, 8)));
    assert!(e.adapters().iter().all(|a| a.on_gpu && a.bytes > 0), "{:?}", e.adapters());
    let ids: Vec<SeqId> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let out = run_all(&mut e);
    for (i, (id, r)) in ids.iter().zip(&reqs).enumerate() {
        assert!(out[id].error.is_none(), "request {i}: {:?}", out[id].error);
        let want = alone_with(&m, &ads, r, gpu(exact(1, 256, 256)));
        assert_eq!(out[id].ids(), want.ids(), "request {i} ({:?}): batched vs alone on the emulated GPU", r.adapter);
    }
    assert_eq!(e.cells_in_use(), 0);
}

/// A test sink: forwards events to a channel, stops listening after `listen_for` events, and says
/// it is alive while `alive` (if any) is true.
struct ChannelSink {
    tx: std::sync::mpsc::Sender<iapt_engine::Event>,
    listen_for: usize,
    alive: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: iapt_engine::Event) -> bool {
        self.listen_for = self.listen_for.saturating_sub(1);
        self.tx.send(event).is_ok() && self.listen_for > 0
    }

    fn is_alive(&self) -> bool {
        self.alive.as_ref().is_none_or(|a| a.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// `a` with the weights of `role` multiplied by `k`.
fn scaled(a: &Adapter, role: iapt_format::Role, k: f32) -> Adapter {
    let tensors = a
        .tensors()
        .iter()
        .map(|t| {
            if t.name().role != role {
                return t.clone();
            }
            let v: Vec<f32> = t.to_f32().unwrap().iter().map(|x| x * k).collect();
            iapt_format::Tensor::from_f32(t.name(), t.dtype(), t.shape().to_vec(), &v).unwrap()
        })
        .collect();
    Adapter::from_parts(a.config().clone(), Default::default(), tensors).unwrap()
}

/// An adapter whose weights are all within +-65504 (no W003, so it loads) but whose soft tokens
/// overflow on any prompt: a rational activation with an 8th-degree numerator (variant A, no
/// denominator) after a down-projection scaled by 1e4, so x^8 passes 1e15 by far.
fn overflowing(model: &Model, arch: &str) -> Adapter {
    let act = Activation::Rational(iapt_format::RationalConfig {
        variant: iapt_format::RationalVariant::A,
        numerator_degree: 8,
        denominator_degree: 0,
        groups: 1,
    });
    let a = random_adapter(&AdapterSpec::small(model.n_layer() as u32, model.n_embd() as u32, 4, 8, act), &mut Rng::new(99)).unwrap();
    let mut cfg = a.config().clone();
    cfg.base_model_arch = arch.to_owned();
    let a = Adapter::from_parts(cfg, Default::default(), a.tensors().to_vec()).unwrap();
    let a = scaled(&a, iapt_format::Role::DownWeight, 1e4);
    assert!(a.warnings().is_empty() && a.tensors().iter().all(|t| t.to_f32().unwrap().iter().all(|v| v.abs() <= 65504.0)));
    a
}

/// Weights beyond +-65504 (W003) are refused when the adapter is loaded, naming the rule.
#[test]
fn weights_beyond_f16_range_are_refused_at_load() {
    let m = model("llama");
    let good = Adapter::open(fixtures().join("llama-tiny.iapt.safetensors")).unwrap();
    let bad = scaled(&good, iapt_format::Role::UpWeight, 1e30);
    let mut e = Engine::new(&m, exact(1, 64, 64)).unwrap();
    let err = e.load_adapter("bad", &bad).unwrap_err();
    assert!(matches!(err, EngineError::AdapterRejected { .. }) && err.to_string().contains("W003"), "{err}");
}

/// A decode where one sequence's generator runs on the GPU (the emulator, reading and writing
/// llama.cpp's node in place) and another's overflows on the same node leaves no GPU work queued
/// on llama.cpp's memory, fails the overflowing request alone (naming its adapter), and the other
/// gives its alone result, on the CPU generators and on the emulated GPU.
#[test]
fn gpu_work_is_waited_for_when_another_sequence_fails() {
    for gpu in [false, true] {
        one_adapter_fails_alone(gpu);
    }
}

fn one_adapter_fails_alone(gpu: bool) {
    let m = model("llama");
    let good = Adapter::open(fixtures().join("llama-tiny.iapt.safetensors")).unwrap();
    let bad = overflowing(&m, "llama");
    let rt = GpuRuntime::emulated();
    let mut e = Engine::new(&m, EngineConfig { gpu: gpu.then(|| rt.clone()), ..exact(2, 64, 64) }).unwrap();
    e.load_adapter("good", &good).unwrap();
    e.load_adapter("bad", &bad).unwrap();
    let c = case("llama-short-iapt");
    let g = e.submit(greedy(&c.instruction, Some("good"), 8)).unwrap();
    let b = e.submit(greedy(&c.instruction, Some("bad"), 8)).unwrap();
    let out = run_all(&mut e);
    assert!(!rt.has_unsynchronized_work(), "queued GPU reads of llama.cpp's node outlived the callback");
    let err = out[&b].error.as_deref().expect("the bad adapter fails");
    assert!(err.contains("adapter \"bad\"") && err.contains("overflow"), "{err}");
    assert!(out[&g].error.is_none(), "gpu {gpu}: {:?}", out[&g].error);
    let want = alone(&m, &[("good".to_owned(), good.clone())], &greedy(&c.instruction, Some("good"), 8));
    assert_eq!(out[&g].ids(), want.ids());
    assert_eq!(e.cells_in_use(), 0);
}

#[test]
fn resident_set_evicts_least_recently_used_and_never_a_prefill_or_a_pin() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let c = case("llama-long-iapt");
    let names = |e: &Engine<'_>| e.adapters().into_iter().map(|a| a.name).collect::<Vec<_>>();
    let cfg = EngineConfig { adapter_cache: AdapterCache { max_resident: Some(2), max_bytes: None }, ..exact(2, 8, 8) };
    let mut e = Engine::new(&m, cfg).unwrap();
    e.load_adapter("a0", &ads[0].1).unwrap();
    e.load_adapter("a1", &ads[1].1).unwrap();
    // a0 used last: loading a2 evicts a1.
    let req = |a: &str| greedy(&c.instruction, Some(a), 8);
    let want0 = alone(&m, &ads, &req("a0"));
    let id0 = e.submit(req("a0")).unwrap();
    let ins = e.load_adapter_with("a2", &ads[2].1, InsertOptions::default());
    // a0 is in use (queued): a1 goes.
    assert_eq!(ins.unwrap().evicted, vec!["a1".to_owned()]);
    assert_eq!(names(&e), vec!["a0", "a2"]);
    assert!(matches!(e.submit(req("a1")), Err(EngineError::UnknownAdapter { .. })));
    // a0 in prefill (its prompt of 14 rows over steps of 8 tokens), a2 pinned: a3 cannot come in.
    let mut out = BTreeMap::new();
    for ev in e.step() {
        record(&mut out, ev);
    }
    assert!(out.get(&id0).is_none_or(|o| o.tokens.is_empty()), "still in prefill");
    e.pin_adapter("a2", true).unwrap();
    let full = e.load_adapter_with("a3", &ads[3].1, InsertOptions::default());
    assert!(matches!(&full, Err(EngineError::AdapterCacheFull { name, .. }) if name == "a3"), "{full:?}");
    assert_eq!(names(&e), vec!["a0", "a2"], "a refused load changes nothing");
    // Once a0's sequence decodes it holds no generator: a0 is evicted while it decodes, and its
    // request still ends as alone.
    while out.get(&id0).is_none_or(|o| o.tokens.is_empty()) {
        for ev in e.step() {
            record(&mut out, ev);
        }
    }
    assert_eq!(e.adapters().iter().find(|a| a.name == "a0").unwrap().users, 0);
    assert_eq!(e.load_adapter_with("a3", &ads[3].1, InsertOptions::default()).unwrap().evicted, vec!["a0".to_owned()]);
    e.run_until_idle(&mut |ev| record(&mut out, ev));
    assert_eq!(out[&id0].ids(), want0.ids());
    assert_eq!(names(&e), vec!["a2", "a3"]);
    assert!(e.adapters().iter().find(|a| a.name == "a2").unwrap().pinned);

    // A byte cap: room for the two largest adapters of the four, not three.
    let bytes = |i: usize| {
        let mut e = Engine::new(&m, exact(1, 8, 8)).unwrap();
        e.load_adapter("x", &ads[i].1).unwrap().bytes
    };
    let cap = bytes(0) + bytes(2);
    let cfg = EngineConfig { adapter_cache: AdapterCache { max_resident: None, max_bytes: Some(cap) }, ..exact(2, 8, 8) };
    let mut e = Engine::new(&m, cfg).unwrap();
    e.load_adapter("a0", &ads[0].1).unwrap();
    e.load_adapter("a2", &ads[2].1).unwrap();
    let ins = e.load_adapter_with("a1", &ads[1].1, InsertOptions::default()).unwrap();
    assert_eq!(ins.evicted, vec!["a0".to_owned()], "the least recently used goes first");
    assert!(e.adapters().iter().map(|a| a.bytes).sum::<usize>() <= cap);
    // Replacing a resident adapter keeps one entry under the name.
    let rep = e.load_adapter_with("a1", &ads[3].1, InsertOptions { pinned: false, replace: true }).unwrap();
    assert_eq!(rep.info.n_soft_tokens, 1);
    assert_eq!(names(&e), vec!["a1", "a2"]);
}

/// `Request::n`: the choices share one prefill (its rows are decoded once) and each equals the
/// same request alone with its own seed (`seed + i`), with an adapter and without, over one KV
/// stream per sequence and over a unified cache, next to an unrelated request.
fn choices_share_one_prefill(arch: &str, kv_unified: bool) {
    let m = model(arch);
    let ads = adapters(arch, &m);
    let ps = prompts(arch);
    for adapter in [Some("a0"), None] {
        let mut req = greedy(&ps[0], adapter, 8);
        req.sampling = SamplerSettings { temperature: 1.0, seed: 7, ..Default::default() };
        req.n = 4;
        let other = greedy(&ps[1], Some("a2"), 6);
        let mut e = engine(&m, &ads, EngineConfig { kv_unified, ..exact(6, 64, 32) });
        let first = e.submit(req.clone()).unwrap();
        let other_id = e.submit(other.clone()).unwrap();
        let out = run_all(&mut e);
        let n_soft = out[&first].done.as_ref().map_or(0, |d| d.n_soft);
        let other_rows = other.prompt.len() + ads[2].1.config().n_soft_tokens as usize;
        assert_eq!(e.stats().prefill_rows as usize, req.prompt.len() + n_soft + other_rows, "{arch}: the shared prompt decoded once");
        let mut seen = Vec::new();
        for i in 0..4u64 {
            let got = &out[&SeqId(first.0 + i)];
            assert!(got.error.is_none(), "{arch} choice {i}: {:?}", got.error);
            let mut alone_req = req.clone();
            alone_req.n = 1;
            alone_req.sampling.seed = 7 + i as u32;
            let want = alone(&m, &ads, &alone_req);
            assert_eq!(got.ids(), want.ids(), "{arch} {adapter:?} unified={kv_unified} choice {i} vs alone with seed {}", 7 + i);
            assert_eq!(got.ending(), want.ending(), "{arch} choice {i}");
            seen.push(got.ids());
        }
        assert!(seen.iter().any(|s| *s != seen[0]), "{arch}: seeded choices differ ({seen:?})");
        assert_eq!(out[&other_id].ids(), alone(&m, &ads, &other).ids(), "{arch}: the request beside them");
        assert_eq!(e.cells_in_use(), 0, "every cell freed");
    }
}

#[test]
fn choices_share_one_prefill_llama() {
    choices_share_one_prefill("llama", false);
}

#[test]
fn choices_share_one_prefill_qwen2_unified_kv() {
    choices_share_one_prefill("qwen2", true);
}

#[test]
fn choices_are_bounded_by_the_slots_and_cancelled_together_with_a_prefill() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let mut e = engine(&m, &ads, exact(3, 4, 4));
    let mut req = greedy(&prompts("llama")[0], Some("a0"), 4);
    req.n = 4;
    assert!(matches!(e.submit(req.clone()), Err(EngineError::TooManyChoices { n: 4, parallel: 3 })));
    req.n = 3;
    let first = e.submit(req).unwrap();
    // The prompt is longer than one step's 4 tokens: after one step the first choice is still in
    // prefill, and cancelling it takes the two choices waiting for it along.
    let events = e.step();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(e.running(), 3);
    assert!(e.cancel(first));
    assert_eq!((e.running(), e.cells_in_use()), (0, 0));
}

/// Structured output: 50 answers drawn at temperature 1 (5 requests of 10 choices, with and
/// without an adapter) on a random model all parse as JSON and satisfy the schema, checked here
/// field by field; `json_object` gives an object; a schema llguidance cannot compile is refused at
/// submit.
#[test]
fn structured_output_always_satisfies_the_schema() {
    use iapt_engine::Structured;
    let m = model("llama");
    let ads = adapters("llama", &m);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "kind": {"enum": ["cat", "dog", "bird"]},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "kind", "ok"],
        "additionalProperties": false
    });
    let valid = |v: &serde_json::Value| -> Result<(), String> {
        let o = v.as_object().ok_or("not an object")?;
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        if keys != ["age", "kind", "name", "ok"] {
            return Err(format!("keys {keys:?}"));
        }
        let name = o["name"].as_str().ok_or("name is not a string")?;
        if name.chars().count() > 6 {
            return Err("name too long".into());
        }
        let age = o["age"].as_i64().ok_or("age is not an integer")?;
        if !(0..=150).contains(&age) {
            return Err(format!("age {age}"));
        }
        if !["cat", "dog", "bird"].contains(&o["kind"].as_str().ok_or("kind is not a string")?) {
            return Err("kind".into());
        }
        o["ok"].as_bool().ok_or("ok is not a boolean")?;
        Ok(())
    };
    let cfg = EngineConfig { seq_ctx: 256, ..exact(10, 256, 64) };
    let mut e = engine(&m, &ads, cfg);
    let mut firsts = Vec::new();
    for r in 0..5u32 {
        let mut req = greedy(&prompts("llama")[r as usize % 3], if r % 2 == 0 { Some("a0") } else { None }, 160);
        req.stop_at_eog = true;
        req.sampling = SamplerSettings { temperature: 1.0, seed: 100 * r, ..Default::default() };
        req.n = 10;
        req.structured = Some(Structured::JsonSchema(schema.to_string()));
        firsts.push(e.submit(req).unwrap());
    }
    let out = run_all(&mut e);
    let mut answers = 0;
    for first in firsts {
        for i in 0..10 {
            let got = &out[&SeqId(first.0 + i)];
            assert!(got.error.is_none(), "{:?}", got.error);
            assert_eq!(got.done.as_ref().unwrap().reason, FinishReason::Eog, "the document ended, not the budget");
            let text = String::from_utf8(got.text()).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            valid(&v).unwrap_or_else(|e| panic!("{text}: {e}"));
            answers += 1;
        }
    }
    assert_eq!(answers, 50);
    let mut req = greedy(&prompts("llama")[1], None, 100);
    req.stop_at_eog = true;
    req.structured = Some(Structured::JsonObject);
    let id = e.submit(req.clone()).unwrap();
    let text = String::from_utf8(run_all(&mut e)[&id].text()).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{text:?}: {e}")).is_object(), "{text}");
    req.structured = Some(Structured::JsonSchema("{\"type\": ".to_owned()));
    assert!(matches!(e.submit(req.clone()), Err(EngineError::BadSchema { .. })));
    req.structured = Some(Structured::JsonSchema(r#"{"type": "no-such-type"}"#.to_owned()));
    assert!(matches!(e.submit(req), Err(EngineError::BadSchema { .. })));
}

/// A prompt of `n` tokens drawn from the fixture vocabulary (ids 3.. : no BOS/EOS), seeded.
fn long_prompt(n: usize, seed: u64) -> Vec<Token> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 3 + (rng.next_u64() % 300) as Token).collect()
}

fn cached(cfg: EngineConfig) -> EngineConfig {
    EngineConfig { prefix_cache_bytes: 64 << 20, ..cfg }
}

/// The logits of every step of `req` (greedy, 6 tokens, past end-of-generation).
fn with_logits(prompt: &[Token], adapter: Option<&str>) -> Request {
    let mut r = greedy(prompt, adapter, 6);
    r.logits = true;
    r
}

/// `got` equals `want` (a cold run): same tokens, and every logits row within 1e-5 of the largest
/// magnitude in the row.
fn assert_exact(got: &Outcome, want: &Outcome, what: &str) {
    assert_eq!(got.ids(), want.ids(), "{what}: tokens");
    for (i, (g, w)) in got.tokens.iter().zip(&want.tokens).enumerate() {
        let (g, w) = (g.logits.as_ref().unwrap(), w.logits.as_ref().unwrap());
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: step {i}: logits differ by {worst:e} of the row's scale");
    }
}

/// The prefix cache, against cold runs (a fresh engine without the cache), in exact mode: a tenant's
/// growing prompt (multi-turn) reuses all of its first prompt; a second adapter on the same prompt
/// pools the cached input rows with its own generators (no forward pass) and gets its own cold
/// result; a shared prefix with a different ending reuses all of the shared rows (a snapshot, then
/// cached input rows), for the first adapter and for a third one; a prompt shorter than one chunk; the
/// base alone reuses all but its last token. Logits of every step within 1e-5, the same tokens,
/// and the reuse in `n_cached`.
#[test]
fn prefix_cache_reuse_is_exact() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let cfg = EngineConfig { seq_ctx: 1024, ..exact(2, 512, 128) };
    let cold = |req: &Request| alone_with(&m, &ads, req, cfg.clone());
    let mut e = engine(&m, &ads, cached(cfg.clone()));
    let run = |e: &mut Engine<'_>, req: &Request| {
        let id = e.submit(req.clone()).unwrap();
        let out = run_all(e).remove(&id).unwrap();
        assert!(out.error.is_none(), "{:?}", out.error);
        out
    };
    let turn1 = long_prompt(600, 1);
    let turn2: Vec<Token> = turn1.iter().copied().chain(long_prompt(90, 2)).collect();
    let a = run(&mut e, &with_logits(&turn1, Some("a0")));
    assert_exact(&a, &cold(&with_logits(&turn1, Some("a0"))), "turn 1");
    assert_eq!(a.done.as_ref().unwrap().n_cached, 0);
    let b = run(&mut e, &with_logits(&turn2, Some("a0")));
    assert_exact(&b, &cold(&with_logits(&turn2, Some("a0"))), "turn 2, warm");
    assert_eq!(b.done.as_ref().unwrap().n_cached, 600, "all of turn 1 reused");

    // Another adapter on turn 1: its generators pool the cached input rows (no forward pass), the
    // KV is the base model's: only its soft rows are computed. Then the first adapter again.
    let rows_before = e.stats().prefill_rows;
    let c = run(&mut e, &with_logits(&turn1, Some("a1")));
    assert_exact(&c, &cold(&with_logits(&turn1, Some("a1"))), "a second adapter on the cached rows");
    assert_eq!(c.done.as_ref().unwrap().n_cached, 600);
    assert_eq!(e.stats().prefill_rows - rows_before, 2, "a1's 2 soft rows only");
    let rows_before = e.stats().prefill_rows;
    let d = run(&mut e, &with_logits(&turn1, Some("a0")));
    assert_exact(&d, &a, "the first adapter again");
    assert_eq!(d.done.as_ref().unwrap().n_cached, 600);
    assert_eq!(e.stats().prefill_rows - rows_before, 4, "only the 4 soft rows computed");

    // The same 600-token prefix, another ending; and a divergence after 560 rows: reused up to it
    // (the snapshot at 512, then the cached input rows 512..560).
    let other: Vec<Token> = turn1.iter().copied().chain(long_prompt(40, 3)).collect::<Vec<_>>();
    let mut diverged = turn1[..560].to_vec();
    diverged.extend(long_prompt(70, 4));
    for (what, p) in [("a longer prompt", &other), ("a divergence after 560", &diverged)] {
        let got = run(&mut e, &with_logits(p, Some("a0")));
        assert_exact(&got, &cold(&with_logits(p, Some("a0"))), what);
    }
    let mut third = turn1[..530].to_vec();
    third.extend(long_prompt(30, 10));
    let got = run(&mut e, &with_logits(&third, Some("a3")));
    assert_exact(&got, &cold(&with_logits(&third, Some("a3"))), "a third adapter, a shared prefix");
    assert_eq!(got.done.as_ref().unwrap().n_cached, 530, "the whole shared prefix, pooled from the cached input rows");
    let got = run(&mut e, &with_logits(&diverged, Some("a0")));
    assert_eq!(got.done.as_ref().unwrap().n_cached, diverged.len(), "now cached whole");

    // Shorter than one chunk, with an adapter; then the base alone, which finds the adapter's
    // instruction KV (the base model's own) and reuses all of it but its last token.
    let short = long_prompt(20, 5);
    let longer: Vec<Token> = short.iter().copied().chain(long_prompt(7, 6)).collect();
    run(&mut e, &with_logits(&short, Some("a2")));
    let got = run(&mut e, &with_logits(&longer, Some("a2")));
    assert_exact(&got, &cold(&with_logits(&longer, Some("a2"))), "short prefix");
    assert_eq!(got.done.as_ref().unwrap().n_cached, 20);
    let again = run(&mut e, &with_logits(&longer, Some("a2")));
    assert_eq!(again.done.as_ref().unwrap().n_cached, longer.len());
    assert_exact(&again, &got, "the same prompt again");
    let base = run(&mut e, &with_logits(&longer, None));
    assert_eq!(base.done.as_ref().unwrap().n_cached, longer.len() - 1, "the base recomputes only its last token");
    assert_exact(&base, &cold(&with_logits(&longer, None)), "the base on an adapter's cached instruction");
    let s = e.stats().cache;
    assert!(s.hits >= 10 && s.misses >= 2 && s.bytes > 0 && s.entries > 0, "{s:?}");
    assert_eq!(s.stored, s.hits + s.misses, "one entry per prefill");
    assert_eq!(e.cells_in_use(), 0);
}

/// The prefix cache with the generators on a GPU runtime (the emulated one): a tenant's pooling is
/// copied from device memory at checkpoints and at the end, and loaded into a new device state by a
/// later request (a grown prompt reuses all of the first; a divergence after 560 rows reuses up to
/// the snapshot at 512). A GPU reads its input rows in device memory, so none are kept: another
/// adapter on the same prompt reuses nothing (the base alone still reuses the KV). Exact against
/// cold runs on the same kind of runtime.
#[test]
fn prefix_cache_on_the_gpu_generator_is_exact() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let cfg = EngineConfig { seq_ctx: 1024, gpu: Some(GpuRuntime::emulated()), ..exact(2, 512, 128) };
    let cold = |req: &Request| alone_with(&m, &ads, req, EngineConfig { gpu: Some(GpuRuntime::emulated()), ..cfg.clone() });
    let mut e = engine(&m, &ads, cached(cfg.clone()));
    assert!(e.adapters().iter().all(|a| a.on_gpu), "{:?}", e.adapters());
    let mut run = |req: &Request| {
        let id = e.submit(req.clone()).unwrap();
        let out = run_all(&mut e).remove(&id).unwrap();
        assert!(out.error.is_none(), "{:?}", out.error);
        out
    };
    let turn1 = long_prompt(600, 1);
    let turn2: Vec<Token> = turn1.iter().copied().chain(long_prompt(90, 2)).collect();
    let mut diverged = turn1[..560].to_vec();
    diverged.extend(long_prompt(70, 4));
    let cases = [
        ("turn 1", &turn1, Some("a0"), 0),
        ("turn 2: the snapshot at 600", &turn2, Some("a0"), 600),
        ("a divergence after 560: the snapshot at 512", &diverged, Some("a0"), 512),
        ("another adapter: no input rows kept on the GPU", &turn1, Some("a1"), 0),
        ("the base alone: the KV", &turn1, None, 599),
    ];
    for (what, prompt, adapter, reused) in cases {
        let got = run(&with_logits(prompt, adapter));
        assert_exact(&got, &cold(&with_logits(prompt, adapter)), what);
        assert_eq!(got.done.as_ref().unwrap().n_cached, reused, "{what}");
    }
}

/// An entry evicted while a request that would have used it waits: the request runs cold, with the
/// cold result; the cache never holds more than its bytes.
#[test]
fn prefix_cache_eviction_while_a_request_waits() {
    let m = model("llama");
    let ads = adapters("llama", &m);
    let cfg = EngineConfig { seq_ctx: 512, ..exact(1, 512, 128) };
    // Room for about one entry: measure one first.
    let mut probe = engine(&m, &ads, cached(cfg.clone()));
    let p = long_prompt(300, 7);
    probe.submit(greedy(&p, Some("a0"), 2)).unwrap();
    run_all(&mut probe);
    let one = probe.stats().cache.bytes;
    let mut e = engine(&m, &ads, EngineConfig { prefix_cache_bytes: one + one / 2, ..cfg.clone() });
    let q = long_prompt(300, 8);
    let p_more: Vec<Token> = p.iter().copied().chain(long_prompt(10, 9)).collect();
    let ids: Vec<SeqId> = [with_logits(&p, Some("a0")), with_logits(&q, Some("a0")), with_logits(&p_more, Some("a0"))]
        .iter()
        .map(|r| e.submit(r.clone()).unwrap())
        .collect();
    let out = run_all(&mut e);
    let last = &out[&ids[2]];
    assert_eq!(last.done.as_ref().unwrap().n_cached, 0, "p's entry was evicted by q's while it waited");
    assert_exact(last, &alone_with(&m, &ads, &with_logits(&p_more, Some("a0")), cfg), "cold after eviction");
    let s = e.stats().cache;
    assert!(s.evicted >= 1 && s.bytes <= one + one / 2, "{s:?}");
}
