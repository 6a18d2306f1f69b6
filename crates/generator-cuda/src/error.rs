//! The crate's error type: one variant per way the GPU generator can fail.

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
    #[error("the GPU emulator is not compiled into this build; rebuild with the `emulation` feature of iapt-generator-cuda (`gpu-emulation` of iapt-llama)")]
    EmulationNotCompiled,
    /// CUDA was asked for but this build has no CUDA backend (a CPU-only build).
    #[error("this build has no CUDA generator (CPU-only build); rebuild with `--features cuda` (llama.cpp and the generator on CUDA) or `--features gpu-generator` (the generator alone)")]
    CudaNotCompiled,
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
