//! Side-by-side throughput of the base model and the model with an IAPT adapter, in one process
//! with the same engine settings (two engines on one model, one slot each): prefill tokens/s (the
//! first step, one decode of `prompt_len` tokens; with the adapter that is `prompt_len - m`
//! instruction tokens plus m soft tokens) and decode tokens/s (the `gen - 1` single-token greedy
//! steps after the prefill, hook disarmed; the two engines step in turn, token by token). Runs
//! repeat `reps` times after a warm-up.
//! [`bench_batch`] measures decode at a batch of sequences the same way (all of them prefilled,
//! then decode-only steps of every sequence at once: what a server's decode phase is).
//! Each variant is reported by its best run (interference from other processes only ever slows a
//! run down, so the best run is the least disturbed estimate on a shared machine) and by its median.

use std::time::{Duration, Instant};

use iapt_engine::{Engine, EngineConfig, EngineError, EventKind, Request};
use iapt_format::Adapter;
use iapt_llama::{Model, Token};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Tokens in the prefill decode.
    pub prompt_len: usize,
    /// Decode steps.
    pub gen: usize,
    /// Measured repetitions per variant.
    pub reps: usize,
    /// The engine settings both variants run with (one slot; the whole prompt in one step).
    pub engine: EngineConfig,
}

/// Throughput of one variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Prefill tokens per second.
    pub prefill_tps: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
}

/// The median, smallest and largest of per-pair ratios (IAPT over base, one pair per repetition).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairRatios {
    /// Median of the pairs.
    pub median: f64,
    /// Smallest pair.
    pub min: f64,
    /// Largest pair.
    pub max: f64,
}

