//! Parity of the llama.cpp hook with the independent reference: Hugging Face transformers in
//! float64 with the PyTorch twin's injection (converters/python/make_model_fixtures.py, fixtures in
//! converters/python/fixtures/models). Tiny llama (GQA), qwen2 (q/k/v biases) and qwen3 (q/k
//! RMSNorm) models, 3 layers,
//! random weights, a rational-B adapter with m = 4 soft tokens.
//!
//! Relative error of a step = max |llama.cpp - reference| / max |reference| over the vocabulary.
//! - `arch_table_*`: the hook claims exactly `embd`, `l_out-0`, `l_out-1` (never the last `l_out`)
//!   in every ubatch; fails loudly if llama.cpp renames its nodes.
//! - `f32_*`: F32 weights, F32 KV cache, flash attention off: rel err <= 1e-4 at every one of 16
//!   greedy steps, identical tokens; the GGUF adapter container gives bit-identical logits.
//! - `multi_ubatch_*`: a 30-token instruction split over ubatches of 8, 5 and 31 tokens (the soft
//!   slots straddle a ubatch boundary) equals the one-ubatch run and the reference.
//! - `no_adapter_*`: without an adapter the reference without injection is matched, and a context
//!   with a callback installed but claiming nothing is bit-identical to plain llama.cpp.
//! - `f16_kv_*`: llama.cpp's defaults (F16 KV cache, automatic flash attention): rel err <= 5e-3,
//!   identical tokens.
//! - `q8_0_*`: the F32 model quantized to Q8_0 by llama.cpp runs; its greedy agreement with the
//!   reference is printed.
//! - `multi_sequence_*`: four sequences in one decode (the fixture adapter twice, no adapter, and a
//!   second resident adapter with another m), also split over ubatches of 8 and 5 rows, each match
//!   the reference (fixture cases) or their own one-sequence run (the second adapter) at every
//!   greedy step, with identical tokens.
//! - `errors_*`: wrong base model, over-long and empty prompts, bad token ids, unloadable models.
//! - `hook_reports_*`: a plan whose ubatches differ from llama.cpp's split fails the call after the
//!   decode (the hook checks `ne[1]` and stops touching the graph).
//! - `a_panicking_callback_*`: a panic in the callback is caught at the FFI boundary and fails the decode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iapt_format::{Adapter, Container};
use iapt_llama::{
    Batch, Context, ContextParams, EvalCallback, GenerateOptions, GpuRuntime, KvType, LlamaError, Model, NodeData, NodeInfo, Quant,
    Request, Sampling, Session, SessionOptions,
};

const STEPS: usize = 16;

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
    logits: Vec<Vec<f64>>,
}

fn case(name: &str) -> Case {
    let dir = fixtures();
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest")).unwrap();
    let c = manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"));
    let ints = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect::<Vec<_>>();
    let arr = iapt_npy::read_f64_file(dir.join(c["logits"].as_str().unwrap())).expect("reference logits");
    let n_vocab = arr.shape[1];
    Case {
        name: name.to_owned(),
        model: dir.join(c["model"].as_str().unwrap()),
        adapter: c["adapter"].as_str().map(|a| dir.join(a)),
        instruction: ints(&c["instruction"]),
        tokens: ints(&c["tokens"]),
        logits: arr.data.chunks(n_vocab).map(<[f64]>::to_vec).collect(),
    }
}

fn exact_params(n_ubatch: u32) -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_batch: 256,
        n_ubatch,
        n_threads: 1,
        flash_attn: Some(false),
        kv_type: KvType::F32,
        ..ContextParams::default()
    }
}

fn default_params() -> ContextParams {
    ContextParams { n_ctx: 256, n_threads: 1, ..ContextParams::default() }
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "vocabulary size");
    let num = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
    let den = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    num / den
}

fn run(model: &Model, adapter: Option<&Adapter>, params: &ContextParams, instruction: &[i32]) -> (Vec<i32>, Vec<Vec<f32>>) {
    run_on(&None, model, adapter, params, instruction)
}

