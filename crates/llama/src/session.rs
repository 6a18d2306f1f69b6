//! A generation session: one model, one context, and a resident set of IAPT adapters (possibly
//! none). The prefill puts every sequence's instruction and its adapter's m soft-token
//! placeholders in one decode with the hook armed; the logits of each sequence's last row give its
//! first response token; every later decode step runs disarmed, one token per live sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iapt_format::{Adapter, AdapterConfig, BaseModelInfo};
use iapt_generator::Generator;

use crate::error::LlamaError;
use crate::ffi::{Batch, Context, ContextParams, EvalCallback, Model, Token};
use crate::hook::{Claim, HookAdapter, IaptHook, Plan, SeqPlan};
use crate::sample::{Sampler, Sampling};
use iapt_generator_cuda::{GpuRuntime, GPU_MAX_SOFT_TOKENS};
use iapt_hook::{arch_spec, supported_archs, ArchSpec};

/// Checks that an adapter fits a model (architecture, layer count, width) and that the hook
/// supports the architecture; returns the architecture's node table.
pub fn check_compat(model: &Model, cfg: &AdapterConfig) -> Result<&'static ArchSpec, LlamaError> {
    let base = BaseModelInfo { arch: model.arch(), n_layer: model.n_layer() as u32, n_embd: model.n_embd() as u32 };
    // An unsupported architecture first: no adapter can run on it, whatever it was made for.
    let spec =
        arch_spec(&base.arch).ok_or_else(|| LlamaError::UnsupportedArch { arch: base.arch.clone(), supported: supported_archs() })?;
    let findings = base.check(cfg);
    if !findings.is_empty() {
        let detail = findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ");
        return Err(LlamaError::Incompatible { detail });
    }
    Ok(spec)
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The generated tokens (the first from the prefill's last row).
    pub tokens: Vec<Token>,
    /// The logits each token was chosen from (kept only when asked).
    pub logits: Vec<Vec<f32>>,
    /// Tokens in the prefill decode (instruction plus soft tokens).
    pub prefill_tokens: usize,
    /// Wall time of the prefill decode.
    pub prefill_time: Duration,
    /// Wall time of the decode steps.
    pub decode_time: Duration,
    /// Of `prefill_time`, the time the IAPT hook spent reading rows, generating and writing.
    pub hook_time: Duration,
    /// Whether generation stopped at an end-of-generation token.
    pub stopped_at_eog: bool,
}

/// Options of [`Session::generate`].
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub n_predict: usize,
    /// How to choose tokens.
    pub sampling: Sampling,
    /// Stop at an end-of-generation token (which is not included).
    pub stop_at_eog: bool,
    /// Keep every step's logits in [`Generation::logits`].
    pub keep_logits: bool,
}

/// Options of [`Session::with_adapters`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Threads of each CPU generator call.
    pub generator_threads: usize,
    /// Run the generators on this GPU runtime (adapters with more soft tokens than the kernels
    /// handle, [`GPU_MAX_SOFT_TOKENS`], stay on the CPU). `None`: on the CPU.
    pub gpu: Option<Arc<GpuRuntime>>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { generator_threads: 1, gpu: None }
    }
}

/// One sequence of a batched prefill: its instruction and which resident adapter it uses.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Index of the adapter in the session's set, or `None` for the plain base model.
    pub adapter: Option<usize>,
    /// The instruction tokens (BOS and chat-template tokens included).
    pub instruction: &'a [Token],
}

/// A model and context ready to run prompts, with a resident set of adapters (possibly empty).
pub struct Session<'m> {
    model: &'m Model,
    // The context holds its own `Arc` of the hook (its `cb_eval` state), so field order is free.
    ctx: Context<'m>,
    hook: Option<Arc<IaptHook>>,
    batch: Batch,
    /// Next position of each sequence of the last prefill.
    pos: Vec<usize>,
    /// KV cells in use (all sequences together).
    used: usize,
    /// Tokens the sequences may hold together: the requested context size (llama.cpp may round its
    /// own up).
    limit: usize,
    n_seq_max: usize,
}

