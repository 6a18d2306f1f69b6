//! GGUF v3 reading and writing, byte-compatible with llama.cpp's `gguf.cpp` (checked by a test
//! that loads our files with `gguf_init_from_file`).
//!
//! Written by hand because no maintained pure-Rust GGUF crate writes files, and the reader must
//! report findings with spec codes rather than stop at the first error. Every length read from the
//! file is checked against the bytes that remain before anything is allocated from it.

use std::collections::HashSet;

use super::{
    align_up, RawFile, RawTensor, GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, MAX_BASE_MODEL_TENSORS, MAX_HEADER_BYTES, MAX_KEYS,
    MAX_STRING_BYTES, MAX_TENSORS,
};
use crate::config::{keys, Container, Metadata};
use crate::dtype::DType;
use crate::meta::{MetaType, MetaValue};
use crate::report::{Code, Finding, Report};

/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are refused.
const MAX_ARRAY_DEPTH: u32 = 4;

/// Why reading stopped.
pub(crate) enum Stop {
    /// The header continues past the bytes handed in, which are only a prefix of the file.
    NeedMore,
    /// Ran out of bytes.
    Truncated(String),
    /// A value is structurally impossible.
    Malformed(String),
    /// Reading stopped for a reason already pushed to the report with its own code.
    Reported,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    /// Length of the whole file (`bytes` may be a prefix of it).
    file_len: u64,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], Stop> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            if (self.bytes.len() as u64) < self.file_len {
                return Err(Stop::NeedMore);
            }
            return Err(Stop::Truncated(format!("the file ends inside {what} (needs {n} bytes at offset {}, {remaining} left)", self.pos)));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn remaining(&self) -> u64 {
        self.file_len - self.pos as u64
    }
    fn u8(&mut self, what: &str) -> Result<u8, Stop> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, Stop> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Stop> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, Stop> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String, Stop> {
        let n = self.u64(what)?;
        if n > MAX_STRING_BYTES {
            return Err(Stop::Malformed(format!("{what} declares a string of {n} bytes, over the limit of {MAX_STRING_BYTES}")));
        }
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| Stop::Malformed(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<MetaValue, Stop> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(what)?),
            1 => MetaValue::I8(self.u8(what)? as i8),
            2 => MetaValue::U16(self.u16(what)?),
            3 => MetaValue::I16(self.u16(what)? as i16),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(Stop::Malformed(format!("{what} is a bool with byte {b} (must be 0 or 1)"))),
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Stop::Malformed(format!("{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_id = self.u32(what)?;
                let elem = element_type(elem_id, what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte (strings and arrays at least 8): a count
                // larger than the bytes left cannot be honest.
                let min = min_size(elem_id);
                if n.checked_mul(min).is_none_or(|need| need > self.remaining()) {
                    return Err(Stop::Truncated(format!("{what} declares {n} elements, more than the file holds")));
                }
                let mut vs = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    vs.push(self.value(elem_id, what, depth + 1)?);
                }
                let elem = match (elem, vs.first()) {
                    (MetaType::Array(_), Some(first)) => first.meta_type(),
                    (e, _) => e,
                };
                MetaValue::Array(elem, vs)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(Stop::Malformed(format!("{what} has unknown value type {t}"))),
        })
    }
}

fn element_type(id: u32, what: &str) -> Result<MetaType, Stop> {
    if id == 9 {
        // Element type of nested arrays is refined from the first element.
        return Ok(MetaType::Array(Box::new(MetaType::U8)));
    }
    MetaType::scalar_from_gguf_id(id).ok_or_else(|| Stop::Malformed(format!("{what} has unknown array element type {id}")))
}

