//! The engine benchmark (crates/engine/BENCH.md), interleaved: two engines on one model in one
//! process, one serving N sequences spread over 4 resident adapters, the other the same N
//! sequences on the base model alone, same settings. They step in turn (one step of each, then
//! again), so interference from other processes hits both alike; each reports its decode-only
//! steps (no prefill rows: every running sequence's next token in one decode).
//!
//! ```text
//! cargo run --release -p iapt-engine --example engine_bench -- MODEL.gguf ADAPTER [N] [PROMPT_LEN] [N_PREDICT] [THREADS]
//! ```
//!
//! Defaults: N 16, PROMPT_LEN 32, N_PREDICT 32, THREADS 1. The 4 adapters are ADAPTER loaded
//! under 4 names (4 separate resident generators). Prompts are seeded random token ids; every
//! sequence generates exactly N_PREDICT tokens (end-of-generation tokens do not stop it), so both
//! engines decode batches of the same size at every step. Not a test: it prints one JSON line.

use std::error::Error;
use std::path::PathBuf;

use iapt_engine::{Engine, EngineConfig, EngineStats, Request};
use iapt_llama::{Model, Token};

fn arg(args: &[String], i: usize, default: usize) -> Result<usize, Box<dyn Error>> {
    Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(default))
}

/// Seeded random prompts (splitmix64), BOS first.
fn prompts(n: usize, len: usize, n_vocab: usize) -> Vec<Vec<Token>> {
    let mut s = 12u64;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let lo = 300.min(n_vocab - 1);
    (0..n).map(|_| std::iter::once(1).chain((1..len).map(|_| (lo + (next() as usize) % (n_vocab - lo)) as Token)).collect()).collect()
}

fn summary(s: &EngineStats) -> String {
    let t = s.decode_only_time.as_secs_f64();
    format!(
        "{{\"decode_only_steps\": {}, \"decode_only_tokens\": {}, \"decode_only_s\": {t:.3}, \"decode_tokens_per_s\": {:.2}, \"prefill_rows\": {}, \"all_steps_s\": {:.3}}}",
        s.decode_only_steps,
        s.decode_only_tokens,
        s.decode_only_tokens as f64 / t,
        s.prefill_rows,
        s.step_time.as_secs_f64()
    )
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: engine_bench MODEL.gguf ADAPTER [N] [PROMPT_LEN] [N_PREDICT] [THREADS]".into());
    }
    let (model_path, adapter) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let (n, prompt_len, n_predict, threads) = (arg(&args, 3, 16)?, arg(&args, 4, 32)?, arg(&args, 5, 32)?, arg(&args, 6, 1)?);
    let model = Model::load(&model_path)?;
    let cfg = EngineConfig {
        parallel: n,
        seq_ctx: prompt_len + 8 + n_predict,
        // Every prompt in the first step: both engines then decode n sequences at every step.
        batch_tokens: n * (prompt_len + 8),
        min_step_rows: 0,
        n_threads: threads as i32,
        generator_threads: threads,
        ..EngineConfig::default()
    };
    let mut base = Engine::new(&model, cfg.clone())?;
    let mut iapt = Engine::new(&model, cfg)?;
    for i in 0..4 {
        base.load_adapter_file(&format!("a{i}"), &adapter)?;
        iapt.load_adapter_file(&format!("a{i}"), &adapter)?;
    }
    for (i, p) in prompts(n, prompt_len, model.n_vocab()).into_iter().enumerate() {
        let req = Request { stop_at_eog: false, ..Request::new(p, n_predict) };
        base.submit(req.clone())?;
        iapt.submit(req.with_adapter(format!("a{}", i % 4)))?;
    }
    while !(base.is_idle() && iapt.is_idle()) {
        base.step();
        iapt.step();
    }
    let (b, a) = (&base.stats(), &iapt.stats());
    let rate = |s: &EngineStats| s.decode_only_tokens as f64 / s.decode_only_time.as_secs_f64();
    println!(
        "{{\"n\": {n}, \"prompt_len\": {prompt_len}, \"n_predict\": {n_predict}, \"threads\": {threads}, \"base\": {}, \"iapt_4_adapters\": {}, \"decode_ratio\": {:.3}}}",
        summary(b),
        summary(a),
        rate(a) / rate(b)
    );
    Ok(())
}
