//! The generator's error type: one variant per way building or running a generator can fail.

use iapt_format::Role;

/// Building or running a generator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    /// The adapter has no tensor (neither per-layer nor shared) for a required role. A validated
    /// [`iapt_format::Adapter`] always has one; this guards adapters built by other means.
    #[error("layer {layer}: the adapter has no {role} tensor (per-layer or shared); re-convert the adapter")]
    MissingTensor {
        /// The layer.
        layer: u32,
        /// The missing role.
        role: Role,
    },
    /// A tensor's shape differs from what the adapter's config requires.
    #[error("tensor {name}: shape {got:?}, but the config requires {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The required shape.
        expected: Vec<u64>,
        /// The tensor's shape.
        got: Vec<u64>,
    },
    /// A tensor's data could not be read from the adapter file.
    #[error("tensor {name}: cannot read its data: {source}")]
    TensorRead {
        /// The tensor's name.
        name: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config's sizes do not fit this machine's address space.
    #[error("the adapter's sizes overflow this machine's address space")]
    TooLarge,
    /// A layer index at or beyond `n_layer`.
    #[error("layer {layer} does not exist; the adapter has layers 0..{n_layer}")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// The adapter's layer count.
        n_layer: usize,
    },
    /// An input slice whose length is not a multiple of `n_embd`.
    #[error("{len} input values are not a whole number of rows of n_embd = {n_embd}")]
    RowsNotMultiple {
        /// The slice length.
        len: usize,
        /// The row width.
        n_embd: usize,
    },
    /// An output slice of the wrong length.
    #[error("the output holds {len} values but n_soft_tokens x n_embd = {expected} are needed")]
    OutputSize {
        /// The slice length.
        len: usize,
        /// The required length.
        expected: usize,
    },
    /// Soft tokens were asked for before any instruction row was seen (the softmax over zero rows is
    /// undefined).
    #[error("no instruction rows were given; the soft tokens need at least one row")]
    NoRows,
    /// An input row holds NaN or infinity, or values so large that its attention scores overflow
    /// f32 (detected through the scores); the state is left as it was before the call.
    #[error("instruction row {row} holds NaN or infinite values (or values so large that its attention scores overflow)")]
    NonFiniteInput {
        /// Index of the first offending row within the rows passed to the call.
        row: usize,
    },
    /// A [`crate::LayerState`] was used with a generator other than the one that began it.
    #[error("this streaming state was begun by a different generator (or with a different strategy)")]
    ForeignState,
    /// A number of threads of zero.
    #[error("the number of threads must be at least 1")]
    ZeroThreads,
}