fn min_size(id: u32) -> u64 {
    match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// Parses the GGUF header, metadata and tensor infos of an adapter from `head` (a prefix of a file
/// of `file_len` bytes), checking tensor extents against `file_len`. `Err(Stop::NeedMore)` asks for
/// a longer prefix; any other failure is already in `report` and gives `Ok(None)`.
pub(crate) fn parse(head: &[u8], file_len: u64, report: &mut Report) -> Result<Option<RawFile>, Stop> {
    let parsed = parse_inner(head, file_len, report);
    settle(parsed, report)
}

/// A base model's header: its metadata and where its tensor data ends.
pub(crate) struct BaseHeader {
    /// The metadata, in file order.
    pub metadata: Metadata,
    /// The smallest file length that holds every tensor's data (tensors of ggml types this crate
    /// does not know count with their offset only).
    pub data_end: u64,
}

/// Parses a base model's header (its tensors are not ours to check, only their extent), as
/// [`parse`] does an adapter's.
pub(crate) fn parse_base(head: &[u8], file_len: u64, report: &mut Report) -> Result<Option<BaseHeader>, Stop> {
    let parsed = (|| {
        let mut c = Cursor { bytes: head, file_len, pos: 0 };
        let h = read_header(&mut c, report, MAX_BASE_MODEL_TENSORS)?;
        // Without tensors nothing follows the header, not even the alignment padding.
        let data_end = h.infos.iter().map(|i| i.data_end(h.data_start)).max().unwrap_or(c.pos as u64);
        Ok(BaseHeader { metadata: h.metadata, data_end })
    })();
    settle(parsed, report)
}

/// Turns a parse result into the report's findings: `NeedMore` passes through, a stop becomes
/// its finding and `Ok(None)`.
fn settle<T>(parsed: Result<T, Stop>, report: &mut Report) -> Result<Option<T>, Stop> {
    match parsed {
        Ok(f) => Ok(Some(f)),
        Err(Stop::NeedMore) => Err(Stop::NeedMore),
        Err(Stop::Truncated(m)) => {
            report.push(Finding::file(Code::Truncated, m));
            Ok(None)
        }
        Err(Stop::Malformed(m)) => {
            report.push(Finding::file(Code::MalformedHeader, m));
            Ok(None)
        }
        Err(Stop::Reported) => Ok(None),
    }
}

/// One tensor info as stored.
struct Info {
    name: String,
    /// GGUF order (innermost first).
    ne: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

impl Info {
    /// Where this tensor's data ends, given the start of the data section; saturating, and counting
    /// a tensor of an unknown ggml type with its offset only.
    fn data_end(&self, data_start: u64) -> u64 {
        let numel = self.ne.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        let bytes = ggml_type_size(self.ggml_type).map_or(0, |(block, size)| numel.div_ceil(block).saturating_mul(size));
        data_start.saturating_add(self.offset).saturating_add(bytes)
    }
}

/// (elements per block, bytes per block) of the ggml types (ggml.c's `type_traits`).
fn ggml_type_size(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),           // F32
        1 | 30 | 25 => (1, 2), // F16, BF16, I16
        2 | 20 => (32, 18),    // Q4_0, IQ4_NL
        3 => (32, 20),         // Q4_1
        6 => (32, 22),         // Q5_0
        7 => (32, 24),         // Q5_1
        8 => (32, 34),         // Q8_0
        9 => (32, 36),         // Q8_1
        10 => (256, 84),       // Q2_K
        11 | 21 => (256, 110), // Q3_K, IQ3_S
        12 => (256, 144),      // Q4_K
        13 => (256, 176),      // Q5_K
        14 => (256, 210),      // Q6_K
        15 => (256, 292),      // Q8_K
        16 | 35 => (256, 66),  // IQ2_XXS, TQ2_0
        17 => (256, 74),       // IQ2_XS
        18 => (256, 98),       // IQ3_XXS
        19 => (256, 50),       // IQ1_S
        22 => (256, 82),       // IQ2_S
        23 => (256, 136),      // IQ4_XS
        24 => (1, 1),          // I8
        26 => (1, 4),          // I32
        27 | 28 => (1, 8),     // I64, F64
        29 => (256, 56),       // IQ1_M
        34 => (256, 54),       // TQ1_0
        39 => (32, 17),        // MXFP4
        _ => return None,
    })
}

/// Everything before the tensor data.
struct Header {
    metadata: Metadata,
    alignment: u64,
    infos: Vec<Info>,
    /// Absolute offset of the data section (the header's end, aligned).
    data_start: u64,
}

fn parse_inner(bytes: &[u8], file_len: u64, report: &mut Report) -> Result<RawFile, Stop> {
    let mut c = Cursor { bytes, file_len, pos: 0 };
    let h = read_header(&mut c, report, MAX_TENSORS)?;
    let tensors = raw_tensors(h.infos, h.data_start, h.alignment, file_len, report);
    Ok(RawFile { container: Container::Gguf, metadata: h.metadata, tensors })
}

/// Reads the magic, version, counts, metadata and tensor infos; at most `max_tensors` tensors.
fn read_header(c: &mut Cursor<'_>, report: &mut Report, max_tensors: u64) -> Result<Header, Stop> {
    let (n_tensors, n_kv) = read_preamble(c, report, max_tensors)?;
    let metadata = read_metadata(c, n_kv, report)?;
    check_header_size(c)?;
    let alignment = alignment_of(&metadata, report)?;
    let infos = read_tensor_infos(c, n_tensors)?;
    check_header_size(c)?;
    let data_start = align_up(c.pos as u64, alignment).ok_or_else(|| Stop::Malformed("data offset overflows".into()))?;
    Ok(Header { metadata, alignment, infos, data_start })
}

