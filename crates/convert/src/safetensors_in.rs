//! Safetensors checkpoints as input: only the header is parsed up front; each tensor's bytes are
//! read from the file when it is converted. The header's offsets are checked the way the
//! safetensors crate does (in bounds, sizes matching dtype x shape, with checked arithmetic) but
//! without reading the whole file into memory.

use std::io::{self, Read, Seek, SeekFrom};

use crate::pickle::TorchDType;

/// Largest safetensors header accepted (the safetensors crate uses the same 100 MB cap).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

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
    /// Element type (`None` when it is one this converter cannot read, such as F8 or I4).
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
    let mut head = vec![0u8; n as usize];
    r.read_exact(&mut head)?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let Entries(map) = serde_json::from_slice(&head).map_err(|e| bad(e.to_string()))?;
    let mut out: Vec<StEntry> = Vec::with_capacity(map.len());
    let mut seen = std::collections::HashSet::new();
    for (name, v) in map {
        if !seen.insert(name.clone()) {
            return Err(bad(format!("the key {name:?} appears twice")));
        }
        if name == "__metadata__" {
            continue;
        }
        let obj = v.as_object().ok_or_else(|| bad(format!("entry {name:?} is not an object")))?;
        let dtype_label = obj.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("entry {name:?} has no dtype")))?;
        let shape: Vec<u64> = obj
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(serde_json::Value::as_u64).collect())
            .ok_or_else(|| bad(format!("entry {name:?} has no shape of non-negative integers")))?;
        let offs: Vec<u64> = obj
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(serde_json::Value::as_u64).collect())
            .ok_or_else(|| bad(format!("entry {name:?} has no data_offsets")))?;
        let [a, b] = offs[..] else { return Err(bad(format!("entry {name:?}: data_offsets must be [begin, end]"))) };
        if a > b || b > data_len {
            return Err(bad(format!("entry {name:?}: data_offsets [{a}, {b}] are outside the {data_len} data bytes")));
        }
        let dtype = TorchDType::from_name(dtype_label);
        if let Some(dt) = dtype {
            let want = shape.iter().try_fold(dt.size() as u64, |x, &d| x.checked_mul(d));
            if want != Some(b - a) {
                return Err(bad(format!("entry {name:?}: {} bytes do not match {dtype_label} x {shape:?}", b - a)));
            }
        }
        out.push(StEntry { name, dtype, dtype_label: dtype_label.to_owned(), shape, start: data_start + a, len: b - a });
    }
    Ok(out)
}

/// A JSON object's entries in order, duplicates kept (a map would silently keep only the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(Visit)
    }
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
