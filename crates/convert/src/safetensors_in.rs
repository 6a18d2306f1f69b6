//! Safetensors checkpoints as input: only the header is parsed up front, by `iapt-format`'s parser
//! (the one adapters are read with: offsets checked with checked arithmetic, in bounds, sizes
//! matching dtype x shape, tiling the data exactly, duplicates refused); each tensor's bytes are
//! read from the file when it is converted, so the whole file is never held in memory.

use std::io::{self, Read, Seek, SeekFrom};

pub use iapt_format::MAX_HEADER_BYTES;

use crate::pickle::TorchDType;

/// Why a safetensors file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// Reading the file failed.
    #[error("cannot read the safetensors file: {0}")]
    Io(#[from] io::Error),
    /// The header is malformed.
    #[error("malformed safetensors header: {0}; the file is damaged or not safetensors")]
    Header(String),
    /// A tensor's dtype has no counterpart this converter reads.
    #[error("tensor {name:?} has dtype {dtype}, which cannot become an adapter tensor (F32, F16, BF16, F64 are read)")]
    DType {
        /// The tensor.
        name: String,
        /// Its dtype string.
        dtype: String,
    },
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct StEntry {
    /// The tensor name.
    pub name: String,
    /// Element type (`None` when it is one this converter cannot read, such as F8).
    pub dtype: Option<TorchDType>,
    /// The dtype as written in the file.
    pub dtype_label: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Absolute file offset of the data.
    pub start: u64,
    /// Byte length of the data.
    pub len: u64,
}

/// Reads and checks a safetensors header.
pub fn read_header<R: Read + Seek>(r: &mut R) -> Result<Vec<StEntry>, SafetensorsError> {
    let file_len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let bad = |m: String| SafetensorsError::Header(m);
    if file_len < 8 {
        return Err(bad("the file is shorter than the 8-byte header length".into()));
    }
    let mut n = [0u8; 8];
    r.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(bad(format!("header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte limit")));
    }
    let mut head = vec![0u8; 8 + n as usize];
    head[..8].copy_from_slice(&n.to_le_bytes());
    r.read_exact(&mut head[8..])?;
    let raw = iapt_format::raw::parse_safetensors_header(&head, file_len).map_err(|report| {
        let errors: Vec<String> = report.errors().map(|f| f.to_string()).collect();
        bad(errors.join("; "))
    })?;
    Ok(raw
        .tensors
        .into_iter()
        .map(|t| StEntry {
            dtype: TorchDType::from_name(&t.dtype_label),
            name: t.name,
            dtype_label: t.dtype_label,
            shape: t.shape,
            start: t.start,
            len: t.len,
        })
        .collect())
}

/// Reads one tensor's bytes (little-endian, row-major, as safetensors stores them).
pub fn read_tensor<R: Read + Seek>(r: &mut R, e: &StEntry) -> Result<Vec<u8>, SafetensorsError> {
    if e.dtype.is_none() {
        return Err(SafetensorsError::DType { name: e.name.clone(), dtype: e.dtype_label.clone() });
    }
    r.seek(SeekFrom::Start(e.start))?;
    // `len` was checked against the file length when the header was read.
    let mut buf = vec![0u8; e.len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> std::io::Cursor<Vec<u8>> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data, 0);
        std::io::Cursor::new(b)
    }

    #[test]
    fn header_checks() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"x":"y"}}"#;
        let e = read_header(&mut file(ok, 8)).unwrap();
        assert_eq!((e[0].start, e[0].len), (8 + ok.len() as u64, 8));
        for bad in [
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            r#"[1]"#,
        ] {
            assert!(matches!(read_header(&mut file(bad, 8)), Err(SafetensorsError::Header(_))), "{bad}");
        }
        // A header length beyond the file.
        let mut f = std::io::Cursor::new(u64::MAX.to_le_bytes().to_vec());
        assert!(matches!(read_header(&mut f), Err(SafetensorsError::Header(_))));
    }
}
