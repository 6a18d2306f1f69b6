//! Structural parsing of both containers into one raw form ([`RawFile`]), content sniffing, and
//! the byte-exact writers. Parsing here checks structure only (lengths, offsets, alignment, limits);
//! spec rules on names, shapes and values live in `validate`.

pub(crate) mod gguf;
pub(crate) mod safetensors;

pub(crate) use safetensors::Q8_SCALE_SUFFIX;

use crate::config::{Container, Metadata};
use crate::dtype::DType;
use crate::error::BaseModelError;
use crate::report::{Code, Finding, Report};

/// Largest header (safetensors JSON, or GGUF metadata + tensor infos) accepted: 100 MiB, as the
/// safetensors reference implementation's `MAX_HEADER_SIZE`.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Largest number of tensors accepted in one adapter file: 2^15 = 32768, above the most a valid
/// adapter can hold (7 roles x ([`crate::MAX_N_LAYER`] layers + 1 shared) = 28679), so that a file
/// declaring hundreds of thousands of tensors is refused before any per-tensor work.
pub const MAX_TENSORS: u64 = 1 << 15;
/// Largest number of tensors accepted in a base model GGUF (only its header is read): 2^20.
pub const MAX_BASE_MODEL_TENSORS: u64 = 1 << 20;
/// Largest number of metadata keys accepted in one file.
pub const MAX_KEYS: u64 = 1 << 16;
/// Longest key or string accepted (bytes).
pub const MAX_STRING_BYTES: u64 = 1 << 24;
/// GGUF alignment when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// The GGUF container version this crate reads and writes.
pub const GGUF_VERSION: u32 = 3;

/// One tensor as the container describes it, before any spec rule is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// The name as stored.
    pub name: String,
    /// The dtype, if it is one the spec allows (a safetensors Q8_0 pair is joined into one).
    pub dtype: Option<DType>,
    /// The container's own spelling of the dtype (for messages), e.g. `"F64"` or `"ggml type 2"`.
    pub dtype_label: String,
    /// Shape in row-major (PyTorch) order; GGUF's reversed `ne` order is undone by the parser.
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file (meaningful when `in_bounds`).
    pub start: u64,
    /// Byte length of the data (meaningful when `in_bounds`).
    pub len: u64,
    /// Whether `start..start+len` was checked to lie inside the file with the right size.
    pub in_bounds: bool,
    /// A Q8_0 matrix of a safetensors file: `start..start+len` holds its signed bytes and this
    /// `(start, len)` its F16 scales (spec 1.1); `len` is then the size of its ggml blocks.
    pub scales: Option<(u64, u64)>,
}

/// A structurally parsed file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFile {
    /// Which container.
    pub container: Container,
    /// Metadata in file order (typed; for safetensors every value is a string at this stage).
    pub metadata: Metadata,
    /// Tensors in file order.
    pub tensors: Vec<RawTensor>,
}

/// Detects the container from the first bytes: `GGUF` magic, or a safetensors header length
/// followed by `{`. Returns `None` if neither.
pub fn sniff(bytes: &[u8]) -> Option<Container> {
    if bytes.starts_with(b"GGUF") {
        return Some(Container::Gguf);
    }
    if bytes.len() >= 9 && bytes[8] == b'{' {
        return Some(Container::Safetensors);
    }
    None
}

/// Parses either container from a whole file in memory, reporting structural findings. `None`
/// when the structure is too broken to go on (the reason is in `report`).
pub fn parse(bytes: &[u8], report: &mut Report) -> Option<RawFile> {
    parse_prefix(bytes, bytes.len() as u64, report).unwrap_or_else(|()| unreachable_need_more(report))
}

fn unreachable_need_more(report: &mut Report) -> Option<RawFile> {
    report.push(Finding::file(Code::Truncated, "the file ends inside its header"));
    None
}

