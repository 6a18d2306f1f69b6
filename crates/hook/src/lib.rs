//! The IAPT injection hook, independent of any llama.cpp binding.
//!
//! Two hosts inject soft tokens into llama.cpp's forward pass: `iapt-engine` (through
//! `iapt-llama`'s safe wrapper over llama.cpp, behind every command of the `iapt` binary) and
//! `libiapt` (`iapt-capi`, the C library, which calls whatever llama.cpp/ggml the host application
//! loaded). Both use this crate's one hook, which sees graph nodes only through the small
//! [`LayerRows`] trait, so it links no llama.cpp itself.
//!
//! Modules: `arch` (which graph node holds each layer's input, per architecture: [`ArchSpec`],
//! [`ARCHS`], [`arch_spec`]), `stream` ([`StreamHook`]: several sequences per decode, each with its
//! own adapter, prompts prefilled in chunks over several decodes, generators on the CPU or on a GPU
//! runtime reading and writing device memory in place; [`Prefill`] the per-sequence pooling state,
//! [`Segment`] a sequence's rows in one decode), `device` ([`LayerRows`], how the hook reaches a
//! node's rows, and the in-place GPU calls: the crate's only `unsafe`), `error` ([`HookError`]),
//! `prefix` (the prefix cache both hosts keep: pooling snapshots and input rows by token prefix).
//!
//! ```
//! use iapt_hook::arch_spec;
//! let llama = arch_spec("llama").unwrap();
//! assert_eq!(llama.layer_input_node(2), "l_out-1");
//! assert_eq!(llama.layer_of("embd", 4), Some(0));
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod arch;
#[allow(unsafe_code)] // The one module with `unsafe`: node rows lent to the GPU generator in place.
mod device;
mod error;
pub mod prefix;
mod stream;
#[cfg(test)]
mod tests;

pub use arch::{arch_spec, supported_archs, ArchSpec, ARCHS};
pub use device::LayerRows;
pub use error::{HookError, NodeFailure};
pub use stream::{Claim, HookTimes, PoolKey, PoolSnapshot, Prefill, Segment, Split, StreamHook, SOFT_TOKEN_LIMIT};
