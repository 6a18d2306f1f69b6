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
