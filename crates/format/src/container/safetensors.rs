//! safetensors reading and writing.
//!
//! The reader is written against the format of huggingface/safetensors (8-byte little-endian header
//! length, a JSON header, a contiguous byte buffer) rather than through the `safetensors` crate,
//! because the crate deserialises the header into a map where a duplicate key silently wins and
//! stops at the first error; spec v1 needs duplicates reported (E007, E203) and every finding
//! listed. Interoperability with the reference crate is checked by tests in both directions. The
//! writer emits a canonical file: metadata keys sorted, tensors in the order given, header padded
//! with spaces to a multiple of 8 bytes as the reference writer does.

use std::collections::HashSet;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{RawFile, RawTensor, MAX_HEADER_BYTES, MAX_KEYS, MAX_TENSORS};
use crate::config::Container;
use crate::dtype::DType;
use crate::meta::MetaValue;
use crate::report::{Code, Finding, Report};

/// Key of the metadata object in a safetensors header.
pub(crate) const METADATA_KEY: &str = "__metadata__";

/// JSON that keeps object entries in order, duplicates included.
#[derive(Debug, Clone)]
enum Json {
    /// `null`, booleans and non-finite numbers: never valid in a safetensors header position.
    Other,
    Number(serde_json::Number),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
                {
                    let _ = v;
                    Ok(Json::Other)
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Json::Other, Json::Number))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Array(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = a.next_entry::<String, Json>()? {
                    v.push((k, x));
                }
                Ok(Json::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Element size of every safetensors dtype, so that extents of tensors with dtypes spec v1 refuses
/// can still be checked.
fn element_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

fn malformed<T>(report: &mut Report, m: impl Into<String>) -> Option<T> {
    report.push(Finding::file(Code::MalformedHeader, m));
    None
}

/// Bytes of the file needed to parse its header: 8 + the declared header length (capped), given
/// the first 8 bytes.
pub(crate) fn head_len(first8: &[u8]) -> u64 {
    let n = u64::from_le_bytes(first8[..8].try_into().expect("8 bytes"));
    8 + n.min(MAX_HEADER_BYTES + 1)
}

/// Parses a safetensors header from `head` (a prefix of a file of `file_len` bytes holding at
/// least [`head_len`] bytes, or the whole file), checking extents against `file_len`.
///
/// The steps: the JSON header (`json_entries`); each entry, the `__metadata__` object
/// (`read_metadata`) or a tensor (`tensor_entry`, then `read_tensor`); then the tiling of the data
/// buffer (`check_tiling`).
pub(crate) fn parse(head: &[u8], file_len: u64, report: &mut Report) -> Option<RawFile> {
    let (n, entries) = json_entries(head, file_len, report)?;
    let data = Buffer { start: 8 + n, len: file_len - 8 - n };
    let mut metadata = Vec::new();
    let mut seen_metadata = false;
    let mut tensor_names: HashSet<String> = HashSet::with_capacity(entries.len());
    let mut tensors: Vec<RawTensor> = Vec::new();
    let mut extents: Vec<(u64, u64, String)> = Vec::new();
    for (name, value) in entries {
        if name == METADATA_KEY {
            if seen_metadata {
                report.push(Finding::about(Code::DuplicateKey, METADATA_KEY, "the header has two __metadata__ objects; merge them"));
                continue;
            }
            seen_metadata = true;
            metadata = read_metadata(value, report)?;
            continue;
        }
        let Some(entry) = tensor_entry(&value) else {
            return malformed(
                report,
                format!("tensor {name:?} is not {{\"dtype\": string, \"shape\": [int], \"data_offsets\": [int, int]}}"),
            );
        };
        if !tensor_names.insert(name.clone()) {
            report.push(Finding::about(Code::DuplicateTensor, name, "tensor name appears more than once; each tensor must be stored once"));
            continue;
        }
        tensors.push(read_tensor(&name, entry, &data, &mut extents, report)?);
    }
    check_tiling(extents, data.len, report);
    pair_q8(&mut tensors, report);
    Some(RawFile { container: Container::Safetensors, metadata, tensors })
}

/// The tensor data buffer: its absolute start and its length.
struct Buffer {
    start: u64,
    len: u64,
}

/// The header length `n` and the JSON object's entries, in order and with duplicates, after the
/// length, UTF-8, JSON and count checks.
fn json_entries(head: &[u8], file_len: u64, report: &mut Report) -> Option<(u64, Vec<(String, Json)>)> {
    if file_len < 8 || head.len() < 8 {
        report.push(Finding::file(Code::Truncated, "the file ends inside the 8-byte header length"));
        return None;
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return malformed(report, format!("header length {n} is over the limit of {MAX_HEADER_BYTES} bytes"));
    }
    let rest = file_len - 8;
    if n > rest || n > (head.len() - 8) as u64 {
        report.push(Finding::file(Code::Truncated, format!("the header declares {n} bytes but only {rest} follow")));
        return None;
    }
    let header = &head[8..8 + n as usize];
    let Ok(text) = std::str::from_utf8(header) else {
        return malformed(report, "the JSON header is not valid UTF-8");
    };
    let json: Json = match serde_json::from_str(text.trim_end_matches(' ')) {
        Ok(j) => j,
        Err(e) => return malformed(report, format!("the JSON header does not parse: {e}")),
    };
    let Json::Object(entries) = json else {
        return malformed(report, "the JSON header is not an object");
    };
    if entries.len() as u64 > MAX_TENSORS + 1 {
        return malformed(report, format!("the header lists over {MAX_TENSORS} tensors"));
    }
    Some((n, entries))
}

/// The `__metadata__` object: string values only, at most [`MAX_KEYS`]; a repeated key is reported
/// and the first kept. `None` (reported) when it is not an object of strings.
fn read_metadata(value: Json, report: &mut Report) -> Option<Vec<(String, MetaValue)>> {
    let Json::Object(kvs) = value else {
        return malformed(report, "__metadata__ is not a JSON object");
    };
    if kvs.len() as u64 > MAX_KEYS {
        return malformed(report, format!("__metadata__ has {} keys, over the limit of {MAX_KEYS}", kvs.len()));
    }
    let mut metadata = Vec::with_capacity(kvs.len());
    let mut keys_seen: HashSet<String> = HashSet::with_capacity(kvs.len());
    for (k, v) in kvs {
        let Json::Str(s) = v else {
            return malformed(report, format!("__metadata__ value of {k:?} is not a string (safetensors metadata values are strings)"));
        };
        if !keys_seen.insert(k.clone()) {
            report.push(Finding::about(Code::DuplicateKey, k, "metadata key appears more than once; keep one (the first is used)"));
            continue;
        }
        metadata.push((k, MetaValue::Str(s)));
    }
    Some(metadata)
}

/// One tensor entry `(dtype, shape, begin, end)`: its dtype (`None`, reported, when unknown), its
/// size against `data_offsets` (findings), and its extent, recorded in `extents` when consistent.
fn read_tensor(
    name: &str,
    (dtype, shape, begin, end): (String, Vec<u64>, u64, u64),
    data: &Buffer,
    extents: &mut Vec<(u64, u64, String)>,
    report: &mut Report,
) -> Option<RawTensor> {
    let Some(esize) = element_size(&dtype) else {
        return malformed(report, format!("tensor {name:?} has unknown dtype {dtype:?}"));
    };
    let mut t = RawTensor {
        name: name.to_owned(),
        dtype: DType::from_safetensors_name(&dtype),
        dtype_label: dtype.clone(),
        shape: shape.clone(),
        start: 0,
        len: 0,
        in_bounds: false,
        scales: None,
    };
    let nbytes = shape.iter().try_fold(esize, |acc, &d| acc.checked_mul(d));
    match nbytes {
        None => report.push(Finding::about(Code::BadOffsets, name, "shape x dtype size overflows 64 bits")),
        Some(_) if end < begin => report.push(Finding::about(
            Code::BadOffsets,
            name,
            format!("data_offsets [{begin}, {end}] end before they begin; the end must be at least the start"),
        )),
        Some(nb) if end - begin != nb => report.push(Finding::about(
            Code::BadOffsets,
            name,
            format!("data_offsets [{begin}, {end}] span {} bytes but dtype {dtype} x shape {shape:?} needs {nb}", end - begin),
        )),
        Some(nb) => {
            extents.push((begin, end, name.to_owned()));
            if end <= data.len {
                t.start = data.start + begin;
                t.len = nb;
                t.in_bounds = true;
            }
        }
    }
    Some(t)
}

/// Extents must tile the buffer exactly: no hole, no overlap, nothing after the last tensor, and
/// nothing past the end of the file.
fn check_tiling(mut extents: Vec<(u64, u64, String)>, buffer_len: u64, report: &mut Report) {
    extents.sort();
    let mut cursor = 0u64;
    for (begin, end, name) in extents {
        if begin > cursor {
            report.push(Finding::about(
                Code::BadOffsets,
                name,
                format!("hole of {} bytes before this tensor's data (offset {begin})", begin - cursor),
            ));
        } else if begin < cursor {
            report.push(Finding::about(Code::BadOffsets, name, format!("data at offset {begin} overlaps the previous tensor's data")));
        }
        cursor = cursor.max(end);
    }
    if cursor > buffer_len {
        report.push(Finding::file(
            Code::Truncated,
            format!("tensor data needs {cursor} bytes but the file holds {buffer_len} after the header (truncated file)"),
        ));
    } else if cursor < buffer_len {
        report.push(Finding::file(
            Code::BadOffsets,
            format!("{} bytes after the last tensor's data belong to no tensor", buffer_len - cursor),
        ));
    }
}

fn tensor_entry(v: &Json) -> Option<(String, Vec<u64>, u64, u64)> {
    let Json::Object(fields) = v else { return None };
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (k, x) in fields {
        match (k.as_str(), x) {
            ("dtype", Json::Str(s)) if dtype.is_none() => dtype = Some(s.clone()),
            ("shape", Json::Array(a)) if shape.is_none() => shape = Some(a.iter().map(as_u64).collect::<Option<Vec<_>>>()?),
            ("data_offsets", Json::Array(a)) if offsets.is_none() && a.len() == 2 => offsets = Some((as_u64(&a[0])?, as_u64(&a[1])?)),
            _ => return None,
        }
    }
    let (b, e) = offsets?;
    Some((dtype?, shape?, b, e))
}

fn as_u64(j: &Json) -> Option<u64> {
    match j {
        Json::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Suffix of the tensor that holds a Q8_0 matrix's scales in safetensors (spec 1.1): the matrix
/// `NAME` is stored as `NAME` (`I8`, its shape) and `NAME_scale` (`F16`, `[rows, cols / 32]`).
pub(crate) const Q8_SCALE_SUFFIX: &str = "_scale";

/// Joins each Q8_0 pair (spec 1.1) into one Q8_0 tensor under the matrix's name: an `I8` tensor
/// `NAME` of shape `[rows, cols]` with `cols` a multiple of 32, and an `F16` tensor
/// `NAME_scale` of shape `[rows, cols / 32]`. A scale tensor without an `I8` partner is E208 and
/// dropped; a pair that does not fit is E208 and becomes a Q8_0 tensor without data (so that it
/// is reported once, not also as a missing tensor or a disallowed dtype).
fn pair_q8(tensors: &mut Vec<RawTensor>, report: &mut Report) {
    let mut scales = Vec::new();
    tensors.retain(|t| match t.name.strip_suffix(Q8_SCALE_SUFFIX) {
        Some(base) if base.starts_with("iapt.") => {
            scales.push((base.to_owned(), t.clone()));
            false
        }
        _ => true,
    });
    // Names are unique here (duplicates were dropped when parsing): one lookup per scale tensor.
    let index: std::collections::HashMap<String, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    for (base, sc) in scales {
        let Some(m) = index.get(&base).map(|&i| &mut tensors[i]).filter(|t| t.dtype_label == "I8") else {
            report.push(Finding::about(
                Code::BadQ8Layout,
                sc.name,
                format!("a Q8_0 scale tensor needs an I8 tensor {base:?} beside it (the quantized values); add it or remove this one"),
            ));
            continue;
        };
        let want = match m.shape.as_slice() {
            [rows, cols] if cols % DType::Q8_0.block_len() == 0 => Some(vec![*rows, cols / DType::Q8_0.block_len()]),
            _ => None,
        };
        m.dtype = Some(DType::Q8_0);
        m.dtype_label = "Q8_0 (I8 + F16 scales)".to_owned();
        let Some(want) = want else {
            report.push(Finding::about(
                Code::BadQ8Layout,
                m.name.clone(),
                format!("a Q8_0 matrix must be 2-D with rows a multiple of 32 values, but its shape is {:?}", m.shape),
            ));
            m.in_bounds = false;
            continue;
        };
        if sc.dtype != Some(DType::F16) || sc.shape != want {
            report.push(Finding::about(
                Code::BadQ8Layout,
                sc.name,
                format!(
                    "the scales of a Q8_0 matrix of shape {:?} must be F16 of shape {want:?}, not {} {:?}",
                    m.shape, sc.dtype_label, sc.shape
                ),
            ));
            m.in_bounds = false;
            continue;
        }
        m.in_bounds &= sc.in_bounds;
        m.scales = Some((sc.start, sc.len));
        m.len = DType::Q8_0.data_bytes(&m.shape).unwrap_or(0);
    }
}

/// One tensor to write.
pub(crate) struct WriteTensor<'a> {
    pub name: String,
    pub shape: std::borrow::Cow<'a, [u64]>,
    pub dtype: &'a str,
    pub len: u64,
}

/// Builds the 8-byte length and the padded JSON header.
pub(crate) fn header(metadata: &[(String, String)], tensors: &[WriteTensor<'_>]) -> Vec<u8> {
    let mut meta: Vec<&(String, String)> = metadata.iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut obj = serde_json::Map::new();
    if !meta.is_empty() {
        let mut m = serde_json::Map::new();
        for (k, v) in meta {
            m.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        obj.insert(METADATA_KEY.to_owned(), serde_json::Value::Object(m));
    }
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.len;
        obj.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype, "shape": &*t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(obj)).expect("JSON of strings and integers serialises");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}
