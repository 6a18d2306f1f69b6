//! The crate's error type: one variant per way running a model with an adapter can fail.

use std::path::PathBuf;

/// Running llama.cpp (with or without an IAPT adapter) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlamaError {
    /// A path cannot be passed to llama.cpp (not UTF-8, or contains NUL).
    #[error("{}: path must be UTF-8 without NUL bytes", path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
    },
    /// llama.cpp's GGUF parser rejected a file.
    #[error("{}: llama.cpp's GGUF parser rejected the file: {detail}", path.display())]
    GgufRejected {
        /// The file.
        path: PathBuf,
        /// llama.cpp's error lines.
        detail: String,
    },
    /// llama.cpp could not load a model.
    #[error("{}: cannot load the model: {detail}", path.display())]
    ModelLoad {
        /// The model file.
        path: PathBuf,
        /// llama.cpp's reason.
        detail: String,
    },
    /// llama.cpp could not create an inference context.
    #[error("cannot create a llama.cpp context: {detail}")]
    ContextInit {
        /// llama.cpp's reason.
        detail: String,
    },
    /// Tokenization failed.
    #[error("cannot tokenize the prompt: {detail}")]
    Tokenize {
        /// Why.
        detail: String,
    },
    /// The chat template cannot be applied.
    #[error("cannot apply the chat template: {detail}")]
    ChatTemplate {
        /// Why.
        detail: String,
    },
    /// `llama_decode` failed.
    #[error("llama_decode failed (code {code}): {detail}")]
    Decode {
        /// llama.cpp's return code.
        code: i32,
        /// llama.cpp's reason.
        detail: String,
    },
    /// The evaluation callback panicked (a bug); the decode's results are not usable.
    #[error("the IAPT evaluation callback panicked; the decode was discarded")]
    CallbackPanicked,
    /// More tokens were pushed than the batch holds.
    #[error("batch is full ({capacity} tokens)")]
    BatchFull {
        /// The batch capacity.
        capacity: usize,
    },
    /// `llama_model_quantize` failed.
    #[error("{}: quantization failed: {detail}", path.display())]
    Quantize {
        /// The source model.
        path: PathBuf,
        /// llama.cpp's reason.
        detail: String,
    },
    /// The base model's architecture is not in the hook's table.
    #[error("architecture {arch:?} is not supported by the IAPT hook (supported: {supported})")]
    UnsupportedArch {
        /// The model's `general.architecture`.
        arch: String,
        /// The supported names, comma-separated.
        supported: String,
    },
    /// The adapter does not fit the base model.
    #[error("adapter does not match the base model: {detail}")]
    Incompatible {
        /// Every mismatch, joined.
        detail: String,
    },
    /// The prompt (plus soft tokens) does not fit the context.
    #[error("prompt of {n_tokens} tokens (including {n_soft} soft tokens) does not fit the context of {n_ctx} tokens; use a shorter prompt or a larger --ctx-size")]
    PromptTooLong {
        /// Prompt tokens.
        n_tokens: usize,
        /// Soft tokens added.
        n_soft: usize,
        /// Context size.
        n_ctx: usize,
    },
    /// A batched prefill has more sequences than the context was created for.
    #[error("{n_seqs} sequences in one batch, but the context holds at most {n_seq_max}; raise n_seq_max (--parallel)")]
    TooManySequences {
        /// Sequences asked for.
        n_seqs: usize,
        /// The context's limit.
        n_seq_max: usize,
    },
    /// A request names an adapter the session does not hold.
    #[error("no adapter {index}: the session holds {n_adapters} adapter(s), numbered from 0 in the order given")]
    NoSuchAdapter {
        /// The index asked for.
        index: usize,
        /// Adapters held.
        n_adapters: usize,
    },
    /// The prompt is empty (IAPT needs at least one instruction token).
    #[error("the prompt is empty; IAPT needs at least one instruction token")]
    EmptyPrompt,
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {n_vocab} tokens")]
    BadToken {
        /// The id.
        token: i32,
        /// The vocabulary size.
        n_vocab: usize,
    },
    /// The injection hook reported errors during a decode (the results were discarded).
    #[error("IAPT injection failed: {}", messages.join("; "))]
    Hook {
        /// Every message recorded by the hook.
        messages: Vec<String>,
    },
    /// The CPU generator failed.
    #[error("IAPT generator: {0}")]
    Generator(#[from] iapt_generator::GeneratorError),
}
