//! The IAPT injection hook, independent of any llama.cpp binding.
//!
//! Two hosts inject soft tokens into llama.cpp's forward pass: `iapt-llama` (through
//! `llama-cpp-sys-2`, used by the `iapt` binary and the engine) and `libiapt` (`iapt-capi`, the C
//! library, which calls whatever llama.cpp/ggml the host application loaded). Both use this crate's
//! one hook, which sees graph nodes only through the small [`LayerRows`] trait, so it links no
//! llama.cpp itself.
//!
//! Modules: `arch` (which graph node holds each layer's input, per architecture: [`ArchSpec`],
//! [`ARCHS`], [`arch_spec`]), `stream` ([`StreamHook`]: several sequences per decode, each with its
//! own adapter, prompts prefilled in chunks over several decodes; [`Prefill`] the per-sequence
//! pooling state, [`Segment`] a sequence's rows in one decode).
//!
//! ```
//! use iapt_hook::arch_spec;
//! let llama = arch_spec("llama").unwrap();
//! assert_eq!(llama.layer_input_node(2), "l_out-1");
//! assert_eq!(llama.layer_of("embd", 4), Some(0));
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod arch;
mod stream;

pub use arch::{arch_spec, supported_archs, ArchSpec, ARCHS};
pub use stream::{LayerRows, Prefill, Segment, StreamHook};
