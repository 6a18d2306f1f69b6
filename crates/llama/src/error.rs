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
    /// The injection hook reported errors during a decode (the results were discarded).
    #[error("IAPT injection failed: {}", join(errors))]
    Hook {
        /// Every error the hook recorded, in order.
        errors: Vec<HookError>,
    },
    /// The CPU generator failed.
    #[error("IAPT generator: {0}")]
    Generator(#[from] iapt_generator::GeneratorError),
    /// The GPU generator failed (see [`iapt_generator_cuda::GpuError`]).
    #[error("IAPT GPU generator: {0}")]
    Gpu(#[from] iapt_generator_cuda::GpuError),
}

fn join(errors: &[HookError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
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

/// What the injection hook found wrong during one decode ([`crate::IaptHook`]); several may be
/// reported together in [`LlamaError::Hook`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// `finish` was called without `arm`.
    #[error("the hook was not armed")]
    NotArmed,
    /// A planned sequence names an adapter the hook does not hold.
    #[error("sequence {seq}: no adapter {adapter} (the hook holds {n_adapters})")]
    NoSuchAdapter {
        /// The sequence's index in the plan.
        seq: usize,
        /// The adapter index asked for.
        adapter: usize,
        /// Adapters the hook holds.
        n_adapters: usize,
    },
    /// A planned sequence is not where the layout requires (sequences follow each other without
    /// gaps, each with a non-empty instruction).
    #[error(
        "sequence {seq}: starts at row {row0} with {n_instr} instruction rows; expected a non-empty instruction at row {expected_row0}"
    )]
    PlanLayout {
        /// The sequence's index in the plan.
        seq: usize,
        /// Its first row.
        row0: usize,
        /// Its instruction rows.
        n_instr: usize,
        /// Where it should start.
        expected_row0: usize,
    },
    /// The planned sequences need more rows than the batch has (or `n_ubatch` is 0).
    #[error("the sequences need {needed} rows; the batch has {batch_len} (n_ubatch {n_ubatch})")]
    PlanTooLong {
        /// Rows the sequences need.
        needed: usize,
        /// Rows in the batch.
        batch_len: usize,
        /// The planned ubatch size.
        n_ubatch: usize,
    },
    /// Layer 0's input node never appeared: this llama.cpp names its nodes differently.
    #[error("node {node:?} (layer 0 input) never appeared in the graph: this llama.cpp names its nodes differently")]
    Layer0Missing {
        /// The node name looked for.
        node: String,
    },
    /// A layer's input node did not appear in a ubatch.
    #[error("ubatch {ubatch}: node {node:?} (layer {layer} input) never appeared")]
    LayerMissing {
        /// The ubatch.
        ubatch: usize,
        /// The node name looked for.
        node: String,
        /// The layer.
        layer: usize,
    },
    /// The ubatches seen do not cover the batch.
    #[error("saw ubatches covering {covered} of {batch_len} batch rows")]
    UbatchesIncomplete {
        /// Rows covered.
        covered: usize,
        /// Rows in the batch.
        batch_len: usize,
    },
    /// A ubatch started beyond the planned batch.
    #[error("a ubatch beyond the planned batch of {batch_len} rows")]
    BeyondBatch {
        /// Rows in the batch.
        batch_len: usize,
    },
    /// llama.cpp split the batch into ubatches other than planned.
    #[error("ubatch {ubatch} has {rows} rows but the plan expects {want} (batch {batch_len}, n_ubatch {n_ubatch}): llama.cpp split the batch differently")]
    UbatchRows {
        /// The ubatch.
        ubatch: usize,
        /// Its rows.
        rows: usize,
        /// Rows planned.
        want: usize,
        /// Rows in the batch.
        batch_len: usize,
        /// The planned ubatch size.
        n_ubatch: usize,
    },
    /// Layer inputs came out of order.
    #[error("layer {layer} input seen when layer {expected} was expected{}", ubatch.map(|u| format!(" (ubatch {u})")).unwrap_or_default())]
    LayerOrder {
        /// The ubatch (None before the first).
        ubatch: Option<usize>,
        /// The layer seen.
        layer: usize,
        /// The layer expected.
        expected: usize,
    },
    /// A layer input node has an unexpected shape.
    #[error("node {node} has shape {ne:?}, expected [{n_embd}, {rows}, 1, 1]")]
    NodeShape {
        /// The node's name.
        node: String,
        /// Its extents.
        ne: [i64; 4],
        /// Expected width.
        n_embd: usize,
        /// Expected rows (the ubatch's).
        rows: usize,
    },
    /// Reading or writing a node's rows failed.
    #[error("layer {layer}: {source}")]
    Node {
        /// The layer.
        layer: usize,
        /// What failed.
        source: NodeError,
    },
    /// A sequence's generator saw another number of instruction rows than planned.
    #[error("sequence {seq}, layer {layer}: {seen} instruction rows seen, expected {expected}")]
    RowsSeen {
        /// The sequence.
        seq: usize,
        /// The layer.
        layer: usize,
        /// Rows seen.
        seen: usize,
        /// Rows planned.
        expected: usize,
    },
    /// Not every soft row of a sequence was written at a layer.
    #[error("sequence {seq}, layer {layer}: {written} of {m} soft rows written")]
    SoftRowsMissing {
        /// The sequence.
        seq: usize,
        /// The layer.
        layer: usize,
        /// Rows written.
        written: usize,
        /// Soft tokens.
        m: usize,
    },
    /// The CPU generator failed for a sequence.
    #[error("sequence {seq}, layer {layer}: {source}")]
    Generator {
        /// The sequence.
        seq: usize,
        /// The layer.
        layer: usize,
        /// The generator's error.
        source: iapt_generator::GeneratorError,
    },
    /// The GPU generator failed (for a sequence, or synchronising a layer).
    #[error("{}layer {layer}: {source}", seq.map(|s| format!("sequence {s}, ")).unwrap_or_default())]
    Gpu {
        /// The sequence, if the failure belongs to one.
        seq: Option<usize>,
        /// The layer.
        layer: usize,
        /// The GPU generator's error.
        source: iapt_generator_cuda::GpuError,
    },
}
