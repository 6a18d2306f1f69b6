//! Parity of the engine (the toolkit's one runtime: llama.cpp with the injection hook) with the
//! independent reference: Hugging Face transformers in float64 with the PyTorch twin's injection (converters/python/make_model_fixtures.py, fixtures in
//! converters/python/fixtures/models). One tiny model per entry of the architecture table
//! (`iapt_llama::ARCHS`): llama (GQA), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm), gemma2 (scaled
//! embeddings, post-norm blocks, attention and final soft-capping), gemma3 (scaled embeddings,
//! post-norm blocks, q/k RMSNorm), phi3 (fused qkv and gate/up); 3 layers, random weights, a
//! rational-B adapter with m = 4 soft tokens. Every test that is per architecture runs over the
//! table itself, so an entry without fixtures fails the suite.
//!
//! Relative error of a step = max |llama.cpp - reference| / max |reference| over the vocabulary.
//! - `every_table_entry_*`: the table and this file's literal node names list the same
//!   architectures, and each has its three fixture cases.
//! - `graph_*`: the nodes of each architecture's graph, dumped by a probing callback: the layer-0
//!   node and every `l_out` exist, and layer l's first norm and its residual add read `l_out-{l-1}`
//!   (also for the post-norm Gemma blocks); for gemma2 `inp_scaled` is `embd` scaled by sqrt(d).
//! - `arch_table_*`: the hook claims exactly the layer-0 node, `l_out-0`, `l_out-1` (never the last
//!   `l_out`) in every ubatch; fails loudly if llama.cpp renames its nodes.
//! - `f32_*`: F32 weights, F32 KV cache, flash attention off: rel err <= 1e-4 at every one of 16
//!   greedy steps, identical tokens; the GGUF adapter container gives bit-identical logits. For
//!   Gemma (GELU) on ggml's CPU backend the 1e-4 bound is against the reference computed with that
//!   backend's GELU (ggml-cpu rounds GELU's input and output to f16 through a lookup table, which
//!   alone moves the logits by ~3e-4); against the plain reference it is held to the defaults'
//!   5e-3 as well.
//! - `multi_ubatch_*`: a 30-token instruction split over ubatches of 8, 5 and 31 tokens (the soft
//!   slots straddle a ubatch boundary) equals the one-ubatch run and the reference.
//! - `no_adapter_*`: without an adapter the reference without injection is matched, and a context
//!   with a callback installed but claiming nothing is bit-identical to plain llama.cpp.
//! - `f16_kv_*`: llama.cpp's defaults (F16 KV cache, automatic flash attention): rel err <= 5e-3
//!   against the plain reference, identical tokens.
//! - `q8_0_*`: the F32 model quantized to Q8_0 by llama.cpp runs; its greedy agreement with the
//!   reference is printed.
//! - `multi_sequence_*`: four sequences in one decode (the fixture adapter twice, no adapter, and a
//!   second resident adapter with another m), also split over ubatches of 8 and 5 rows, each match
//!   the reference (fixture cases) or their own one-sequence run (the second adapter) at every
//!   greedy step, with identical tokens.
//! - `errors_*`: wrong base model, over-long and empty prompts, bad token ids, unloadable models.
//! - `hook_reports_*`: a hook armed for other ubatches than llama.cpp's split fails the decode
//!   (the hook checks `ne[1]` and stops touching the graph).
//! - `a_panicking_callback_*`: a panic in the callback is caught at the FFI boundary and fails the decode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iapt_engine::{Engine, EngineConfig, EngineError, Request};
use iapt_format::{Adapter, Container};
use iapt_hook::{Claim, Prefill, Segment, Split, StreamHook};
use iapt_llama::{Batch, Context, ContextParams, EvalCallback, GpuRuntime, KvType, LlamaError, Model, NodeData, NodeInfo, Quant, Token};

const STEPS: usize = 16;

/// The nodes the hook must claim per architecture, in layer order, written out literally (not taken
/// from the table): what llama.cpp 0.1.161 calls the residual stream entering layers 0, 1 and 2 of
/// the 3-layer fixtures. Must list exactly the table's architectures.
const EXPECTED_NODES: &[(&str, [&str; 3])] = &[
    ("llama", ["embd", "l_out-0", "l_out-1"]),
    ("qwen2", ["embd", "l_out-0", "l_out-1"]),
    ("qwen3", ["embd", "l_out-0", "l_out-1"]),
    ("gemma2", ["inp_scaled", "l_out-0", "l_out-1"]),
    ("gemma3", ["inp_scaled", "l_out-0", "l_out-1"]),
    ("phi3", ["embd", "l_out-0", "l_out-1"]),
];