/// Where the generators run. The same test bodies run on each: the CPU, the GPU kernels on the
/// CPU emulator (always, with this crate's `gpu-emulation` dev feature), and a CUDA device (the
/// test prints why it skipped where none is usable, and fails there under `IAPT_REQUIRE_CUDA=1`).
#[derive(Debug, Clone, Copy)]
enum Dev {
    Cpu,
    Emulated,
    Cuda,
}

/// Runs `body` with the runtime of `dev` (None for the CPU), or prints why it cannot.
fn on_dev(dev: Dev, test: &str, body: impl FnOnce(&Option<Arc<GpuRuntime>>)) {
    let rt = match dev {
        Dev::Cpu => None,
        Dev::Emulated => Some(GpuRuntime::emulated()),
        // Skips where no device is usable, and fails instead under IAPT_REQUIRE_CUDA=1.
        Dev::Cuda => match iapt_generator_cuda::testing::cuda_for_test(test) {
            Some(rt) => Some(rt),
            None => return,
        },
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
            fn cuda() {
                on_dev(Dev::Cuda, stringify!($name), $body);
            }
        }
    };
}

/// Checks where the hook found the nodes: with the emulator every node is in its (host) memory;
/// on CUDA it prints how many were in device memory (all but layer 0's with full offload).
fn report_claims(gpu: &Option<Arc<GpuRuntime>>, label: &str, claims: &[iapt_llama::Claim]) {
    let Some(rt) = gpu else { return };
    let on = claims.iter().filter(|c| c.on_device).count();
    if rt.is_emulated() {
        assert_eq!(on, claims.len(), "{label}: every node is in the emulator's memory");
    } else {
        eprintln!("{label}: {on} of {} claimed nodes in device memory (rows read and written in place)", claims.len());
    }
}

fn session<'m>(gpu: &Option<Arc<GpuRuntime>>, model: &'m Model, adapters: &[&Adapter], params: &ContextParams) -> Session<'m> {
    Session::with_adapters(model, adapters, params, &SessionOptions { generator_threads: 1, gpu: gpu.clone() }).expect("session")
}

fn run_on(
    gpu: &Option<Arc<GpuRuntime>>,
    model: &Model,
    adapter: Option<&Adapter>,
    params: &ContextParams,
    instruction: &[i32],
) -> (Vec<i32>, Vec<Vec<f32>>) {
    let adapters: Vec<&Adapter> = adapter.into_iter().collect();
    let mut s = session(gpu, model, &adapters, params);
    let opts = GenerateOptions { n_predict: STEPS, sampling: Sampling::Greedy, stop_at_eog: false, keep_logits: true };
    let g = s.generate(instruction, &opts, &mut |_| {}).expect("generate");
    report_claims(gpu, "run", &s.claims());
    (g.tokens, g.logits)
}

