//! What goes into the engine (a [`Request`]) and what comes out of it ([`Event`]s).

use std::time::Duration;

use iapt_llama::{SamplerSettings, Token};

use crate::error::EngineError;

/// The most top log-probabilities a request may ask for per token (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The resident adapter to run with (by name), or `None` for the base model alone.
    pub adapter: Option<String>,
    /// The instruction tokens (BOS and chat-template tokens included); the adapter's soft tokens
    /// follow them.
    pub prompt: Vec<Token>,
    /// Tokens to generate at most (>= 1).
    pub max_tokens: usize,
    /// The sampler chain's settings (greedy by default).
    pub sampling: SamplerSettings,
    /// Stop strings: generation ends where one appears in the output (matched across token
    /// boundaries); the stop string and what follows are not emitted.
    pub stop: Vec<String>,
    /// End at an end-of-generation token (not emitted). Default true.
    pub stop_at_eog: bool,
    /// With `Some(n)`, each token comes with its log-probability and the n most likely tokens'
    /// (log-softmax of the raw logits row, before any sampler stage); n <= [`MAX_LOGPROBS`].
    pub logprobs: Option<usize>,
    /// Each token comes with the whole logits row it was drawn from ([`TokenOut::logits`]):
    /// for `iapt run --dump-logits` and parity tests.
    pub logits: bool,
    /// Choices: sequences that share this request's prefill (>= 1). The prompt and the soft
    /// tokens are decoded once; when that prefill ends its KV cells are copied to the other
    /// choices' sequences (llama.cpp's `seq_cp`), and each draws from the same last logits row
    /// with its own sampler chain, seeded `sampling.seed + i` for choice `i`. Choice `i` has the
    /// id `SeqId(first.0 + i)`, where `first` is what [`crate::Engine::submit`] returns; every
    /// choice ends with its own `Done` or `Failed` event.
    pub n: usize,
    /// Constrain the output to JSON ([`crate::Structured`]); `None`: free text.
    pub structured: Option<crate::Structured>,
}

impl Request {
    /// A greedy request without adapter, stopping at end-of-generation tokens.
    pub fn new(prompt: Vec<Token>, max_tokens: usize) -> Request {
        Request {
            adapter: None,
            prompt,
            max_tokens,
            sampling: SamplerSettings::default(),
            stop: Vec::new(),
            stop_at_eog: true,
            logprobs: None,
            logits: false,
            n: 1,
            structured: None,
        }
    }

    /// The same request with adapter `name`.
    pub fn with_adapter(mut self, name: impl Into<String>) -> Request {
        self.adapter = Some(name.into());
        self
    }
}

/// The engine's id of a submitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}

/// Something that happened to a request during a step.
#[derive(Debug)]
pub struct Event {
    /// The request.
    pub id: SeqId,
    /// What happened.
    pub kind: EventKind,
}

/// See [`Event`].
#[derive(Debug)]
pub enum EventKind {
    /// A token was generated.
    Token(TokenOut),
    /// The request ended normally; its KV cells are already free.
    Done(Finished),
    /// The request failed (its KV cells are already free).
    Failed(EngineError),
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    /// The token.
    pub token: Token,
    /// Output text released with this token: its bytes, minus what is held back because it may
    /// start a stop string, plus earlier held bytes that no longer can. Bytes, not UTF-8: a
    /// character may span tokens.
    pub text: Vec<u8>,
    /// Its log-probability (when asked for).
    pub logprob: Option<f32>,
    /// The most likely tokens and their log-probabilities (when asked for).
    pub top_logprobs: Vec<(Token, f32)>,
    /// The raw logits row the token was drawn from (when asked for, [`Request::logits`]).
    pub logits: Option<Vec<f32>>,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Why.
    pub reason: FinishReason,
    /// The last output bytes (held back until now), not part of any [`TokenOut`].
    pub text: Vec<u8>,
    /// Prompt tokens.
    pub n_prompt: usize,
    /// Soft tokens of the adapter (0 without).
    pub n_soft: usize,
    /// Tokens generated (end-of-generation tokens excluded, stop-string tokens included).
    pub n_generated: usize,
    /// Prompt tokens reused from the prefix cache instead of computed (OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`).
    pub n_cached: usize,
    /// Wall time of the steps that held this request's prefill rows (shared with whatever else
    /// those steps decoded).
    pub prefill_time: Duration,
    /// Wall time of the steps that held its decode tokens.
    pub decode_time: Duration,
}

/// One request run to its end ([`crate::Engine::complete`]).
#[derive(Debug)]
pub struct Completion {
    /// Every token, in order.
    pub tokens: Vec<TokenOut>,
    /// How it ended.
    pub finished: Finished,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Eog,
    /// Stop string `index` of the request.
    Stop {
        /// Its index in [`Request::stop`].
        index: usize,
    },
    /// `max_tokens` reached.
    Length,
}