/// The architectures of the table (`iapt_llama::ARCHS`), the one list every per-architecture test
/// runs over.
fn archs() -> impl Iterator<Item = &'static str> {
    iapt_llama::ARCHS.iter().map(|a| a.name)
}

/// The crate's folder: `CARGO_MANIFEST_DIR` at run time when set (cargo test sets it; so does
/// scripts/gpu/device-run for test binaries run from a copy of the repository on another
/// machine), else the folder this test was compiled from.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn fixtures() -> PathBuf {
    manifest_dir().join("../../converters/python/fixtures/models")
}

struct Case {
    name: String,
    model: PathBuf,
    adapter: Option<PathBuf>,
    instruction: Vec<i32>,
    tokens: Vec<i32>,
    /// The exact-mode reference: for the GELU architectures (Gemma) whose layers run on ggml's CPU
    /// backend, the reference with that backend's f16 GELU table (`logits_ggml_cpu`, see
    /// make_model_fixtures.py); otherwise the plain one.
    logits: Vec<Vec<f64>>,
    /// The plain reference (transformers in float64), which llama.cpp's defaults are held to.
    plain_logits: Vec<Vec<f64>>,
}

fn read_logits(path: &Path) -> Vec<Vec<f64>> {
    let arr = iapt_npy::read_f64_file(path).expect("reference logits");
    let n_vocab = arr.shape[1];
    arr.data.chunks(n_vocab).map(<[f64]>::to_vec).collect()
}

fn case(name: &str) -> Case {
    let dir = fixtures();
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest")).unwrap();
    let c = manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"));
    let ints = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect::<Vec<_>>();
    let plain_logits = read_logits(&dir.join(c["logits"].as_str().unwrap()));
    // ggml's CPU GELU applies where the layers run on the CPU (no GPU backend compiled in, so
    // nothing is offloaded); a GPU backend computes GELU in f32, as the plain reference does.
    let logits = match c["logits_ggml_cpu"].as_str() {
        Some(f) if !iapt_llama::supports_gpu_offload() => read_logits(&dir.join(f)),
        _ => plain_logits.clone(),
    };
    Case {
        name: name.to_owned(),
        model: dir.join(c["model"].as_str().unwrap()),
        adapter: c["adapter"].as_str().map(|a| dir.join(a)),
        instruction: ints(&c["instruction"]),
        tokens: ints(&c["tokens"]),
        logits,
        plain_logits,
    }
}

/// The context settings of a run: ubatch size, KV type, flash attention.
#[derive(Debug, Clone, Copy)]
struct Params {
    n_ubatch: usize,
    kv: KvType,
    flash: Option<bool>,
}

/// Exact mode: F32 KV cache, flash attention off.
fn exact_params(n_ubatch: u32) -> Params {
    Params { n_ubatch: n_ubatch as usize, kv: KvType::F32, flash: Some(false) }
}

/// llama.cpp's defaults: F16 KV cache, automatic flash attention.
fn default_params() -> Params {
    Params { n_ubatch: 512, kv: KvType::F16, flash: None }
}

/// The same as a plain llama.cpp context's parameters (256 cells, one thread).
fn context_params(p: Params) -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_batch: 256,
        n_ubatch: p.n_ubatch as u32,
        n_threads: 1,
        flash_attn: p.flash,
        kv_type: p.kv,
        ..ContextParams::default()
    }
}

/// An engine with `parallel` slots of 256 tokens, the whole batch in one step, one thread.
fn engine_config(gpu: &Option<Arc<GpuRuntime>>, p: Params, parallel: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        seq_ctx: 256,
        batch_tokens: 256 * parallel,
        min_step_rows: 0,
        n_ubatch: p.n_ubatch,
        queue_capacity: 16,
        n_threads: 1,
        kv_type: p.kv,
        flash_attn: p.flash,
        kv_unified: false,
        generator_threads: 1,
        adapter_cache: Default::default(),
        gpu: gpu.clone(),
        prefix_cache_bytes: 0,
    }
}

/// A greedy request of STEPS tokens that keeps every step's logits and ignores end-of-generation.
fn greedy(instruction: &[Token], adapter: Option<&str>) -> Request {
    let mut r = Request::new(instruction.to_vec(), STEPS);
    r.adapter = adapter.map(str::to_owned);
    r.stop_at_eog = false;
    r.logits = true;
    r
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "vocabulary size");
    let num = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
    let den = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    num / den
}