/// The magic, the version and the two counts, each against its limit and the bytes left.
fn read_preamble(c: &mut Cursor<'_>, report: &mut Report, max_tensors: u64) -> Result<(u64, u64), Stop> {
    let magic = c.take(4, "the magic")?;
    if magic != b"GGUF" {
        return Err(Stop::Malformed("missing GGUF magic".into()));
    }
    let version = c.u32("the version")?;
    if version != GGUF_VERSION {
        report.push(Finding::file(
            Code::UnsupportedContainerVersion,
            format!("GGUF version {version} is not supported; only version {GGUF_VERSION} is (re-save with a current gguf writer)"),
        ));
        return Err(Stop::Reported);
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_kv = c.u64("the metadata count")?;
    if n_tensors > max_tensors {
        return Err(Stop::Malformed(format!("declares {n_tensors} tensors, over the limit of {max_tensors}")));
    }
    if n_kv > MAX_KEYS {
        return Err(Stop::Malformed(format!("declares {n_kv} metadata keys, over the limit of {MAX_KEYS}")));
    }
    // Each key/value pair takes at least 8 + 4 + 1 bytes, each tensor info at least 8 + 4 + 8 + 4 + 8.
    if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(32)) > c.remaining() {
        return Err(Stop::Truncated(format!("declares {n_kv} keys and {n_tensors} tensors, more than the file holds")));
    }
    Ok((n_tensors, n_kv))
}

/// The metadata key/value pairs in file order; a repeated key is reported and the first kept.
fn read_metadata(c: &mut Cursor<'_>, n_kv: u64, report: &mut Report) -> Result<Metadata, Stop> {
    let mut metadata: Metadata = Vec::with_capacity(n_kv as usize);
    let mut keys_seen: HashSet<String> = HashSet::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("the type of {key:?}"))?;
        let value = c.value(ty, &format!("the value of {key:?}"), 0)?;
        if !keys_seen.insert(key.clone()) {
            report.push(Finding::about(
                Code::DuplicateKey,
                key.clone(),
                "metadata key appears more than once; keep one (the first is used)",
            ));
            continue;
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

fn check_header_size(c: &Cursor<'_>) -> Result<(), Stop> {
    if c.pos as u64 > MAX_HEADER_BYTES {
        return Err(Stop::Malformed(format!("header is over the limit of {MAX_HEADER_BYTES} bytes")));
    }
    Ok(())
}

/// `general.alignment`, or the default; anything but a non-zero power of two (u32) is reported.
fn alignment_of(metadata: &Metadata, report: &mut Report) -> Result<u64, Stop> {
    match metadata.iter().find(|(k, _)| k == keys::GENERAL_ALIGNMENT) {
        None => Ok(GGUF_DEFAULT_ALIGNMENT),
        Some((_, MetaValue::U32(a))) if *a != 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => {
            report.push(Finding::about(
                Code::BadOffsets,
                keys::GENERAL_ALIGNMENT,
                format!("{} must be a non-zero power of two (u32)", v.to_text()),
            ));
            Err(Stop::Reported)
        }
    }
}

/// The tensor infos: name, 1..=4 dimensions each at most `INT64_MAX`, ggml type and offset.
fn read_tensor_infos(c: &mut Cursor<'_>, n_tensors: u64) -> Result<Vec<Info>, Stop> {
    let mut infos: Vec<Info> = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor #{i}"))?;
        let what = format!("tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(Stop::Malformed(format!("{what} has {n_dims} dimensions (GGUF allows 1..={MAX_DIMS})")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&what)?;
            if d > i64::MAX as u64 {
                return Err(Stop::Malformed(format!("{what} has a dimension of {d}, over INT64_MAX")));
            }
            ne.push(d);
        }
        let ggml_type = c.u32(&what)?;
        let offset = c.u64(&what)?;
        infos.push(Info { name, ne, ggml_type, offset });
    }
    Ok(infos)
}