impl<'m> Session<'m> {
    /// A session on `model` with at most one adapter (index 0); compatibility is checked first
    /// and the generator is built with `generator_threads` threads. `params.n_batch` is raised to
    /// `params.n_ctx` so that a whole prompt is one decode.
    pub fn new(
        model: &'m Model,
        adapter: Option<&Adapter>,
        params: &ContextParams,
        generator_threads: usize,
    ) -> Result<Session<'m>, LlamaError> {
        let adapters: Vec<&Adapter> = adapter.into_iter().collect();
        Session::with_adapters(model, &adapters, params, &SessionOptions { generator_threads, gpu: None })
    }

    /// A session on `model` holding every adapter of `adapters` resident (loaded and converted once;
    /// requests pick one by index). Each adapter is checked against the model first.
    /// `params.n_batch` is raised to `params.n_ctx` so that a whole batch of prompts is one decode.
    pub fn with_adapters(
        model: &'m Model,
        adapters: &[&Adapter],
        params: &ContextParams,
        opts: &SessionOptions,
    ) -> Result<Session<'m>, LlamaError> {
        let hook = if adapters.is_empty() {
            None
        } else {
            let mut arch = None;
            let mut resident = Vec::with_capacity(adapters.len());
            for a in adapters {
                arch = Some(check_compat(model, a.config())?);
                resident.push(match &opts.gpu {
                    // Weights uploaded once, in their stored dtype; never converted on the host.
                    Some(rt) if a.config().n_soft_tokens as usize <= GPU_MAX_SOFT_TOKENS => HookAdapter::Gpu(Arc::new(rt.upload(a)?)),
                    _ => HookAdapter::Cpu(Arc::new(Generator::from_adapter(a)?.with_threads(opts.generator_threads.max(1))?)),
                });
            }
            let arch = *arch.expect("at least one adapter");
            Some(Arc::new(IaptHook::with_adapters(arch, model.n_layer(), model.n_embd(), resident, opts.gpu.clone())?))
        };
        let mut params = params.clone();
        params.n_batch = params.n_ctx.max(1);
        let callback = hook.clone().map(|h| h as Arc<dyn EvalCallback>);
        let ctx = Context::new(model, &params, callback)?;
        let limit = ctx.n_ctx().min(ctx.n_batch());
        let batch = Batch::new(limit);
        Ok(Session { model, ctx, hook, batch, pos: Vec::new(), used: 0, limit, n_seq_max: params.n_seq_max.max(1) as usize })
    }

    /// Number of resident adapters.
    pub fn n_adapters(&self) -> usize {
        self.hook.as_ref().map_or(0, |h| h.n_adapters())
    }

    /// Soft tokens added after the instruction by adapter 0 (0 without an adapter).
    pub fn n_soft_tokens(&self) -> usize {
        self.hook.as_ref().map_or(0, |h| h.n_soft_tokens())
    }

    /// The context size (tokens all sequences may hold together, soft tokens included).
    pub fn n_ctx(&self) -> usize {
        self.limit
    }

    /// The time the hook spent in the last prefill (zero without an adapter).
    pub fn hook_busy_time(&self) -> Duration {
        self.hook.as_ref().map_or(Duration::ZERO, |h| h.busy_time())
    }

    /// The hook's time in the last prefill, split into reading, generating and writing (zero
    /// without an adapter).
    pub fn hook_times(&self) -> crate::hook::HookTimes {
        self.hook.as_ref().map(|h| h.times()).unwrap_or_default()
    }

    /// The hook's row copies of nodes outside host memory in the last prefill (round trips to an
    /// RPC worker or a device; zero without an adapter).
    pub fn hook_remote_copies(&self) -> usize {
        self.hook.as_ref().map_or(0, |h| h.remote_copies())
    }

    /// The nodes the hook claimed in the last prefill (empty without an adapter).
    pub fn claims(&self) -> Vec<Claim> {
        self.hook.as_ref().map(|h| h.claims()).unwrap_or_default()
    }

    fn check_tokens(&self, tokens: &[Token]) -> Result<(), LlamaError> {
        let n_vocab = self.model.n_vocab();
        match tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            Some(&token) => Err(LlamaError::BadToken { token, n_vocab }),
            None => Ok(()),
        }
    }

    /// Starts a fresh sequence: empties the KV cache and decodes the instruction (plus adapter 0's
    /// soft tokens when the session has adapters). Returns the logits of the last row.
    pub fn prefill(&mut self, instruction: &[Token]) -> Result<Vec<f32>, LlamaError> {
        let adapter = self.hook.as_ref().map(|_| 0);
        let mut logits = self.prefill_batch(&[Request { adapter, instruction }])?;
        Ok(logits.pop().expect("one sequence"))
    }

    /// Starts fresh sequences 0.. (one per request, in order): empties the KV cache and decodes
    /// every instruction and its adapter's soft tokens in one decode. Returns each sequence's
    /// logits of its last row.
    pub fn prefill_batch(&mut self, requests: &[Request<'_>]) -> Result<Vec<Vec<f32>>, LlamaError> {
        if requests.is_empty() || requests.iter().any(|r| r.instruction.is_empty()) {
            return Err(LlamaError::EmptyPrompt);
        }
        if requests.len() > self.n_seq_max {
            return Err(LlamaError::TooManySequences { n_seqs: requests.len(), n_seq_max: self.n_seq_max });
        }
        let n_adapters = self.n_adapters();
        if let Some(a) = requests.iter().filter_map(|r| r.adapter).find(|&a| a >= n_adapters) {
            return Err(LlamaError::NoSuchAdapter { index: a, n_adapters });
        }
        let soft = |r: &Request<'_>| self.hook.as_ref().map_or(0, |h| h.soft_tokens_of(r.adapter));
        let mut seqs = Vec::with_capacity(requests.len());
        let mut total = 0usize;
        for r in requests {
            self.check_tokens(r.instruction)?;
            seqs.push(SeqPlan { adapter: r.adapter, row0: total, n_instr: r.instruction.len() });
            total += r.instruction.len() + soft(r);
        }
        if total > self.limit {
            let n_soft: usize = requests.iter().map(soft).sum();
            return Err(LlamaError::PromptTooLong { n_tokens: total - n_soft, n_soft, n_ctx: self.limit });
        }
        self.ctx.clear_kv();
        self.pos.clear();
        self.used = 0;
        self.batch.clear();
        let mut last_rows = Vec::with_capacity(requests.len());
        for (seq, r) in requests.iter().enumerate() {
            let m = soft(r);
            let len = r.instruction.len() + m;
            // The placeholder id does not matter: the rows are replaced at every layer, including layer 0.
            let placeholder = r.instruction[0];
            for (i, &t) in r.instruction.iter().chain(std::iter::repeat_n(&placeholder, m)).enumerate() {
                self.batch.push_seq(t, i as i32, seq as i32, i + 1 == len)?;
            }
            last_rows.push(self.batch.len() - 1);
        }
        let armed = requests.iter().any(|r| r.adapter.is_some());
        if let (Some(h), true) = (&self.hook, armed) {
            h.arm(Plan { seqs, batch_len: total, n_ubatch: self.ctx.n_ubatch() })?;
        }
        let res = self.ctx.decode(&self.batch);
        if let (Some(h), true) = (&self.hook, armed) {
            match &res {
                Ok(()) => h.finish()?,
                Err(_) => h.disarm(),
            }
        }
        res?;
        self.pos = requests.iter().map(|r| r.instruction.len() + soft(r)).collect();
        self.used = total;
        last_rows.into_iter().map(|i| self.last_logits(i)).collect()
    }

    fn last_logits(&self, i: usize) -> Result<Vec<f32>, LlamaError> {
        self.ctx
            .logits(i)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| LlamaError::Decode { code: 0, detail: format!("no logits for batch row {i}") })
    }

    /// Decodes one token of sequence 0 at its next position (hook disarmed); returns its logits.
    pub fn step(&mut self, token: Token) -> Result<Vec<f32>, LlamaError> {
        let mut logits = self.step_batch(&[(0, token)])?;
        Ok(logits.pop().expect("one token"))
    }

    /// Decodes one token for each listed sequence `(seq, token)` of the last prefill, each at its
    /// sequence's next position, in one decode (hook disarmed); returns their logits in order.
    pub fn step_batch(&mut self, tokens: &[(usize, Token)]) -> Result<Vec<Vec<f32>>, LlamaError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        for (i, &(seq, t)) in tokens.iter().enumerate() {
            self.check_tokens(&[t])?;
            if seq >= self.pos.len() || tokens[..i].iter().any(|&(s, _)| s == seq) {
                return Err(LlamaError::Decode {
                    code: -1,
                    detail: format!("sequence {seq} is not live or is listed twice ({} live sequences)", self.pos.len()),
                });
            }
        }
        if self.used + tokens.len() > self.limit {
            return Err(LlamaError::Decode { code: 1, detail: format!("context of {} tokens is full", self.limit) });
        }
        self.batch.clear();
        for &(seq, t) in tokens {
            self.batch.push_seq(t, self.pos[seq] as i32, seq as i32, true)?;
        }
        self.ctx.decode(&self.batch)?;
        for &(seq, _) in tokens {
            self.pos[seq] += 1;
        }
        self.used += tokens.len();
        (0..tokens.len()).map(|i| self.last_logits(i)).collect()
    }

    /// Prefills `instruction` and generates up to `opts.n_predict` tokens, calling `on_token` for
    /// each as soon as it is chosen.
    pub fn generate(
        &mut self,
        instruction: &[Token],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(Token),
    ) -> Result<Generation, LlamaError> {
        let adapter = self.hook.as_ref().map(|_| 0);
        let mut out = self.generate_batch(&[Request { adapter, instruction }], opts, &mut |_, t| on_token(t))?;
        Ok(out.pop().expect("one sequence"))
    }

    /// Prefills every request in one decode and generates up to `opts.n_predict` tokens for each,
    /// one decode per step for all live sequences; `on_token(seq, token)` is called as soon as a
    /// token is chosen. Timings are shared: every result carries the batch's prefill and decode time.
    pub fn generate_batch(
        &mut self,
        requests: &[Request<'_>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, Token),
    ) -> Result<Vec<Generation>, LlamaError> {
        let mut out: Vec<Generation> = requests
            .iter()
            .map(|r| Generation {
                prefill_tokens: r.instruction.len() + self.hook.as_ref().map_or(0, |h| h.soft_tokens_of(r.adapter)),
                ..Generation::default()
            })
            .collect();
        if opts.n_predict == 0 {
            return Ok(out);
        }
        let mut samplers: Vec<Sampler> = requests.iter().map(|_| Sampler::new(opts.sampling)).collect();
        let t0 = Instant::now();
        let mut logits = self.prefill_batch(requests)?;
        let prefill_time = t0.elapsed();
        let hook_time = self.hook_busy_time();
        let t1 = Instant::now();
        let mut live: Vec<usize> = (0..requests.len()).collect();
        loop {
            let mut next = Vec::with_capacity(live.len());
            for (&seq, row) in live.iter().zip(logits.iter_mut()) {
                let g = &mut out[seq];
                let tok = samplers[seq].sample(row);
                if opts.stop_at_eog && self.model.is_eog(tok) {
                    g.stopped_at_eog = true;
                    continue;
                }
                if opts.keep_logits {
                    g.logits.push(std::mem::take(row));
                }
                g.tokens.push(tok);
                on_token(seq, tok);
                if g.tokens.len() < opts.n_predict && self.pos[seq] < self.limit {
                    next.push((seq, tok));
                }
            }
            if next.is_empty() || self.used + next.len() > self.limit {
                break;
            }
            logits = self.step_batch(&next)?;
            live = next.iter().map(|&(s, _)| s).collect();
        }
        let decode_time = t1.elapsed();
        for g in &mut out {
            g.prefill_time = prefill_time;
            g.hook_time = hook_time;
            g.decode_time = decode_time;
        }
        Ok(out)
    }
}