fn run(model: &Model, adapter: Option<&Adapter>, params: &Params, instruction: &[i32]) -> (Vec<i32>, Vec<Vec<f32>>) {
    run_on(&None, model, adapter, params, instruction)
}

/// Where the generators run. The same test bodies run on each: the CPU, the GPU kernels on the
/// CPU emulator (always), and a CUDA device (only in a build with this crate's `cuda` feature,
/// where a missing device fails the test; elsewhere the harness reports it as ignored).
#[derive(Debug, Clone, Copy)]
enum Dev {
    Cpu,
    Emulated,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Cuda,
}

/// Runs `body` with the runtime of `dev` (None for the CPU).
fn on_dev(dev: Dev, test: &str, body: impl FnOnce(&Option<Arc<GpuRuntime>>)) {
    let rt = match dev {
        Dev::Cpu => None,
        Dev::Emulated => Some(GpuRuntime::emulated()),
        Dev::Cuda => Some(iapt_generator_cuda::testing::cuda_for_test(test)),
    };
    if let Some(rt) = &rt {
        eprintln!("{test}: generators on {}", rt.describe());
    }
    body(&rt);
}

/// One test per device for a body taking the runtime.
macro_rules! on_every_device {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn cpu() {
                on_dev(Dev::Cpu, stringify!($name), $body);
            }
            #[test]
            fn emulated_gpu() {
                on_dev(Dev::Emulated, stringify!($name), $body);
            }
            #[test]
            #[cfg_attr(
                not(feature = "cuda"),
                ignore = "built without the `cuda` feature: the CUDA variant runs on a GPU machine (scripts/gpu/)"
            )]
            fn cuda() {
                on_dev(Dev::Cuda, stringify!($name), $body);
            }
        }
    };
}

/// Checks where the hook found the nodes: with the emulator every node is in its (host) memory;
/// on CUDA it prints how many were in device memory (all but layer 0's with full offload).
fn report_claims(gpu: &Option<Arc<GpuRuntime>>, label: &str, claims: &[Claim]) {
    let Some(rt) = gpu else { return };
    let on = claims.iter().filter(|c| c.on_device).count();
    if rt.is_emulated() {
        assert_eq!(on, claims.len(), "{label}: every node is in the emulator's memory");
    } else {
        eprintln!("{label}: {on} of {} claimed nodes in device memory (rows read and written in place)", claims.len());
    }
}

fn run_on(
    gpu: &Option<Arc<GpuRuntime>>,
    model: &Model,
    adapter: Option<&Adapter>,
    params: &Params,
    instruction: &[i32],
) -> (Vec<i32>, Vec<Vec<f32>>) {
    let mut e = Engine::new(model, engine_config(gpu, *params, 1)).expect("engine");
    if let Some(a) = adapter {
        e.load_adapter("a", a).expect("adapter");
    }
    let done = e.complete(greedy(instruction, adapter.map(|_| "a")), &mut |_| {}).expect("complete");
    report_claims(gpu, "run", &e.hook_claims());
    done.tokens.into_iter().map(|t| (t.token, t.logits.expect("kept"))).unzip()
}

/// Asserts identical tokens and per-step rel err <= tol against the exact-mode reference; returns
/// the worst rel err.
fn assert_matches(label: &str, c: &Case, tokens: &[i32], logits: &[Vec<f32>], tol: f64) -> f64 {
    assert_close(label, c, &c.logits, tokens, logits, tol)
}

/// As [`assert_matches`], against the given reference logits.
fn assert_close(label: &str, c: &Case, reference: &[Vec<f64>], tokens: &[i32], logits: &[Vec<f32>], tol: f64) -> f64 {
    assert_eq!(tokens, &c.tokens[..], "{label}: greedy tokens differ from the reference");
    let mut worst = 0.0f64;
    for (step, (got, want)) in logits.iter().zip(reference).enumerate() {
        let e = rel_err(got, want);
        assert!(e <= tol, "{label}: step {step}: rel err {e:.3e} > {tol:e}");
        worst = worst.max(e);
    }
    assert_eq!(logits.len(), STEPS, "{label}: steps");
    eprintln!("{label}: {STEPS} identical greedy tokens, worst rel err {worst:.2e}");
    worst
}

