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
    /// The text holds a character the model's vocabulary cannot encode (a vocabulary without byte
    /// fallback): llama.cpp's tokenizer threw, and the shim caught it.
    #[error("{}: the model's vocabulary cannot encode it (it has no byte fallback); remove or replace that character, or send token ids", match (character, byte_offset) { (Some(c), Some(i)) => format!("the text holds the character {c:?} (U+{:04X}) at byte {i}", u32::from(*c)), _ => "the text holds a character".to_owned() })]
    Unencodable {
        /// The first character found that the vocabulary cannot encode alone, if found.
        character: Option<char>,
        /// Its byte offset in the text.
        byte_offset: Option<usize>,
    },
    /// llama.cpp's sampler chain failed (it threw; the shim caught it).
    #[error("the sampler chain failed: {detail}")]
    Sampler {
        /// What llama.cpp said.
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
    #[error("prompt of {n_tokens} tokens plus {n_soft} soft tokens needs {needed} positions and does not fit the context of {n_ctx} tokens; use a shorter prompt or a --ctx-size of at least {needed}", needed = .n_tokens + .n_soft)]
    PromptTooLong {
        /// Prompt tokens (without the soft tokens).
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
    /// An RPC worker address is malformed.
    #[error("RPC worker {endpoint:?}: {why}")]
    RpcEndpoint {
        /// The address as given.
        endpoint: String,
        /// What is wrong with it.
        why: String,
    },
    /// An RPC worker cannot be reached (or reports no device).
    #[error("cannot reach the RPC worker at {endpoint}: is `iapt rpc-server` running there, and is the port right?")]
    RpcUnreachable {
        /// The address.
        endpoint: String,
    },
    /// An RPC worker could not start serving.
    #[error("the RPC worker at {endpoint} could not serve: {why}")]
    RpcServe {
        /// The address it was to listen on.
        endpoint: String,
        /// Why.
        why: String,
    },
    /// The CPU generator failed.
    #[error("IAPT generator: {0}")]
    Generator(#[from] iapt_generator::GeneratorError),
    /// The GPU generator failed (see [`iapt_generator_cuda::GpuError`]).
    #[error("IAPT GPU generator: {0}")]
    Gpu(#[from] iapt_generator_cuda::GpuError),
}

/// A graph node's rows cannot be accessed as asked ([`crate::NodeData`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The node is not f32 with rows packed one after another in all four dimensions.
    #[error("node {node} is not f32 with densely packed rows (ne {ne:?}, nb {nb:?})")]
    NotDenseF32 {
        /// The node's name.
        node: String,
        /// ggml's extents.
        ne: [i64; 4],
        /// ggml's byte strides.
        nb: [usize; 4],
    },
    /// The node has no data buffer (not allocated by the scheduler).
    #[error("node {node} has no data buffer")]
    NoData {
        /// The node's name.
        node: String,
    },
    /// The values asked for are not a whole number of rows.
    #[error("node {node}: {values} values are not whole rows of {n_embd}")]
    NotWholeRows {
        /// The node's name.
        node: String,
        /// Values asked for.
        values: usize,
        /// Row width.
        n_embd: usize,
    },
    /// The node's data is not in host memory, so its rows cannot be viewed in place.
    #[error("node {node} is not in host memory (read its rows with a copy instead)")]
    NotHostMemory {
        /// The node's name.
        node: String,
    },
    /// The rows asked for are outside the node.
    #[error("node {node}: rows {row0}..{row0}+{n} are outside its {rows} rows")]
    RowsOutOfRange {
        /// The node's name.
        node: String,
        /// First row asked for.
        row0: usize,
        /// Rows asked for.
        n: usize,
        /// Rows the node has.
        rows: usize,
    },
}
