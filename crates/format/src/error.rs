//! Errors of the format crate's operations (as opposed to validation findings, which are data).

use std::path::PathBuf;

use crate::dtype::DType;
use crate::report::Report;

/// An operation on an adapter file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid spec v1 adapter; the report lists every finding.
    #[error("{} is not a valid IAPT adapter:\n{report}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every finding.
        report: Report,
    },
    /// An optional metadata key was set that the config or a container owns.
    #[error("metadata key {key:?} is owned by the adapter config or the container; set it through the config instead")]
    ReservedKey {
        /// The key.
        key: String,
    },
    /// A tensor's byte length does not match its dtype and shape.
    #[error("tensor {name}: {bytes} bytes do not match dtype {dtype} x shape {shape:?}")]
    TensorSize {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<u64>,
        /// The byte length given.
        bytes: usize,
    },
}

/// A base model GGUF could not be used for the `--model`/`--base` check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaseModelError {
    /// The file cannot be opened or read.
    #[error("cannot read base model {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file (no GGUF magic); give the base model's .gguf file", path.display())]
    NotGguf {
        /// The file.
        path: PathBuf,
    },
    /// The file ends inside its header.
    #[error("{}: truncated base model: {detail}; copy or download it again", path.display())]
    TruncatedHeader {
        /// The file.
        path: PathBuf,
        /// Where it ends.
        detail: String,
    },
    /// The header is whole but the file is shorter than the tensor data it declares.
    #[error("{}: truncated base model: its tensor data ends at byte {needed} but the file has {len} bytes; copy or download it again", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The length the header declares (at least).
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// The GGUF header is malformed.
    #[error("{}: malformed GGUF header: {detail}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Every finding.
        detail: String,
    },
    /// `general.architecture` is missing or not a string.
    #[error("{} has no general.architecture string; is it a base model GGUF?", path.display())]
    NoArchitecture {
        /// The file.
        path: PathBuf,
    },
    /// `{arch}.block_count` or `{arch}.embedding_length` is missing, not an integer, or out of range.
    #[error("{} has no usable integer {key}: {why}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Missing, negative, or too large.
        why: &'static str,
    },
}

impl BaseModelError {
    /// Whether the file could not be read whole (missing, not permitted, an I/O error, or
    /// truncated), as opposed to readable content that is not a usable base model.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, BaseModelError::Io { .. } | BaseModelError::TruncatedHeader { .. } | BaseModelError::Truncated { .. })
    }
}
