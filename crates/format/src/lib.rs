//! The IAPT adapter format, spec v1: the typed configuration, reading both containers (detected by
//! content), writing both byte-canonically, lossless conversion between them, and validation that
//! reports every finding with its stable code.
//!
//! The normative spec is `spec/iapt-v1.md` in the repository; its sections map onto this crate:
//! metadata keys -> [`AdapterConfig`] and [`keys`], tensor names -> [`TensorName`] and [`Role`],
//! validation rules -> [`Code`].
//!
//! ```no_run
//! use iapt_format::{Adapter, Container, Role};
//!
//! let adapter = Adapter::open("adapter.safetensors")?;
//! println!("{} layers, {} parameters", adapter.config().n_layer, adapter.param_count());
//! let w_down = adapter.tensor(0, Role::DownWeight).expect("required").to_f32()?;
//! adapter.save("adapter.gguf", Container::Gguf)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod adapter;
mod config;
mod container;
mod dtype;
mod error;
pub mod fingerprint;
mod meta;
mod names;
pub mod raw;
mod report;
pub mod rng;
pub mod temp;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod validate;

pub use adapter::{validate_bytes, validate_file, validate_opened, write_atomically, Adapter, Tensor, Validation};
pub use config::{
    is_arch_name, keys, Activation, AdapterConfig, Container, Metadata, RationalConfig, RationalVariant, SpecVersion, KNOWN_OPTIONAL_KEYS,
    MAX_N_LAYER, MAX_RATIONAL_DEGREE, MAX_SOFT_TOKENS, MAX_WIDTH, SPEC_MAJOR, SPEC_MINOR,
};
pub use container::{
    sniff, GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, MAX_BASE_MODEL_TENSORS, MAX_HEADER_BYTES, MAX_KEYS, MAX_STRING_BYTES, MAX_TENSORS,
};
pub use dtype::{DType, Q8_BLOCK, Q8_BLOCK_BYTES};
pub use error::{BaseModelError, FormatError};
pub use meta::{MetaType, MetaValue, META_TYPES_KEY};
pub use names::{Role, Scope, TensorName};
pub use report::{Code, Finding, Report, Severity};
pub use validate::{BaseModelInfo, MAX_WEIGHT_ABS};