fn load(c: &Case) -> (Model, Option<Adapter>) {
    let model = Model::load(&c.model).expect("model");
    let adapter = c.adapter.as_ref().map(|p| Adapter::open(p).expect("adapter"));
    (model, adapter)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_table_entry_has_fixtures_and_expected_nodes() {
    let table: Vec<&str> = archs().collect();
    let literal: Vec<&str> = EXPECTED_NODES.iter().map(|(a, _)| *a).collect();
    assert_eq!(table, literal, "the architecture table and EXPECTED_NODES must list the same architectures");
    for arch in archs() {
        for name in [format!("{arch}-short-iapt"), format!("{arch}-long-iapt"), format!("{arch}-short-base")] {
            // Panics with "no case NAME" if the fixture is missing.
            let c = case(&name);
            assert!(c.model.is_file(), "{name}: {} missing", c.model.display());
            assert_eq!(c.adapter.is_some(), name.ends_with("-iapt"), "{name}");
            assert_eq!((c.tokens.len(), c.logits.len()), (STEPS, STEPS), "{name}");
        }
        let model = Model::load(&case(&format!("{arch}-short-base")).model).unwrap();
        assert_eq!(model.arch(), arch, "the {arch} fixture's general.architecture");
    }
}

fn expected_nodes(arch: &str) -> [&'static str; 3] {
    EXPECTED_NODES.iter().find(|(a, _)| *a == arch).unwrap_or_else(|| panic!("{arch}: not in EXPECTED_NODES")).1
}

/// Records every node of the graph (name and input names) without claiming any, and claims the
/// nodes in `read` to keep a copy of their rows.
struct Probe {
    read: Vec<&'static str>,
    nodes: std::sync::Mutex<Vec<(String, Vec<String>)>>,
    data: std::sync::Mutex<std::collections::HashMap<String, Vec<f32>>>,
}

impl EvalCallback for Probe {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        let srcs = node.src_names().into_iter().map(str::to_owned).collect();
        self.nodes.lock().unwrap().push((node.name().to_owned(), srcs));
        self.read.contains(&node.name())
    }
    fn on_data(&self, node: &mut NodeData<'_>) {
        let ne = node.ne();
        let mut rows = vec![0.0f32; (ne[0] * ne[1]) as usize];
        node.read_rows(0, &mut rows).expect("read rows");
        self.data.lock().unwrap().insert(node.name().to_owned(), rows);
    }
}

/// Dumps each architecture's graph with a probing callback and checks what the table assumes.
#[test]
fn graph_nodes_of_every_architecture() {
    for arch in archs() {
        let c = case(&format!("{arch}-short-base"));
        let model = Model::load(&c.model).unwrap();
        let expected = expected_nodes(arch);
        let probe = Arc::new(Probe { read: vec!["embd", "inp_scaled"], nodes: Default::default(), data: Default::default() });
        let mut ctx = Context::new(&model, &context_params(exact_params(512)), Some(probe.clone() as Arc<dyn EvalCallback>)).unwrap();
        let mut batch = Batch::new(64);
        for (i, &t) in c.instruction.iter().enumerate() {
            batch.push(t, i as i32, i + 1 == c.instruction.len()).unwrap();
        }
        ctx.decode(&batch).unwrap();
        let nodes = probe.nodes.lock().unwrap().clone();
        let names: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        eprintln!("{arch}: {} graph nodes: {}", names.len(), names.join(" "));
        let readers = |node: &str| -> Vec<&str> {
            nodes.iter().filter(|(_, srcs)| srcs.iter().any(|s| s == node)).map(|(n, _)| n.as_str()).collect()
        };
        let n_layer = model.n_layer();
        for node in expected.iter().chain(&[format!("l_out-{}", n_layer - 1).as_str()]) {
            assert_eq!(names.iter().filter(|n| *n == node).count(), 1, "{arch}: node {node} once in the graph");
        }
        // Layer l reads its input twice: its first RMS norm (`norm-l`, scaled into `attn_norm-l`)
        // and a residual add (`sa_out-l` in the post-norm Gemma blocks), directly or, in the last
        // layer, through the get_rows that keeps the output rows.
        for (l, node) in expected.iter().enumerate() {
            let r = readers(node);
            assert!(r.contains(&format!("norm-{l}").as_str()), "{arch}: layer {l}'s norm reads {node}: readers {r:?}");
            if arch.starts_with("gemma") {
                let sa_out = format!("sa_out-{l}");
                let via = |n: &str| n == sa_out || readers(n).contains(&sa_out.as_str());
                assert!(nodes.iter().any(|(n, srcs)| srcs.iter().any(|s| s == node) && via(n)), "{arch}: {sa_out} reads {node}: {r:?}");
            }
        }
        // Where layer 0 reads a scaled embedding, nothing else reads the unscaled one.
        if expected[0] != "embd" && names.contains(&"embd") {
            assert_eq!(readers("embd"), vec![expected[0]], "{arch}: embd feeds only {}", expected[0]);
        }
        let data = probe.data.lock().unwrap();
        match arch {
            "gemma2" => {
                // `embd` is the plain embedding, `inp_scaled` = sqrt(64) * embd.
                let (e, s) = (&data["embd"], &data["inp_scaled"]);
                assert_eq!(e.len(), s.len());
                assert!(e.iter().zip(s).all(|(e, s)| (8.0 * e - s).abs() <= 1e-6 * s.abs().max(1.0)), "gemma2: inp_scaled != 8 embd");
            }
            "gemma3" => assert!(!names.contains(&"embd") && data.contains_key("inp_scaled"), "gemma3: embd renamed inp_scaled"),
            _ => assert!(!names.contains(&"inp_scaled") && data.contains_key("embd"), "{arch}"),
        }
    }
}

