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
    /// The injection hook reported errors during a decode (the results were discarded).
    #[error("IAPT injection failed: {}", messages.join("; "))]
    Hook {
        /// Every message recorded by the hook.
        messages: Vec<String>,
    },
    /// The CPU generator failed.
    #[error("IAPT generator: {0}")]
    Generator(#[from] iapt_generator::GeneratorError),
    /// The GPU generator failed (see [`GpuError`]).
    #[error("IAPT GPU generator: {0}")]
    Gpu(#[from] GpuError),
}

/// The GPU generator ([`crate::GpuRuntime`]) failed. Every variant says what failed; the messages
/// say what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No CUDA device can be used (no driver library, no device, no NVRTC, ...).
    #[error("no usable CUDA device: {reason}")]
    CudaUnavailable {
        /// Why, with a hint.
        reason: String,
    },
    /// The emulator was asked for but this build does not include it.
    #[error("the GPU emulator is not compiled into this build; rebuild with the `gpu-emulation` feature of iapt-llama")]
    EmulationNotCompiled,
    /// A CUDA driver call failed.
    #[error("CUDA driver error while {op}: {detail}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// NVRTC could not compile the kernels (a bug in the kernel source or an NVRTC too old for the
    /// device).
    #[error("NVRTC could not compile the IAPT kernels for {arch}: {log}; update the CUDA NVRTC library, or report this with the log")]
    Compile {
        /// The target architecture, e.g. `compute_90`.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// The emulator failed to run a kernel.
    #[error("the GPU emulator could not run kernel {kernel} (code {code}); this is a bug")]
    Emulator {
        /// The kernel's name.
        kernel: &'static str,
        /// The launcher's return code.
        code: i32,
    },
    /// The adapter's shape is outside what the kernels support.
    #[error("adapter not supported by the GPU kernels: {detail}")]
    Unsupported {
        /// What is out of range.
        detail: String,
    },
    /// A required tensor is missing.
    #[error("adapter tensor {role} of layer {layer} is missing")]
    MissingTensor {
        /// The layer.
        layer: u32,
        /// The role.
        role: iapt_format::Role,
    },
    /// A tensor has the wrong shape.
    #[error("adapter tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<u64>,
        /// The stored shape.
        got: Vec<u64>,
    },
    /// A tensor's data cannot be read.
    #[error("cannot read adapter tensor {name}: {source}")]
    TensorRead {
        /// The tensor.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The layer index is out of range.
    #[error("layer {layer} is out of range (the adapter has {n_layer} layers)")]
    LayerOutOfRange {
        /// The index given.
        layer: usize,
        /// The adapter's layer count.
        n_layer: usize,
    },
    /// Host rows are not a whole number of rows.
    #[error("{len} values are not a whole number of rows of n_embd = {n_embd}")]
    RowsNotMultiple {
        /// Values given.
        len: usize,
        /// Row width.
        n_embd: usize,
    },
    /// Device rows have the wrong width.
    #[error("device rows have width {got}, but the adapter's n_embd is {n_embd}")]
    RowWidth {
        /// The rows' width.
        got: usize,
        /// The adapter's n_embd.
        n_embd: usize,
    },
    /// More rows than the kernels index (2^31 - 1 per layer and sequence).
    #[error("{rows} rows in one sequence and layer exceed the GPU generator's limit of {limit}; split the sequence")]
    TooManyRows {
        /// Rows that would have been fed.
        rows: usize,
        /// The limit.
        limit: usize,
    },
    /// The host output buffer has the wrong size.
    #[error("output holds {len} values, expected n_soft_tokens x n_embd = {expected}")]
    OutputSize {
        /// Values in the buffer.
        len: usize,
        /// m x d.
        expected: usize,
    },
    /// The device destination rows have the wrong shape.
    #[error("destination is {n_rows} rows of {n_embd}, expected {m} rows of {d} (one per soft token)")]
    OutputRows {
        /// Rows given.
        n_rows: usize,
        /// Width given.
        n_embd: usize,
        /// Soft tokens.
        m: usize,
        /// The adapter's n_embd.
        d: usize,
    },
    /// A row range is outside a [`crate::GpuRows`] buffer.
    #[error("rows {row0}..{end} are outside the buffer of {n_rows} rows")]
    RowRange {
        /// First row.
        row0: usize,
        /// One past the last row.
        end: usize,
        /// Rows in the buffer.
        n_rows: usize,
    },
    /// The adapter was uploaded by another runtime.
    #[error("the adapter was uploaded by another GPU runtime; upload it to this one")]
    ForeignAdapter,
    /// Rows allocated by another runtime (its memory may be of another kind).
    #[error("the rows were allocated by another GPU runtime; allocate them with this one")]
    ForeignRows,
    /// The state belongs to another adapter (or runtime).
    #[error("the sequence state was made for another adapter or runtime; make one with new_state for this adapter")]
    ForeignState,
    /// `finish` before any row was fed.
    #[error("no instruction rows were fed to layer {layer}; feed at least one row before finishing")]
    NoRows {
        /// The layer.
        layer: usize,
    },
    /// An instruction row produced a non-finite score (NaN or infinite hidden states). The
    /// state stays poisoned until [`crate::GpuRuntime::reset`].
    #[error("instruction row {row} at layer {layer} gives a non-finite pooling score (NaN or infinite hidden states); reset the state")]
    NonFiniteInput {
        /// The layer.
        layer: usize,
        /// The first bad row (index in the sequence).
        row: usize,
    },
    /// A device pointer is null or not aligned to 4 bytes.
    #[error("device pointer {ptr:#x} is null or not 4-byte aligned")]
    BadPointer {
        /// The pointer.
        ptr: u64,
    },
    /// A device pointer belongs to another device than the runtime's.
    #[error("device pointer {ptr:#x} belongs to CUDA device {ptr_device}, but this runtime runs on device {runtime_device}; open the runtime on the model's device")]
    WrongDevice {
        /// The pointer.
        ptr: u64,
        /// The pointer's device ordinal.
        ptr_device: i32,
        /// The runtime's ordinal.
        runtime_device: usize,
    },
    /// A device pointer is not device memory the driver knows, or the rows run past its allocation.
    #[error("device pointer {ptr:#x} (+{bytes} bytes) is not inside one device allocation: {detail}")]
    NotDeviceMemory {
        /// The pointer.
        ptr: u64,
        /// Bytes to be accessed.
        bytes: usize,
        /// What the driver said.
        detail: String,
    },
    /// A benchmark setting is invalid.
    #[error("invalid GPU benchmark setting: {detail}")]
    BenchConfig {
        /// What is wrong.
        detail: String,
    },
}
