//! What the injection hook found wrong during one decode ([`crate::StreamHook::finish`]): one
//! variant per failure. Several may be reported for one decode.

use iapt_generator::GeneratorError;
use iapt_generator_cuda::GpuError;

/// Why reading or writing a node's rows failed, as the node type reports it ([`crate::LayerRows`]).
pub type NodeFailure = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure of the hook during one decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// `finish` was called without `arm`.
    #[error("the hook was not armed")]
    NotArmed,
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
    /// A ubatch started beyond the armed batch.
    #[error("a ubatch beyond the armed batch of {batch_len} rows")]
    BeyondBatch {
        /// Rows in the batch.
        batch_len: usize,
    },
    /// llama.cpp split the batch into ubatches other than the hook expects (contiguous, in batch
    /// order, `n_ubatch` rows each but the last).
    #[error("ubatch {ubatch} has {rows} rows but the hook expects {want} (batch {batch_len}, n_ubatch {n_ubatch}): llama.cpp split the batch differently")]
    UbatchRows {
        /// The ubatch.
        ubatch: usize,
        /// Its rows.
        rows: usize,
        /// Rows expected.
        want: usize,
        /// Rows in the batch.
        batch_len: usize,
        /// The ubatch size.
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
        source: NodeFailure,
    },
    /// A sequence's generator had seen another number of instruction rows than its prompt has
    /// when its soft slots came.
    #[error("segment {seg}, layer {layer}: {seen} instruction rows seen before the soft slots, expected {expected}")]
    RowsSeen {
        /// The segment (index in the armed order).
        seg: usize,
        /// The layer.
        layer: usize,
        /// Rows seen.
        seen: usize,
        /// The instruction's rows.
        expected: usize,
    },
    /// A segment runs past its sequence's soft slots.
    #[error("segment {seg}: positions {first}..{end} run past the prompt's {total} rows (instruction and soft slots)")]
    PastPrompt {
        /// The segment.
        seg: usize,
        /// Its first position.
        first: usize,
        /// Its end position.
        end: usize,
        /// Instruction rows plus soft slots.
        total: usize,
    },
    /// Not every row of a segment was handled at a layer (fed or written).
    #[error("segment {seg}, layer {layer}: {handled} of {len} rows handled")]
    RowsMissing {
        /// The segment.
        seg: usize,
        /// The layer.
        layer: usize,
        /// Rows handled.
        handled: usize,
        /// Rows in the segment.
        len: usize,
    },
    /// The CPU generator failed for a segment.
    #[error("segment {seg}, layer {layer}: {source}")]
    Generator {
        /// The segment.
        seg: usize,
        /// The layer.
        layer: usize,
        /// The generator's error.
        source: GeneratorError,
    },
    /// The GPU generator failed (for a segment, or synchronising a layer).
    #[error("{}layer {layer}: {source}", seg.map(|s| format!("segment {s}, ")).unwrap_or_default())]
    Gpu {
        /// The segment, if the failure belongs to one.
        seg: Option<usize>,
        /// The layer.
        layer: usize,
        /// The GPU generator's error.
        source: GpuError,
    },
    /// A segment's soft tokens are not finite (NaN or infinite): its adapter's weights overflow
    /// f32 on this instruction. Only that sequence is affected.
    #[error("segment {seg}, layer {layer}: the adapter produced a soft token that is not finite (NaN or infinite)")]
    NonFinite {
        /// The segment.
        seg: usize,
        /// The layer.
        layer: usize,
    },
}

impl HookError {
    /// The segment (index in the armed order) this error belongs to, when it belongs to one
    /// alone: the caller may then fail that sequence only. `None` for failures of the whole decode.
    pub fn segment(&self) -> Option<usize> {
        match self {
            HookError::RowsSeen { seg, .. }
            | HookError::PastPrompt { seg, .. }
            | HookError::RowsMissing { seg, .. }
            | HookError::Generator { seg, .. }
            | HookError::NonFinite { seg, .. } => Some(*seg),
            HookError::Gpu { seg, .. } => *seg,
            _ => None,
        }
    }
}