fn arch_table(arch: &str) {
    let c = case(&format!("{arch}-long-iapt"));
    let (model, adapter) = load(&c);
    let adapter = adapter.unwrap();
    let expected = expected_nodes(arch);
    assert_eq!(model.n_layer(), expected.len());
    for n_ubatch in [512u32, 8] {
        let mut e = Engine::new(&model, engine_config(&None, exact_params(n_ubatch), 1)).unwrap();
        e.load_adapter("a", &adapter).unwrap();
        e.submit(greedy(&c.instruction, Some("a"))).unwrap();
        // The first step is the whole prefill.
        e.step();
        let claims = e.hook_claims();
        let total = c.instruction.len() + 4;
        let n_ub = total.div_ceil(n_ubatch as usize);
        assert_eq!(claims.len(), n_ub * expected.len(), "{arch} n_ubatch {n_ubatch}: {claims:?}");
        for (i, cl) in claims.iter().enumerate() {
            let (ub, layer) = (i / expected.len(), i % expected.len());
            assert_eq!((cl.ubatch, cl.layer, cl.node.as_str()), (ub, layer, expected[layer]), "{arch} n_ubatch {n_ubatch}");
            assert_eq!(cl.rows, (n_ubatch as usize).min(256).min(total - ub * n_ubatch as usize));
        }
    }
}

#[test]
fn arch_table_every_architecture() {
    for arch in archs() {
        arch_table(arch);
    }
}

fn f32_parity(gpu: &Option<Arc<GpuRuntime>>, arch: &str) {
    for len in ["short", "long"] {
        let c = case(&format!("{arch}-{len}-iapt"));
        let (model, adapter) = load(&c);
        let adapter = adapter.unwrap();
        let (tokens, logits) = run_on(gpu, &model, Some(&adapter), &exact_params(512), &c.instruction);
        assert_matches(&c.name, &c, &tokens, &logits, 1e-4);
        if c.logits != c.plain_logits {
            // Against the plain reference (f32 GELU): within the defaults' bound.
            assert_close(&format!("{} vs the plain reference", c.name), &c, &c.plain_logits, &tokens, &logits, 5e-3);
        }
        // The same adapter through the GGUF container gives bit-identical results.
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("a.gguf");
        adapter.save(&gguf, Container::Gguf).unwrap();
        let from_gguf = Adapter::open(&gguf).unwrap();
        let (t2, l2) = run_on(gpu, &model, Some(&from_gguf), &exact_params(512), &c.instruction);
        assert_eq!((t2, l2), (tokens, logits), "{}: GGUF adapter differs from safetensors", c.name);
    }
}

on_every_device!(f32_every_architecture_matches_reference, |gpu| archs().for_each(|a| f32_parity(gpu, a)));