/// Reads the header of an open file, reading only as much of it as the header needs (so that
/// tensor data is never loaded to validate structure), and parses it.
pub fn parse_file(file: &std::fs::File, report: &mut Report) -> std::io::Result<Option<RawFile>> {
    use std::os::unix::fs::FileExt;
    let file_len = file.metadata()?.len();
    let read_prefix = |n: u64| -> std::io::Result<Vec<u8>> {
        let n = n.min(file_len) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    };
    let first = read_prefix(16)?;
    let mut want = match sniff(&first) {
        Some(Container::Safetensors) => safetensors::head_len(&first),
        _ => 1 << 16,
    };
    loop {
        let head = read_prefix(want)?;
        let mut attempt = Report::default();
        match parse_prefix(&head, file_len, &mut attempt) {
            Ok(raw) => {
                report.findings.extend(attempt.findings);
                return Ok(raw);
            }
            Err(()) if (head.len() as u64) < file_len && want < 2 * MAX_HEADER_BYTES => want = want.saturating_mul(4),
            Err(()) => {
                report.findings.extend(attempt.findings);
                return Ok(unreachable_need_more(report));
            }
        }
    }
}

/// Parses from a prefix of a file of `file_len` bytes; `Err(())` when the prefix is too short.
fn parse_prefix(bytes: &[u8], file_len: u64, report: &mut Report) -> Result<Option<RawFile>, ()> {
    if file_len == 0 {
        report.push(Finding::file(Code::Truncated, "the file is empty"));
        return Ok(None);
    }
    match sniff(bytes) {
        Some(Container::Gguf) => gguf::parse(bytes, file_len, report).map_err(|_| ()),
        Some(Container::Safetensors) => Ok(safetensors::parse(bytes, file_len, report)),
        None => {
            if bytes.len() < 9 && (b"GGUF".starts_with(&bytes[..bytes.len().min(4)])) {
                report.push(Finding::file(Code::Truncated, "the file ends inside its header"));
            } else {
                report.push(Finding::file(
                    Code::UnknownContainer,
                    "not a GGUF file (no GGUF magic) nor a safetensors file (no JSON header); an IAPT adapter must be one of the two",
                ));
            }
            Ok(None)
        }
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two), `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Reads only the metadata of a base model GGUF (its tensors are not ours to check), and checks
/// that the file is long enough to hold the tensor data its header declares (a truncated model is
/// [`BaseModelError::Truncated`]). `path` names the file in errors.
pub fn read_gguf_metadata(file: &std::fs::File, path: &std::path::Path) -> Result<Metadata, BaseModelError> {
    use std::os::unix::fs::FileExt;
    let io = |source| BaseModelError::Io { path: path.to_owned(), source };
    let file_len = file.metadata().map_err(io)?.len();
    let mut want: u64 = 1 << 20;
    loop {
        let n = want.min(file_len) as usize;
        let mut head = vec![0u8; n];
        file.read_exact_at(&mut head, 0).map_err(io)?;
        if !head.starts_with(b"GGUF") {
            return Err(BaseModelError::NotGguf { path: path.to_owned() });
        }
        let mut report = Report::default();
        match gguf::parse_base(&head, file_len, &mut report) {
            Ok(Some(h)) if h.data_end > file_len => {
                return Err(BaseModelError::Truncated { path: path.to_owned(), needed: h.data_end, len: file_len })
            }
            Ok(Some(h)) => return Ok(h.metadata),
            Ok(None) if report.has(Code::Truncated) => {
                return Err(BaseModelError::TruncatedHeader { path: path.to_owned(), detail: report.to_string() })
            }
            Ok(None) => return Err(BaseModelError::Malformed { path: path.to_owned(), detail: report.to_string() }),
            Err(_) if (n as u64) < file_len && want < 4 * MAX_HEADER_BYTES => want *= 4,
            Err(_) => {
                return Err(BaseModelError::Malformed {
                    path: path.to_owned(),
                    detail: format!("the GGUF header is larger than the limit of {MAX_HEADER_BYTES} bytes"),
                })
            }
        }
    }
}