/// The raw tensors of the infos, each extent checked (alignment, inside the file, no overflow);
/// a repeated name is reported and its later infos dropped; overlapping extents are reported.
fn raw_tensors(infos: Vec<Info>, data_start: u64, alignment: u64, file_len: u64, report: &mut Report) -> Vec<RawTensor> {
    let mut tensors = Vec::with_capacity(infos.len());
    let mut extents: Vec<(u64, u64, usize)> = Vec::new();
    let mut names_seen: HashSet<String> = HashSet::with_capacity(infos.len());
    for info in infos {
        if !names_seen.insert(info.name.clone()) {
            report.push(Finding::about(
                Code::DuplicateTensor,
                info.name.clone(),
                "tensor name appears more than once; each tensor must be stored once",
            ));
            continue;
        }
        let mut t = raw_tensor(&info);
        if let Some(dt) = t.dtype {
            if let Some((s, n)) = check_extent(&info, dt, data_start, alignment, file_len, report) {
                t.start = s;
                t.len = n;
                t.in_bounds = true;
                extents.push((s, s + n, tensors.len()));
            }
        }
        tensors.push(t);
    }
    report_overlaps(extents, &tensors, report);
    tensors
}

/// The raw tensor of an info, its extent not yet checked.
fn raw_tensor(info: &Info) -> RawTensor {
    let dtype = DType::from_ggml_type(info.ggml_type);
    RawTensor {
        name: info.name.clone(),
        dtype,
        dtype_label: dtype.map_or_else(|| format!("ggml type {}", info.ggml_type), |d| d.to_string()),
        shape: info.ne.iter().rev().copied().collect(),
        start: 0,
        len: 0,
        in_bounds: false,
        scales: None,
    }
}

/// The (start, length) of a tensor's data when it is aligned and inside the file; otherwise the
/// reason is reported and `None` returned.
fn check_extent(info: &Info, dt: DType, data_start: u64, alignment: u64, file_len: u64, report: &mut Report) -> Option<(u64, u64)> {
    if info.offset % alignment != 0 {
        report.push(Finding::about(
            Code::BadOffsets,
            info.name.clone(),
            format!("data offset {} is not a multiple of the alignment {alignment}", info.offset),
        ));
        return None;
    }
    if info.ne.first().is_some_and(|&row| row % dt.block_len() != 0) {
        report.push(Finding::about(
            Code::BadQ8Layout,
            info.name.clone(),
            format!("a {dt} tensor's rows must be whole blocks of {} values, but ne[0] is {}", dt.block_len(), info.ne[0]),
        ));
        return None;
    }
    let shape: Vec<u64> = info.ne.iter().rev().copied().collect();
    let nbytes = dt.data_bytes(&shape);
    let start = data_start.checked_add(info.offset);
    match (nbytes, start) {
        (Some(n), Some(s)) if s.checked_add(n).is_some_and(|e| e <= file_len) => Some((s, n)),
        (Some(_), Some(_)) => {
            report.push(Finding::about(
                Code::Truncated,
                info.name.clone(),
                "tensor data extends past the end of the file (truncated file or bad offset)",
            ));
            None
        }
        _ => {
            report.push(Finding::about(Code::BadOffsets, info.name.clone(), "tensor size or offset overflows 64 bits"));
            None
        }
    }
}

/// Reports every tensor whose data overlaps the data of the tensor before it (by start offset).
fn report_overlaps(mut extents: Vec<(u64, u64, usize)>, tensors: &[RawTensor], report: &mut Report) {
    extents.sort();
    for w in extents.windows(2) {
        if w[1].0 < w[0].1 {
            let (a, b) = (&tensors[w[0].2].name, &tensors[w[1].2].name);
            report.push(Finding::about(Code::BadOffsets, b.clone(), format!("tensor data overlaps the data of {a:?}")));
        }
    }
}

/// One tensor to write: name, row-major shape, ggml type id, data length.
pub(crate) struct WriteTensor<'a> {
    pub name: String,
    pub shape: &'a [u64],
    pub ggml_type: u32,
    pub len: u64,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_bits().to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => put_string(out, s),
        MetaValue::Array(t, vs) => {
            out.extend_from_slice(&t.gguf_id().to_le_bytes());
            out.extend_from_slice(&(vs.len() as u64).to_le_bytes());
            for v in vs {
                put_value(out, v);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_bits().to_le_bytes()),
    }
}

/// Builds the header (everything before the tensor data, padding included) and the data offsets.
/// Data of each tensor is padded to `GGUF_DEFAULT_ALIGNMENT` with zero bytes, as `gguf.cpp` does.
pub(crate) fn header(metadata: &[(String, MetaValue)], tensors: &[WriteTensor<'_>]) -> (Vec<u8>, Vec<u64>) {
    let align = GGUF_DEFAULT_ALIGNMENT;
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend_from_slice(&v.meta_type().gguf_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = align_up(offset + t.len, align).expect("sizes of in-memory tensors fit in u64");
    }
    let padded = align_up(out.len() as u64, align).expect("header fits") as usize;
    out.resize(padded, 0);
    (out, offsets)
}