fn multi_ubatch(gpu: &Option<Arc<GpuRuntime>>, arch: &str) {
    let c = case(&format!("{arch}-long-iapt"));
    let (model, adapter) = load(&c);
    let adapter = adapter.unwrap();
    let (t1, l1) = run_on(gpu, &model, Some(&adapter), &exact_params(512), &c.instruction);
    for n_ubatch in [8u32, 5, 31] {
        let (t, l) = run_on(gpu, &model, Some(&adapter), &exact_params(n_ubatch), &c.instruction);
        assert_matches(&format!("{} n_ubatch {n_ubatch}", c.name), &c, &t, &l, 1e-4);
        assert_eq!(t, t1);
        for (a, b) in l.iter().zip(&l1) {
            let e = rel_err(a, &b.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
            assert!(e <= 1e-5, "n_ubatch {n_ubatch} vs one ubatch: rel err {e:e}");
        }
    }
}

on_every_device!(multi_ubatch_every_architecture_equals_one_ubatch, |gpu| archs().for_each(|a| multi_ubatch(gpu, a)));

/// A second adapter for the tiny llama model, with m = 2 soft tokens (the fixture's has 4).
fn second_adapter(model: &Model) -> Adapter {
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let spec = AdapterSpec::small(model.n_layer() as u32, model.n_embd() as u32, 2, 16, iapt_format::Activation::Silu);
    random_adapter(&spec, &mut Rng::new(0x05EC_017D)).expect("valid adapter")
}

fn multi_sequence(gpu: &Option<Arc<GpuRuntime>>, n_ubatch: u32, kv_unified: bool) {
    let long = case("llama-long-iapt");
    let short = case("llama-short-iapt");
    let base = case("llama-short-base");
    let (model, fixture) = load(&long);
    let fixture = fixture.unwrap();
    let second = second_adapter(&model);
    // Alone: the second adapter on the long instruction, one sequence per decode.
    let (alone_tokens, alone_logits) = run_on(gpu, &model, Some(&second), &exact_params(512), &long.instruction);
    // Four sequences in 4 slots: their prefills share one decode, then they decode together.
    let mut e = Engine::new(&model, EngineConfig { kv_unified, ..engine_config(gpu, exact_params(n_ubatch), 4) }).unwrap();
    e.load_adapter("fixture", &fixture).unwrap();
    e.load_adapter("second", &second).unwrap();
    let requests = [
        greedy(&long.instruction, Some("fixture")),
        greedy(&base.instruction, None),
        greedy(&long.instruction, Some("second")),
        greedy(&short.instruction, Some("fixture")),
    ];
    let ids: Vec<_> = requests.into_iter().map(|r| e.submit(r).unwrap()).collect();
    let mut out: Vec<(Vec<i32>, Vec<Vec<f32>>)> = vec![Default::default(); 4];
    let mut soft = vec![0; 4];
    let mut first_step = true;
    while !e.is_idle() {
        for ev in e.step() {
            let i = ids.iter().position(|&id| id == ev.id).unwrap();
            match ev.kind {
                iapt_engine::EventKind::Token(t) => {
                    out[i].0.push(t.token);
                    out[i].1.push(t.logits.unwrap());
                }
                iapt_engine::EventKind::Done(d) => soft[i] = d.n_soft,
                iapt_engine::EventKind::Failed(err) => panic!("request {i}: {err}"),
            }
        }
        if first_step {
            report_claims(gpu, "multi_sequence", &e.hook_claims());
            assert!(out.iter().all(|o| o.0.len() == 1), "every prefill in the first step");
            first_step = false;
        }
    }
    let label = |what: &str| format!("n_ubatch {n_ubatch}, kv_unified {kv_unified}, {what}");
    assert_matches(&label("fixture adapter, long"), &long, &out[0].0, &out[0].1, 1e-4);
    assert_matches(&label("no adapter"), &base, &out[1].0, &out[1].1, 1e-4);
    assert_matches(&label("fixture adapter, short"), &short, &out[3].0, &out[3].1, 1e-4);
    assert_eq!(out[2].0, alone_tokens, "{}", label("second adapter: tokens differ from its one-sequence run"));
    for (step, (a, b)) in out[2].1.iter().zip(&alone_logits).enumerate() {
        let e = rel_err(a, &b.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!(e <= 1e-4, "{}: step {step}: rel err {e:e}", label("second adapter vs alone"));
    }
    assert_eq!(soft, vec![4, 0, 2, 4]);
}

// One KV stream per sequence (the engine's default: llama.cpp's equal split interleaves the
// sequences' rows in each ubatch) and one unified stream (ubatches in batch order).
on_every_device!(multi_sequence_one_ubatch, |gpu| {
    multi_sequence(gpu, 512, false);
    multi_sequence(gpu, 512, true);
});
on_every_device!(multi_sequence_over_ubatches_of_8_and_5, |gpu| {
    for kv_unified in [false, true] {
        multi_sequence(gpu, 8, kv_unified);
        multi_sequence(gpu, 5, kv_unified);
    }
});

#[test]
fn multi_sequence_errors_are_clear() {
    let c = case("llama-short-iapt");
    let (model, fixture) = load(&c);
    let fixture = fixture.unwrap();
    let mut e = Engine::new(&model, engine_config(&None, exact_params(512), 2)).unwrap();
    e.load_adapter("fixture", &fixture).unwrap();
    let err = e.submit(greedy(&c.instruction, Some("other"))).unwrap_err();
    assert!(matches!(err, EngineError::UnknownAdapter { .. }), "{err}");
    let err = e.submit(greedy(&[], Some("fixture"))).unwrap_err();
    assert!(matches!(err, EngineError::EmptyPrompt), "{err}");
    // An adapter for another model shape is refused when it is loaded.
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let wrong =
        random_adapter(&AdapterSpec::small(model.n_layer() as u32, 8, 2, 4, iapt_format::Activation::Relu), &mut Rng::new(1)).unwrap();
    let err = e.load_adapter("wrong", &wrong).unwrap_err();
    assert!(matches!(err, EngineError::AdapterRejected { .. }), "{err}");
}

/// A callback that claims nothing (as the hook does when disarmed).
struct Idle;

impl EvalCallback for Idle {
    fn wants(&self, _node: &NodeInfo<'_>) -> bool {
        false
    }
    fn on_data(&self, _node: &mut NodeData<'_>) {
        unreachable!("nothing was claimed")
    }
}

fn no_adapter(arch: &str) {
    let c = case(&format!("{arch}-short-base"));
    let (model, _) = load(&c);
    let (tokens, logits) = run(&model, None, &exact_params(512), &c.instruction);
    assert_matches(&c.name, &c, &tokens, &logits, 1e-4);

    // Plain llama.cpp (no callback) vs a context with an idle callback: bit-identical.
    let plain = |cb: Option<Arc<dyn EvalCallback>>| {
        let mut ctx = Context::new(&model, &context_params(exact_params(512)), cb).unwrap();
        let mut batch = Batch::new(64);
        let mut out = Vec::new();
        for (i, &t) in c.instruction.iter().enumerate() {
            batch.push(t, i as i32, i + 1 == c.instruction.len()).unwrap();
        }
        ctx.decode(&batch).unwrap();
        out.push(ctx.logits(c.instruction.len() - 1).unwrap().to_vec());
        for (k, &t) in c.tokens[..4].iter().enumerate() {
            batch.clear();
            batch.push(t, (c.instruction.len() + k) as i32, true).unwrap();
            ctx.decode(&batch).unwrap();
            out.push(ctx.logits(0).unwrap().to_vec());
        }
        out
    };
    let a = plain(None);
    let b = plain(Some(Arc::new(Idle)));
    assert_eq!(a, b, "{arch}: an idle callback changed the results");
    assert_eq!(a[..], logits[..5], "{arch}: the engine without adapter differs from plain llama.cpp");
}

#[test]
fn no_adapter_every_architecture_is_plain_llama_cpp() {
    archs().for_each(no_adapter);
}

on_every_device!(f16_kv_defaults_match_reference, f16_kv);

fn f16_kv(gpu: &Option<Arc<GpuRuntime>>) {
    for arch in archs() {
        for name in [format!("{arch}-short-iapt"), format!("{arch}-long-iapt"), format!("{arch}-short-base")] {
            let c = case(&name);
            let (model, adapter) = load(&c);
            let (tokens, logits) = run_on(gpu, &model, adapter.as_ref(), &default_params(), &c.instruction);
            assert_close(&format!("{name} (F16 KV, defaults)"), &c, &c.plain_logits, &tokens, &logits, 5e-3);
        }
    }
}

#[test]
fn q8_0_runs_and_reports_agreement() {
    let dir = tempfile::tempdir().unwrap();
    for arch in archs() {
        let c = case(&format!("{arch}-short-iapt"));
        let q8 = dir.path().join(format!("{arch}-q8_0.gguf"));
        iapt_llama::quantize(&c.model, &q8, Quant::Q8_0, 2).expect("quantize");
        let model = Model::load(&q8).unwrap();
        let adapter = Adapter::open(c.adapter.as_ref().unwrap()).unwrap();
        let (tokens, logits) = run(&model, Some(&adapter), &default_params(), &c.instruction);
        assert_eq!(tokens.len(), STEPS);
        let agree = tokens.iter().zip(&c.tokens).take_while(|(a, b)| a == b).count();
        let first = rel_err(&logits[0], &c.plain_logits[0]);
        eprintln!("{arch} Q8_0: {agree}/{STEPS} greedy tokens agree with the F32 reference before the first divergence; step-0 rel err {first:.2e}");
        // Q8_0 must stay close on the first step (same prompt, same soft tokens).
        assert!(first < 5e-2, "{arch} Q8_0 step-0 rel err {first:e}");
    }
}

#[test]
fn errors_are_clear() {
    let llama = case("llama-short-iapt");
    let qwen = case("qwen2-short-iapt");
    let (llama_model, llama_adapter) = load(&llama);
    let qwen_model = Model::load(&qwen.model).unwrap();
    let llama_adapter = llama_adapter.unwrap();

    // Wrong base model: rejected before any decode.
    let mut e = Engine::new(&qwen_model, engine_config(&None, exact_params(512), 1)).unwrap();
    let err = e.load_adapter("a", &llama_adapter).unwrap_err();
    assert!(matches!(err, EngineError::AdapterRejected { .. }), "{err}");
    assert!(err.to_string().contains("wrong base model"), "{err}");

    // Over-long prompt: prompt + 4 soft tokens + 1 generated token must fit 16 cells.
    let cfg = EngineConfig { seq_ctx: 16, batch_tokens: 16, ..engine_config(&None, exact_params(512), 1) };
    let mut e = Engine::new(&llama_model, cfg).unwrap();
    e.load_adapter("a", &llama_adapter).unwrap();
    let one = |p: &[Token]| Request { max_tokens: 1, ..greedy(p, Some("a")) };
    let err = e.submit(one(&[1; 12])).unwrap_err();
    assert!(matches!(err, EngineError::TooLong { n_prompt: 12, n_soft: 4, max_tokens: 1, seq_ctx: 16 }), "{err}");
    // 11 + 4 + 1 = 16 fits exactly.
    e.complete(one(&[1; 11]), &mut |_| {}).unwrap();

    let err = e.submit(one(&[])).unwrap_err();
    assert!(matches!(err, EngineError::EmptyPrompt), "{err}");
    let err = e.submit(one(&[1, 99_999])).unwrap_err();
    assert!(matches!(err, EngineError::TokenOutOfVocab { token: 99_999, .. }), "{err}");

    // A missing or non-GGUF model file.
    let err = Model::load(Path::new("/nonexistent/model.gguf")).err().unwrap();
    assert!(matches!(err, LlamaError::ModelLoad { .. }), "{err}");
    let err = Model::load(llama.adapter.as_ref().unwrap()).err().unwrap();
    assert!(matches!(err, LlamaError::ModelLoad { .. }), "{err}");
}

#[test]
fn hook_reports_a_plan_that_does_not_match_the_ubatches() {
    let c = case("llama-long-iapt");
    let (model, adapter) = load(&c);
    let generator = Arc::new(iapt_generator::Generator::from_adapter(&adapter.unwrap()).unwrap());
    let hook = Arc::new(StreamHook::new(*iapt_llama::arch_spec("llama").unwrap(), model.n_layer(), model.n_embd()));
    let mut ctx = Context::new(&model, &context_params(exact_params(512)), Some(hook.clone() as Arc<dyn EvalCallback>)).unwrap();
    let mut batch = Batch::new(64);
    let n = c.instruction.len();
    let total = n + 4;
    for i in 0..total {
        batch.push(c.instruction[i.min(n - 1)], i as i32, i + 1 == total).unwrap();
    }
    let seg = |g: &Arc<iapt_generator::Generator>| vec![Segment { row0: 0, first: 0, len: total, prefill: Prefill::cpu(g.clone(), n) }];
    // The context runs one ubatch of all the rows; a hook armed for ubatches of 8 must refuse it.
    hook.arm(seg(&generator), Split::Simple { batch_len: total, n_ubatch: 8 });
    ctx.decode(&batch).unwrap();
    let errors = hook.finish().1.expect_err("mismatched ubatches");
    assert!(errors[0].to_string().contains("split the batch differently"), "{errors:?}");
    // Armed right, on the same context, it works.
    ctx.clear_kv();
    hook.arm(seg(&generator), ctx.split(&batch));
    ctx.decode(&batch).unwrap();
    hook.finish().1.unwrap();
}

/// A callback that panics when asked about the first node.
struct Panics;

impl EvalCallback for Panics {
    fn wants(&self, _node: &NodeInfo<'_>) -> bool {
        panic!("deliberate panic in the callback")
    }
    fn on_data(&self, _node: &mut NodeData<'_>) {}
}

#[test]
fn a_panicking_callback_fails_the_decode_without_crossing_ffi() {
    let c = case("llama-short-base");
    let model = Model::load(&c.model).unwrap();
    let mut ctx = Context::new(&model, &context_params(exact_params(512)), Some(Arc::new(Panics))).unwrap();
    let mut batch = Batch::new(8);
    batch.push(1, 0, true).unwrap();
    let e = ctx.decode(&batch).unwrap_err();
    assert!(matches!(e, LlamaError::CallbackPanicked), "{e}");
}
