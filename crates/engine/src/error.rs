//! The engine's error type: one variant per way a request, an adapter operation or a step can fail.

use std::path::PathBuf;

use iapt_llama::{InvalidSampling, LlamaError};

/// A request, an adapter operation or an engine step failed. Bad input is always one of these,
/// never a panic or an abort inside llama.cpp.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine settings are inconsistent.
    #[error("invalid engine setting: {detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// A request or an unload names an adapter the registry does not hold.
    #[error("unknown adapter {name:?} (loaded: {loaded})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names loaded, comma-separated.
        loaded: String,
    },
    /// The resident set is at its limit and nothing can be evicted (every other adapter is
    /// pinned or in use by a queued request or a prefill).
    #[error("no room to make adapter {name:?} resident: {detail}")]
    AdapterCacheFull {
        /// The adapter that did not fit.
        name: String,
        /// The limits and what it needs.
        detail: String,
    },
    /// An adapter with this name is already loaded.
    #[error("an adapter named {name:?} is already loaded; unload it first or pick another name")]
    AdapterExists {
        /// The name.
        name: String,
    },
    /// The adapter name is empty or has characters outside `[A-Za-z0-9._-]`.
    #[error("adapter name {name:?} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    BadAdapterName {
        /// The name.
        name: String,
    },
    /// An adapter file cannot be read or breaks the spec (the spec's codes are in `detail`).
    #[error("{}: not a valid IAPT adapter: {detail}", path.display())]
    AdapterFile {
        /// The file.
        path: PathBuf,
        /// The reason, with the spec codes.
        detail: String,
    },
    /// An adapter does not fit the base model (the spec's codes are in `detail`).
    #[error("adapter {name:?} does not fit the base model: {detail}")]
    AdapterRejected {
        /// The adapter's name.
        name: String,
        /// The mismatches, with the spec codes.
        detail: String,
    },
    /// The prompt is empty: IAPT needs at least one instruction token.
    #[error("the prompt is empty; IAPT needs at least one instruction token")]
    EmptyPrompt,
    /// A prompt token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {n_vocab} tokens")]
    TokenOutOfVocab {
        /// The id.
        token: i32,
        /// The vocabulary size.
        n_vocab: usize,
    },
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    MaxTokensZero,
    /// The request can never fit a sequence's context: prompt + soft tokens + max_tokens exceeds it.
    #[error("prompt of {n_prompt} tokens + {n_soft} soft tokens + max_tokens {max_tokens} exceeds the per-sequence context of {seq_ctx} tokens; shorten the prompt or lower max_tokens")]
    TooLong {
        /// Prompt tokens.
        n_prompt: usize,
        /// The adapter's soft tokens.
        n_soft: usize,
        /// Tokens asked for.
        max_tokens: usize,
        /// The per-sequence context.
        seq_ctx: usize,
    },
    /// A sampling setting breaks its rule.
    #[error(transparent)]
    Sampling(#[from] InvalidSampling),
    /// More top log-probabilities asked for than allowed.
    #[error("logprobs = {n}: at most {max} top log-probabilities per token")]
    TooManyLogprobs {
        /// Asked for.
        n: usize,
        /// The limit.
        max: usize,
    },
    /// More choices than the engine has sequence slots (they all run at once).
    #[error("n = {n} choices need as many sequence slots at once; this engine runs {parallel} (--parallel)")]
    TooManyChoices {
        /// Choices asked for.
        n: usize,
        /// Sequence slots.
        parallel: usize,
    },
    /// The prefill this choice shares with the request's first choice failed (the first choice
    /// reports why).
    #[error("the shared prefill failed: {detail}")]
    SharedPrefillFailed {
        /// The first choice's error.
        detail: String,
    },
    /// The requested structure cannot be compiled (a schema that is not JSON, or that llguidance
    /// does not support).
    #[error("cannot constrain the output to this schema: {detail}")]
    BadSchema {
        /// Why.
        detail: String,
    },
    /// The constrained decoder failed mid-answer (no token could continue the document).
    #[error("structured output failed: {detail}")]
    Constraint {
        /// Why.
        detail: String,
    },
    /// A stop string is empty.
    #[error("stop strings must not be empty")]
    EmptyStop,
    /// The admission queue is full.
    #[error("the queue is full ({capacity} requests waiting); retry later")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The sampler chain selected no token (every candidate was filtered out).
    #[error("the sampler chain selected no token")]
    NothingSampled,
    /// The request's adapter failed on its prompt (its soft tokens overflowed, its generator
    /// failed); the sequence was dropped and its KV cells cleared. Other requests are unaffected.
    #[error("adapter {adapter:?} failed on this prompt: {reason}")]
    AdapterFailed {
        /// The adapter's name.
        adapter: String,
        /// What went wrong, without internals.
        reason: String,
    },
    /// Injecting the adapters failed for the whole decode (llama.cpp's graph did not look as the
    /// hook expects); the sequences in prefill in it were dropped.
    #[error("IAPT injection failed: {detail}")]
    Injection {
        /// The hook's errors.
        detail: String,
    },
    /// The decode holding this sequence failed; the sequence was dropped (its cells freed).
    #[error("decode failed: {detail}")]
    DecodeFailed {
        /// llama.cpp's reason.
        detail: String,
    },
    /// llama.cpp failed (model, context, decode).
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// The CPU generator could not be built for an adapter.
    #[error("IAPT generator: {0}")]
    Generator(#[from] iapt_generator::GeneratorError),
    /// The GPU generator failed (uploading an adapter, allocating a sequence's device state).
    #[error("IAPT GPU generator: {0}")]
    Gpu(#[from] iapt_generator_cuda::GpuError),
    /// [`crate::Engine::complete`] needs an idle engine.
    #[error("the engine is busy ({running} running, {queued} queued): run one request at a time with complete()")]
    Busy {
        /// Requests running.
        running: usize,
        /// Requests queued.
        queued: usize,
    },
    /// The engine thread panicked (a bug) while this request was in flight; the engine stopped.
    #[error("{detail}; the server must be restarted")]
    Panicked {
        /// What the panic said.
        detail: String,
    },
    /// The engine thread has stopped ([`crate::EngineHandle`]).
    #[error("the engine thread has stopped")]
    Stopped,
}
