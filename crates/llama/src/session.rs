//! A generation session: one model, one context, optionally an IAPT adapter. The prefill puts the
//! instruction and the m soft-token placeholders in one decode with the hook armed; the logits of
//! the last soft row give the first response token; every later decode step runs disarmed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iapt_format::{Adapter, AdapterConfig, BaseModelInfo};
use iapt_generator::Generator;

use crate::arch::{arch_spec, supported_archs, ArchSpec};
use crate::error::LlamaError;
use crate::ffi::{Batch, Context, ContextParams, EvalCallback, Model, Token};
use crate::hook::{Claim, IaptHook, Plan};
use crate::sample::{Sampler, Sampling};

/// Checks that an adapter fits a model (architecture, layer count, width) and that the hook
/// supports the architecture; returns the architecture's node table.
pub fn check_compat(model: &Model, cfg: &AdapterConfig) -> Result<&'static ArchSpec, LlamaError> {
    let base = BaseModelInfo { arch: model.arch(), n_layer: model.n_layer() as u32, n_embd: model.n_embd() as u32 };
    let findings = base.check(cfg);
    if !findings.is_empty() {
        let detail = findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ");
        return Err(LlamaError::Incompatible { detail });
    }
    arch_spec(&base.arch).ok_or_else(|| LlamaError::UnsupportedArch { arch: base.arch.clone(), supported: supported_archs() })
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

/// A model and context ready to run prompts, with or without an adapter.
pub struct Session<'m> {
    model: &'m Model,
    // The context holds its own `Arc` of the hook (its `cb_eval` state), so field order is free.
    ctx: Context<'m>,
    hook: Option<Arc<IaptHook>>,
    batch: Batch,
    pos: usize,
    /// Tokens a sequence may hold: the requested context size (llama.cpp may round its own up).
    limit: usize,
}

impl<'m> Session<'m> {
    /// A session on `model`; with `adapter`, compatibility is checked first and the generator is
    /// built with `generator_threads` threads. `params.n_batch` is raised to `params.n_ctx` so that
    /// a whole prompt is one decode.
    pub fn new(
        model: &'m Model,
        adapter: Option<&Adapter>,
        params: &ContextParams,
        generator_threads: usize,
    ) -> Result<Session<'m>, LlamaError> {
        let hook = match adapter {
            Some(a) => {
                let arch = check_compat(model, a.config())?;
                let generator = Generator::from_adapter(a)?.with_threads(generator_threads.max(1))?;
                Some(Arc::new(IaptHook::new(*arch, generator)))
            }
            None => None,
        };
        let mut params = params.clone();
        params.n_batch = params.n_ctx.max(1);
        let callback = hook.clone().map(|h| h as Arc<dyn EvalCallback>);
        let ctx = Context::new(model, &params, callback)?;
        let limit = ctx.n_ctx().min(ctx.n_batch());
        let batch = Batch::new(limit);
        Ok(Session { model, ctx, hook, batch, pos: 0, limit })
    }

    /// Soft tokens added after the instruction (0 without an adapter).
    pub fn n_soft_tokens(&self) -> usize {
        self.hook.as_ref().map_or(0, |h| h.n_soft_tokens())
    }

    /// The context size (tokens a sequence may hold, soft tokens included).
    pub fn n_ctx(&self) -> usize {
        self.limit
    }

    /// The time the hook spent in the last prefill (zero without an adapter).
    pub fn hook_busy_time(&self) -> Duration {
        self.hook.as_ref().map_or(Duration::ZERO, |h| h.busy_time())
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

    /// Starts a fresh sequence: empties the KV cache and decodes the instruction (plus the soft
    /// tokens with an adapter). Returns the logits of the last row.
    pub fn prefill(&mut self, instruction: &[Token]) -> Result<Vec<f32>, LlamaError> {
        if instruction.is_empty() {
            return Err(LlamaError::EmptyPrompt);
        }
        self.check_tokens(instruction)?;
        let m = self.n_soft_tokens();
        let total = instruction.len() + m;
        if total > self.limit {
            return Err(LlamaError::PromptTooLong { n_tokens: instruction.len(), n_soft: m, n_ctx: self.limit });
        }
        self.ctx.clear_kv();
        self.pos = 0;
        self.batch.clear();
        // The placeholder id does not matter: the rows are replaced at every layer, including layer 0.
        let placeholder = instruction[0];
        for (i, &t) in instruction.iter().chain(std::iter::repeat_n(&placeholder, m)).enumerate() {
            self.batch.push(t, i as i32, i + 1 == total)?;
        }
        if let Some(h) = &self.hook {
            h.arm(Plan { n_instr: instruction.len(), batch_len: total, n_ubatch: self.ctx.n_ubatch() });
        }
        let res = self.ctx.decode(&self.batch);
        if let Some(h) = &self.hook {
            match &res {
                Ok(()) => h.finish()?,
                Err(_) => h.disarm(),
            }
        }
        res?;
        self.pos = total;
        self.last_logits(total - 1)
    }

    fn last_logits(&self, i: usize) -> Result<Vec<f32>, LlamaError> {
        self.ctx
            .logits(i)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| LlamaError::Decode { code: 0, detail: format!("no logits for batch row {i}") })
    }

    /// Decodes one token at the next position (hook disarmed); returns its logits.
    pub fn step(&mut self, token: Token) -> Result<Vec<f32>, LlamaError> {
        self.check_tokens(&[token])?;
        if self.pos >= self.limit {
            return Err(LlamaError::Decode { code: 1, detail: format!("context of {} tokens is full", self.limit) });
        }
        self.batch.clear();
        self.batch.push(token, self.pos as i32, true)?;
        self.ctx.decode(&self.batch)?;
        self.pos += 1;
        self.last_logits(0)
    }

    /// Prefills `instruction` and generates up to `opts.n_predict` tokens, calling `on_token` for
    /// each as soon as it is chosen.
    pub fn generate(
        &mut self,
        instruction: &[Token],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(Token),
    ) -> Result<Generation, LlamaError> {
        let mut sampler = Sampler::new(opts.sampling);
        let mut out = Generation { prefill_tokens: instruction.len() + self.n_soft_tokens(), ..Generation::default() };
        if opts.n_predict == 0 {
            return Ok(out);
        }
        let t0 = Instant::now();
        let mut logits = self.prefill(instruction)?;
        out.prefill_time = t0.elapsed();
        out.hook_time = self.hook_busy_time();
        let t1 = Instant::now();
        loop {
            let tok = sampler.sample(&logits);
            if opts.keep_logits {
                out.logits.push(std::mem::take(&mut logits));
            }
            if opts.stop_at_eog && self.model.is_eog(tok) {
                out.stopped_at_eog = true;
                if opts.keep_logits {
                    out.logits.pop();
                }
                break;
            }
            out.tokens.push(tok);
            on_token(tok);
            if out.tokens.len() == opts.n_predict || self.pos >= self.limit {
                break;
            }
            logits = self.step(tok)?;
        }
        out.decode_time = t1.elapsed();
        Ok(out)
    }
}