/// Asserts identical tokens and per-step rel err <= tol; returns the worst rel err.
fn assert_matches(label: &str, c: &Case, tokens: &[i32], logits: &[Vec<f32>], tol: f64) -> f64 {
    assert_eq!(tokens, &c.tokens[..], "{label}: greedy tokens differ from the reference");
    let mut worst = 0.0f64;
    for (step, (got, want)) in logits.iter().zip(&c.logits).enumerate() {
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

fn arch_table(arch: &str) {
    let c = case(&format!("{arch}-long-iapt"));
    let (model, adapter) = load(&c);
    let adapter = adapter.unwrap();
    // Literal names (not taken from the table): this is what llama.cpp 0.1.161 calls them.
    let expected = ["embd", "l_out-0", "l_out-1"];
    assert_eq!(model.n_layer(), expected.len());
    for n_ubatch in [512u32, 8] {
        let mut s = Session::new(&model, Some(&adapter), &exact_params(n_ubatch), 1).unwrap();
        s.prefill(&c.instruction).unwrap();
        let claims = s.claims();
        let total = c.instruction.len() + 4;
        let n_ub = total.div_ceil(n_ubatch as usize);
        assert_eq!(claims.len(), n_ub * expected.len(), "{arch} n_ubatch {n_ubatch}: {claims:?}");
        for (i, cl) in claims.iter().enumerate() {
            let (ub, layer) = (i / expected.len(), i % expected.len());
            assert_eq!((cl.ubatch, cl.layer, cl.node.as_str()), (ub, layer, expected[layer]), "{arch} n_ubatch {n_ubatch}");
            assert_eq!(cl.rows, (n_ubatch as usize).min(total - ub * n_ubatch as usize));
        }
    }
}

#[test]
fn arch_table_llama() {
    arch_table("llama");
}

#[test]
fn arch_table_qwen2() {
    arch_table("qwen2");
}

#[test]
fn arch_table_qwen3() {
    arch_table("qwen3");
}

fn f32_parity(gpu: &Option<Arc<GpuRuntime>>, arch: &str) {
    for len in ["short", "long"] {
        let c = case(&format!("{arch}-{len}-iapt"));
        let (model, adapter) = load(&c);
        let adapter = adapter.unwrap();
        let (tokens, logits) = run_on(gpu, &model, Some(&adapter), &exact_params(512), &c.instruction);
        assert_matches(&c.name, &c, &tokens, &logits, 1e-4);
        // The same adapter through the GGUF container gives bit-identical results.
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("a.gguf");
        adapter.save(&gguf, Container::Gguf).unwrap();
        let from_gguf = Adapter::open(&gguf).unwrap();
        let (t2, l2) = run_on(gpu, &model, Some(&from_gguf), &exact_params(512), &c.instruction);
        assert_eq!((t2, l2), (tokens, logits), "{}: GGUF adapter differs from safetensors", c.name);
    }
}

on_every_device!(f32_llama_matches_reference, |gpu| f32_parity(gpu, "llama"));
on_every_device!(f32_qwen2_matches_reference, |gpu| f32_parity(gpu, "qwen2"));
on_every_device!(f32_qwen3_matches_reference, |gpu| f32_parity(gpu, "qwen3"));

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

on_every_device!(multi_ubatch_llama_equals_one_ubatch, |gpu| multi_ubatch(gpu, "llama"));
on_every_device!(multi_ubatch_qwen2_equals_one_ubatch, |gpu| multi_ubatch(gpu, "qwen2"));
on_every_device!(multi_ubatch_qwen3_equals_one_ubatch, |gpu| multi_ubatch(gpu, "qwen3"));

/// A second adapter for the tiny llama model, with m = 2 soft tokens (the fixture's has 4).
fn second_adapter(model: &Model) -> Adapter {
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let spec = AdapterSpec::small(model.n_layer() as u32, model.n_embd() as u32, 2, 16, iapt_format::Activation::Silu);
    random_adapter(&spec, &mut Rng::new(0x05EC_017D)).expect("valid adapter")
}

fn greedy() -> GenerateOptions {
    GenerateOptions { n_predict: STEPS, sampling: Sampling::Greedy, stop_at_eog: false, keep_logits: true }
}

fn multi_sequence(gpu: &Option<Arc<GpuRuntime>>, n_ubatch: u32) {
    let long = case("llama-long-iapt");
    let short = case("llama-short-iapt");
    let base = case("llama-short-base");
    let (model, fixture) = load(&long);
    let fixture = fixture.unwrap();
    let second = second_adapter(&model);
    // Alone: the second adapter on the long instruction, one sequence per decode.
    let (alone_tokens, alone_logits) = {
        let mut s = session(gpu, &model, &[&second], &exact_params(512));
        let g = s.generate(&long.instruction, &greedy(), &mut |_| {}).unwrap();
        (g.tokens, g.logits)
    };
    let params = ContextParams { n_seq_max: 4, ..exact_params(n_ubatch) };
    let mut s = session(gpu, &model, &[&fixture, &second], &params);
    let requests = [
        Request { adapter: Some(0), instruction: &long.instruction },
        Request { adapter: None, instruction: &base.instruction },
        Request { adapter: Some(1), instruction: &long.instruction },
        Request { adapter: Some(0), instruction: &short.instruction },
    ];
    let mut order = Vec::new();
    let out = s.generate_batch(&requests, &greedy(), &mut |seq, _| order.push(seq)).unwrap();
    report_claims(gpu, "multi_sequence", &s.claims());
    let label = |what: &str| format!("n_ubatch {n_ubatch}, {what}");
    assert_matches(&label("fixture adapter, long"), &long, &out[0].tokens, &out[0].logits, 1e-4);
    assert_matches(&label("no adapter"), &base, &out[1].tokens, &out[1].logits, 1e-4);
    assert_matches(&label("fixture adapter, short"), &short, &out[3].tokens, &out[3].logits, 1e-4);
    assert_eq!(out[2].tokens, alone_tokens, "{}", label("second adapter: tokens differ from its one-sequence run"));
    for (step, (a, b)) in out[2].logits.iter().zip(&alone_logits).enumerate() {
        let e = rel_err(a, &b.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!(e <= 1e-4, "{}: step {step}: rel err {e:e}", label("second adapter vs alone"));
    }
    assert_eq!(out[0].prefill_tokens, long.instruction.len() + 4);
    assert_eq!(out[1].prefill_tokens, base.instruction.len());
    assert_eq!(out[2].prefill_tokens, long.instruction.len() + 2);
    // Tokens are reported per step for all live sequences, in sequence order.
    assert_eq!(&order[..4], &[0, 1, 2, 3]);
    assert_eq!(order.len(), 4 * STEPS);
}

on_every_device!(multi_sequence_one_ubatch, |gpu| multi_sequence(gpu, 512));
on_every_device!(multi_sequence_over_ubatches_of_8_and_5, |gpu| {
    multi_sequence(gpu, 8);
    multi_sequence(gpu, 5);
});

#[test]
fn multi_sequence_errors_are_clear() {
    let c = case("llama-short-iapt");
    let (model, fixture) = load(&c);
    let fixture = fixture.unwrap();
    let params = ContextParams { n_seq_max: 2, ..exact_params(512) };
    let mut s = Session::with_adapters(&model, &[&fixture], &params, &SessionOptions::default()).unwrap();
    let r = |adapter| Request { adapter, instruction: &c.instruction };
    let e = s.prefill_batch(&[r(Some(1))]).unwrap_err();
    assert!(matches!(e, LlamaError::NoSuchAdapter { index: 1, n_adapters: 1 }), "{e}");
    let e = s.prefill_batch(&[r(Some(0)), r(None), r(Some(0))]).unwrap_err();
    assert!(matches!(e, LlamaError::TooManySequences { n_seqs: 3, n_seq_max: 2 }), "{e}");
    let e = s.prefill_batch(&[r(Some(0)), Request { adapter: None, instruction: &[] }]).unwrap_err();
    assert!(matches!(e, LlamaError::EmptyPrompt), "{e}");
    // Stepping a sequence twice in one decode, or one that is not live, is refused.
    s.prefill_batch(&[r(Some(0)), r(None)]).unwrap();
    assert!(s.step_batch(&[(0, 1), (0, 2)]).is_err());
    assert!(s.step_batch(&[(2, 1)]).is_err());
    // An adapter for another model shape is refused when the session is built.
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
    let wrong =
        random_adapter(&AdapterSpec::small(model.n_layer() as u32, 8, 2, 4, iapt_format::Activation::Relu), &mut Rng::new(1)).unwrap();
    let e = Session::with_adapters(&model, &[&fixture, &wrong], &params, &SessionOptions::default()).err().unwrap();
    assert!(matches!(e, LlamaError::Incompatible { .. }), "{e}");
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
        let mut ctx = Context::new(&model, &exact_params(512), cb).unwrap();
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
    assert_eq!(a[..], logits[..5], "{arch}: Session without adapter differs from plain llama.cpp");
}

#[test]
fn no_adapter_llama_is_plain_llama_cpp() {
    no_adapter("llama");
}

#[test]
fn no_adapter_qwen2_is_plain_llama_cpp() {
    no_adapter("qwen2");
}

#[test]
fn no_adapter_qwen3_is_plain_llama_cpp() {
    no_adapter("qwen3");
}

on_every_device!(f16_kv_defaults_match_reference, f16_kv);

fn f16_kv(gpu: &Option<Arc<GpuRuntime>>) {
    for arch in ["llama", "qwen2", "qwen3"] {
        for name in [format!("{arch}-short-iapt"), format!("{arch}-long-iapt"), format!("{arch}-short-base")] {
            let c = case(&name);
            let (model, adapter) = load(&c);
            let (tokens, logits) = run_on(gpu, &model, adapter.as_ref(), &default_params(), &c.instruction);
            assert_matches(&format!("{name} (F16 KV, defaults)"), &c, &tokens, &logits, 5e-3);
        }
    }
}

#[test]
fn q8_0_runs_and_reports_agreement() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3"] {
        let c = case(&format!("{arch}-short-iapt"));
        let q8 = dir.path().join(format!("{arch}-q8_0.gguf"));
        iapt_llama::quantize(&c.model, &q8, Quant::Q8_0, 2).expect("quantize");
        let model = Model::load(&q8).unwrap();
        let adapter = Adapter::open(c.adapter.as_ref().unwrap()).unwrap();
        let (tokens, logits) = run(&model, Some(&adapter), &default_params(), &c.instruction);
        assert_eq!(tokens.len(), STEPS);
        let agree = tokens.iter().zip(&c.tokens).take_while(|(a, b)| a == b).count();
        let first = rel_err(&logits[0], &c.logits[0]);
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
    let e = Session::new(&qwen_model, Some(&llama_adapter), &exact_params(512), 1).err().expect("wrong base model");
    assert!(matches!(e, LlamaError::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("wrong base model"), "{e}");

    // Over-long prompt.
    let mut small = exact_params(512);
    small.n_ctx = 16;
    let mut s = Session::new(&llama_model, Some(&llama_adapter), &small, 1).unwrap();
    let e = s.prefill(&[1; 13]).unwrap_err();
    assert!(matches!(e, LlamaError::PromptTooLong { n_tokens: 13, n_soft: 4, n_ctx: 16 }), "{e}");
    // 12 + 4 = 16 fits exactly.
    s.prefill(&[1; 12]).unwrap();

    let e = s.prefill(&[]).unwrap_err();
    assert!(matches!(e, LlamaError::EmptyPrompt), "{e}");
    let e = s.prefill(&[1, 99_999]).unwrap_err();
    assert!(matches!(e, LlamaError::BadToken { token: 99_999, .. }), "{e}");

    // A missing or non-GGUF model file.
    let e = Model::load(Path::new("/nonexistent/model.gguf")).err().unwrap();
    assert!(matches!(e, LlamaError::ModelLoad { .. }), "{e}");
    let e = Model::load(llama.adapter.as_ref().unwrap()).err().unwrap();
    assert!(matches!(e, LlamaError::ModelLoad { .. }), "{e}");
}

#[test]
fn hook_reports_a_plan_that_does_not_match_the_ubatches() {
    let c = case("llama-long-iapt");
    let (model, adapter) = load(&c);
    let generator = iapt_generator::Generator::from_adapter(&adapter.unwrap()).unwrap();
    let hook = Arc::new(iapt_llama::IaptHook::new(*iapt_llama::arch_spec("llama").unwrap(), generator));
    let mut ctx = Context::new(&model, &exact_params(512), Some(hook.clone() as Arc<dyn EvalCallback>)).unwrap();
    let mut batch = Batch::new(64);
    let total = c.instruction.len() + 4;
    for i in 0..total {
        batch.push(c.instruction[i.min(c.instruction.len() - 1)], i as i32, i + 1 == total).unwrap();
    }
    // The context runs one ubatch of 34 rows; a plan of ubatches of 8 must be refused.
    hook.arm(iapt_llama::Plan::single(c.instruction.len(), total, 8)).unwrap();
    ctx.decode(&batch).unwrap();
    let e = hook.finish().expect_err("mismatched plan");
    assert!(e.to_string().contains("split the batch differently"), "{e}");
    // A matching plan on the same context works.
    ctx.clear_kv();
    hook.arm(iapt_llama::Plan::single(c.instruction.len(), total, 512)).unwrap();
    ctx.decode(&batch).unwrap();
    hook.finish().unwrap();
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
    let mut ctx = Context::new(&model, &exact_params(512), Some(Arc::new(Panics))).unwrap();
    let mut batch = Batch::new(8);
    batch.push(1, 0, true).unwrap();
    let e = ctx.decode(&batch).unwrap_err();
    assert!(matches!(e, LlamaError::CallbackPanicked), "{e}");
}