impl PairRatios {
    fn of(ratios: &[f64]) -> PairRatios {
        PairRatios { median: median(ratios), min: ratios.iter().copied().fold(f64::INFINITY, f64::min), max: best(ratios) }
    }
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
    /// IAPT / base prefill throughput of each repetition's pair (the two prefills run back to back,
    /// so a pair sees the same machine state; the median of pairs is steadier than best-of runs).
    pub prefill_pairs: PairRatios,
    /// As `prefill_pairs`, for decode (the two variants step in turn, token by token).
    pub decode_pairs: PairRatios,
    /// Median hook time per IAPT prefill spent reading rows, generating, writing rows, and the
    /// rest, in seconds.
    pub hook_split: [f64; 4],
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

/// A fixed pseudo-random prompt of `len` tokens starting with BOS-like id 1.
fn prompt(model: &Model, len: usize) -> Vec<Token> {
    let n_vocab = model.n_vocab().max(2) as u64;
    let mut state = 0x1234_5678_9abc_def0u64;
    (0..len)
        .map(|i| {
            if i == 0 {
                return 1;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (1 + state % (n_vocab - 1)) as Token
        })
        .collect()
}

/// Steps `engine` once and says whether its request produced a token (or finished).
/// `steps` decode steps of `base` and `iapt` in turn, token by token, so that interference from
/// other processes falls on both alike: the time each spent.
fn decode_in_turn(base: &mut Engine<'_>, iapt: &mut Engine<'_>, steps: usize) -> Result<(Duration, Duration), EngineError> {
    let (mut b, mut i) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..steps {
        let t = Instant::now();
        step(base)?;
        b += t.elapsed();
        let t = Instant::now();
        step(iapt)?;
        i += t.elapsed();
    }
    Ok((b, i))
}

fn step(engine: &mut Engine<'_>) -> Result<(), EngineError> {
    for ev in engine.step() {
        if let EventKind::Failed(e) = ev.kind {
            return Err(e);
        }
    }
    Ok(())
}

/// Runs the benchmark. The prompt is a fixed pseudo-random token sequence starting with BOS-like
/// id 1; generation is greedy and ignores end-of-generation tokens so both variants decode the
/// same number of steps.
pub fn bench(model: &Model, adapter: &Adapter, cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, EngineError> {
    let prompt = prompt(model, cfg.prompt_len);
    let mut base = Engine::new(model, cfg.engine.clone())?;
    let mut iapt = Engine::new(model, cfg.engine.clone())?;
    let m = iapt.load_adapter("adapter", adapter)?.n_soft_tokens;
    if cfg.prompt_len <= m {
        return Err(EngineError::EmptyPrompt);
    }
    let request = |tokens: &[Token]| Request { stop_at_eog: false, ..Request::new(tokens.to_vec(), cfg.gen) };
    let (mut bp, mut bd, mut ip, mut id) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut hook, mut bsecs, mut remote) = (Vec::new(), Vec::new(), 0);
    let mut split: [Vec<f64>; 4] = Default::default();
    for rep in 0..=cfg.reps {
        base.submit(request(&prompt))?;
        iapt.submit(request(&prompt[..cfg.prompt_len - m]).with_adapter("adapter"))?;
        // Prefill (the first step of each): base then IAPT.
        let t = Instant::now();
        step(&mut base)?;
        let b_pre = t.elapsed();
        let t = Instant::now();
        step(&mut iapt)?;
        let i_pre = t.elapsed();
        let times = iapt.hook_times();
        remote = iapt.hook_remote_copies();
        // Decode: the two variants step in turn (`decode_in_turn`).
        let (b_dec, i_dec) = decode_in_turn(&mut base, &mut iapt, cfg.gen.saturating_sub(1))?;
        debug_assert!(base.is_idle() && iapt.is_idle());
        let steps = cfg.gen - 1;
        let line = format!(
            "rep {rep}{}: base prefill {:.1} tok/s decode {:.2} tok/s | iapt prefill {:.1} tok/s decode {:.2} tok/s (hook {:.1} ms)",
            if rep == 0 { " (warm-up)" } else { "" },
            rate(cfg.prompt_len, b_pre),
            rate(steps, b_dec),
            rate(cfg.prompt_len, i_pre),
            rate(steps, i_dec),
            times.total.as_secs_f64() * 1e3
        );
        progress(&line);
        if rep == 0 {
            continue;
        }
        bp.push(rate(cfg.prompt_len, b_pre));
        bd.push(rate(steps, b_dec));
        ip.push(rate(cfg.prompt_len, i_pre));
        id.push(rate(steps, i_dec));
        hook.push(times.total.as_secs_f64());
        bsecs.push(b_pre.as_secs_f64());
        for (v, d) in split.iter_mut().zip([times.read, times.generate, times.write, times.rest()]) {
            v.push(d.as_secs_f64());
        }
    }
    Ok(BenchReport {
        base: Throughput { prefill_tps: best(&bp), decode_tps: best(&bd) },
        iapt: Throughput { prefill_tps: best(&ip), decode_tps: best(&id) },
        base_median: Throughput { prefill_tps: median(&bp), decode_tps: median(&bd) },
        iapt_median: Throughput { prefill_tps: median(&ip), decode_tps: median(&id) },
        hook_secs: median(&hook),
        base_prefill_secs: median(&bsecs),
        hook_remote_copies: remote,
        prefill_pairs: PairRatios::of(&ip.iter().zip(&bp).map(|(i, b)| i / b).collect::<Vec<_>>()),
        decode_pairs: PairRatios::of(&id.iter().zip(&bd).map(|(i, b)| i / b).collect::<Vec<_>>()),
        hook_split: split.map(|v| median(&v)),
    })
}

/// Decode throughput with `batch` sequences decoding together, base and IAPT side by side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchDecode {
    /// Sequences decoding together.
    pub batch: usize,
    /// Base decode tokens/s (all sequences), best run.
    pub base_tps: f64,
    /// IAPT decode tokens/s (every sequence prefilled with the adapter), best run.
    pub iapt_tps: f64,
    /// IAPT / base of each repetition's pair.
    pub pairs: PairRatios,
}

/// Submits `batch` requests and steps until every one has its first token (prefill done);
/// returns their ids.
fn prefill_all(engine: &mut Engine<'_>, requests: Vec<Request>) -> Result<Vec<iapt_engine::SeqId>, EngineError> {
    let ids = requests.into_iter().map(|r| engine.submit(r)).collect::<Result<Vec<_>, _>>()?;
    let mut started = std::collections::HashSet::new();
    while started.len() < ids.len() {
        for ev in engine.step() {
            match ev.kind {
                EventKind::Failed(e) => return Err(e),
                EventKind::Token(_) => {
                    started.insert(ev.id);
                }
                EventKind::Done(_) => return Err(EngineError::Config { detail: "a request ended during the prefill".to_owned() }),
            }
        }
    }
    Ok(ids)
}

/// Decode throughput at `batch` sequences: `batch` requests of `prompt_len` tokens on the base and
/// `batch` with the adapter (all resident as one adapter), prefilled, then `gen - 1` decode-only
/// steps of all `batch` sequences, the two engines stepping in turn; `reps` repetitions after a
/// warm-up, each a pair.
pub fn bench_batch(
    model: &Model,
    adapter: &Adapter,
    cfg: &BenchConfig,
    batch: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<BatchDecode, EngineError> {
    let engine = EngineConfig {
        parallel: batch,
        seq_ctx: cfg.prompt_len + cfg.gen + batch + 8,
        // One whole prompt per step beside every decode token: the i-th sequence starts decoding at step i.
        batch_tokens: cfg.prompt_len + batch,
        queue_capacity: batch,
        ..cfg.engine.clone()
    };
    let mut base = Engine::new(model, engine.clone())?;
    let mut iapt = Engine::new(model, engine)?;
    let m = iapt.load_adapter("adapter", adapter)?.n_soft_tokens;
    if cfg.prompt_len <= m {
        return Err(EngineError::EmptyPrompt);
    }
    // Distinct prompts (a rotation of one pseudo-random sequence), more tokens than are decoded.
    let prompt = prompt(model, cfg.prompt_len);
    let request = |i: usize, len: usize| {
        let mut p = prompt.clone();
        p[1..].rotate_left(i % (cfg.prompt_len - 1).max(1));
        // Enough tokens that none ends before the measured steps (the first prefilled decodes while
        // the others prefill).
        Request { stop_at_eog: false, ..Request::new(p[..len].to_vec(), cfg.gen + batch + 1) }
    };
    let (mut bd, mut id) = (Vec::new(), Vec::new());
    for rep in 0..=cfg.reps {
        let b_ids = prefill_all(&mut base, (0..batch).map(|i| request(i, cfg.prompt_len)).collect())?;
        let i_ids = prefill_all(&mut iapt, (0..batch).map(|i| request(i, cfg.prompt_len - m).with_adapter("adapter")).collect())?;
        let (b_dec, i_dec) = decode_in_turn(&mut base, &mut iapt, cfg.gen.saturating_sub(1))?;
        debug_assert!(
            base.running() == batch && iapt.running() == batch,
            "every sequence decoded in every measured step: {} {} of {batch}, queued {} {}",
            base.running(),
            iapt.running(),
            base.queued(),
            iapt.queued()
        );
        for (e, ids) in [(&mut base, b_ids), (&mut iapt, i_ids)] {
            for id in ids {
                e.cancel(id);
            }
        }
        let tokens = batch * (cfg.gen - 1);
        progress(&format!(
            "batch {batch}, rep {rep}{}: base decode {:.2} tok/s | iapt decode {:.2} tok/s",
            if rep == 0 { " (warm-up)" } else { "" },
            rate(tokens, b_dec),
            rate(tokens, i_dec)
        ));
        if rep > 0 {
            bd.push(rate(tokens, b_dec));
            id.push(rate(tokens, i_dec));
        }
    }
    Ok(BatchDecode {
        batch,
        base_tps: best(&bd),
        iapt_tps: best(&id),
        pairs: PairRatios::of(&id.iter().zip(&bd).map(|(i, b)| i / b).collect::<Vec<_>>()),
    })
}
