//! Unvalidated writers for arbitrary tensor sets and metadata in either container, and the
//! structural safetensors header parser on its own. Tools and tests use the writers to make files
//! that break spec rules on purpose (one broken file per rule); adapters are written through
//! [`crate::Adapter::save`], which validates first. The converter reads checkpoints' safetensors
//! headers with [`parse_safetensors_header`], the same parser adapters are read with.

use crate::container::{gguf, safetensors, GGUF_DEFAULT_ALIGNMENT};
pub use crate::container::{RawFile, RawTensor};
use crate::meta::MetaValue;
use crate::report::Report;

/// Parses a safetensors header structurally (lengths, dtypes, shapes, offsets that tile the data
/// exactly, duplicates, [`crate::MAX_HEADER_BYTES`] and [`crate::MAX_TENSORS`]), no spec rule
/// applied. `head` holds the first `8 + N` bytes of a file of `file_len` bytes (or all of it).
/// Every problem found is in the returned report; `Err` when it holds an error.
pub fn parse_safetensors_header(head: &[u8], file_len: u64) -> Result<RawFile, Report> {
    let mut report = Report::default();
    match safetensors::parse(head, file_len, &mut report) {
        Some(raw) if !report.has_errors() => Ok(raw),
        _ => Err(report),
    }
}

/// A tensor to write as-is.
#[derive(Debug, Clone)]
pub struct RawTensorOut {
    /// Any name.
    pub name: String,
    /// Row-major shape (GGUF stores it reversed).
    pub shape: Vec<u64>,
    /// The container's dtype: a ggml type id for GGUF (0 F32, 1 F16, 30 BF16, ...), and for
    /// safetensors the dtype string of [`RawTensorOut::st_dtype`].
    pub ggml_type: u32,
    /// The safetensors dtype string (`"F32"`, `"F64"`, ...).
    pub st_dtype: String,
    /// The data bytes (written as given, whatever shape and dtype say).
    pub data: Vec<u8>,
}

/// Writes a GGUF v3 file with exactly these keys (in order) and tensors, data padded to 32 bytes.
pub fn write_gguf(metadata: &[(String, MetaValue)], tensors: &[RawTensorOut]) -> Vec<u8> {
    let infos: Vec<gguf::WriteTensor<'_>> = tensors
        .iter()
        .map(|t| gguf::WriteTensor { name: t.name.clone(), shape: &t.shape, ggml_type: t.ggml_type, len: t.data.len() as u64 })
        .collect();
    let (mut out, _) = gguf::header(metadata, &infos);
    let a = GGUF_DEFAULT_ALIGNMENT as usize;
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len() + (a - t.data.len() % a) % a, 0);
    }
    out
}

/// Writes a safetensors file with exactly these string metadata entries and tensors, data
/// contiguous in the order given.
pub fn write_safetensors(metadata: &[(String, String)], tensors: &[RawTensorOut]) -> Vec<u8> {
    let infos: Vec<safetensors::WriteTensor<'_>> = tensors
        .iter()
        .map(|t| safetensors::WriteTensor {
            name: t.name.clone(),
            shape: std::borrow::Cow::Borrowed(&t.shape),
            dtype: &t.st_dtype,
            len: t.data.len() as u64,
        })
        .collect();
    let mut out = safetensors::header(metadata, &infos);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}
