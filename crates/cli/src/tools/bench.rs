//! Side-by-side throughput of the base model and the model with an IAPT adapter, in one process
//! with the same context settings: prefill tokens/s (one decode of `prompt_len` tokens; with the
//! adapter that is `prompt_len - m` instruction tokens plus m soft tokens) and decode tokens/s
//! (`gen - 1` single-token greedy steps after the prefill, hook disarmed; the two variants step in
//! turn, token by token). Runs repeat `reps` times after a warm-up.
//! Each variant is reported by its best run (interference from other processes only ever slows a
//! run down, so the best run is the least disturbed estimate on a shared machine) and by its median.

use std::time::{Duration, Instant};

use iapt_format::Adapter;

use iapt_llama::{argmax, ContextParams, GpuRuntime, LlamaError, Model, Session, SessionOptions, Token};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Tokens in the prefill decode.
    pub prompt_len: usize,
    /// Decode steps.
    pub gen: usize,
    /// Measured repetitions per variant.
    pub reps: usize,
    /// Context settings shared by both variants.
    pub ctx: ContextParams,
    /// Generator threads.
    pub generator_threads: usize,
    /// Run the generator on this GPU runtime (`None`: on the CPU).
    pub gpu: Option<std::sync::Arc<GpuRuntime>>,
}

/// Throughput of one variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Prefill tokens per second.
    pub prefill_tps: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
}

/// Base and IAPT side by side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchReport {
    /// Without the adapter, best run.
    pub base: Throughput,
    /// With the adapter, best run.
    pub iapt: Throughput,
    /// Without the adapter, median run.
    pub base_median: Throughput,
    /// With the adapter, median run.
    pub iapt_median: Throughput,
    /// Median time the hook spent per IAPT prefill (reading rows, generating, writing), in seconds.
    pub hook_secs: f64,
    /// Median base prefill time, in seconds (the hook time relative to it is the prefill overhead
    /// IAPT adds, measured without the run-to-run noise of two separate timings).
    pub base_prefill_secs: f64,
    /// The hook's row copies of nodes outside host memory per IAPT prefill (with the layers on RPC
    /// workers: network round trips; 0 when every node it touches is in host memory).
    pub hook_remote_copies: usize,
}

impl BenchReport {
    /// IAPT prefill throughput relative to base (best runs).
    pub fn prefill_ratio(&self) -> f64 {
        self.iapt.prefill_tps / self.base.prefill_tps
    }

    /// IAPT decode throughput relative to base (best runs).
    pub fn decode_ratio(&self) -> f64 {
        self.iapt.decode_tps / self.base.decode_tps
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn rate(tokens: usize, t: Duration) -> f64 {
    tokens as f64 / t.as_secs_f64().max(1e-9)
}

/// Runs the benchmark. The prompt is a fixed pseudo-random token sequence starting with BOS-like
/// id 1; generation is greedy and ignores end-of-generation tokens so both variants decode the
/// same number of steps.
pub fn bench(model: &Model, adapter: &Adapter, cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, LlamaError> {
    let n_vocab = model.n_vocab().max(2) as u64;
    let mut state = 0x1234_5678_9abc_def0u64;
    let prompt: Vec<Token> = (0..cfg.prompt_len)
        .map(|i| {
            if i == 0 {
                return 1;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (1 + state % (n_vocab - 1)) as Token
        })
        .collect();
    let mut base = Session::new(model, None, &cfg.ctx, 1)?;
    let opts = SessionOptions { generator_threads: cfg.generator_threads, gpu: cfg.gpu.clone() };
    let mut iapt = Session::with_adapters(model, &[adapter], &cfg.ctx, &opts)?;
    let m = iapt.n_soft_tokens();
    if cfg.prompt_len <= m {
        return Err(LlamaError::EmptyPrompt);
    }
    let instr = &prompt[..cfg.prompt_len - m];
    let (mut bp, mut bd, mut ip, mut id) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut hook, mut bsecs, mut remote) = (Vec::new(), Vec::new(), 0);
    for rep in 0..=cfg.reps {
        // Prefill: base then IAPT.
        let t = Instant::now();
        let mut lb = base.prefill(&prompt)?;
        let b_pre = t.elapsed();
        let t = Instant::now();
        let mut li = iapt.prefill(instr)?;
        let i_pre = t.elapsed();
        let i_hook = iapt.hook_busy_time();
        remote = iapt.hook_remote_copies();
        // Decode: the two variants step in turn, token by token, so that interference from other
        // processes falls on both alike.
        let (mut b_dec, mut i_dec) = (Duration::ZERO, Duration::ZERO);
        for _ in 1..cfg.gen {
            let t = Instant::now();
            lb = base.step(argmax(&lb))?;
            b_dec += t.elapsed();
            let t = Instant::now();
            li = iapt.step(argmax(&li))?;
            i_dec += t.elapsed();
        }
        let steps = cfg.gen - 1;
        let line = format!(
            "rep {rep}{}: base prefill {:.1} tok/s decode {:.2} tok/s | iapt prefill {:.1} tok/s decode {:.2} tok/s (hook {:.1} ms)",
            if rep == 0 { " (warm-up)" } else { "" },
            rate(cfg.prompt_len, b_pre),
            rate(steps, b_dec),
            rate(cfg.prompt_len, i_pre),
            rate(steps, i_dec),
            i_hook.as_secs_f64() * 1e3
        );
        progress(&line);
        if rep == 0 {
            continue;
        }
        bp.push(rate(cfg.prompt_len, b_pre));
        bd.push(rate(steps, b_dec));
        ip.push(rate(cfg.prompt_len, i_pre));
        id.push(rate(steps, i_dec));
        hook.push(i_hook.as_secs_f64());
        bsecs.push(b_pre.as_secs_f64());
    }
    Ok(BenchReport {
        base: Throughput { prefill_tps: best(&bp), decode_tps: best(&bd) },
        iapt: Throughput { prefill_tps: best(&ip), decode_tps: best(&id) },
        base_median: Throughput { prefill_tps: median(&bp), decode_tps: median(&bd) },
        iapt_median: Throughput { prefill_tps: median(&ip), decode_tps: median(&id) },
        hook_secs: median(&hook),
        base_prefill_secs: median(&bsecs),
        hook_remote_copies: remote,
    })
}
