//! A small, strict reader and writer of NumPy `.npy` files.
//!
//! Scope (everything else is refused with a typed [`NpyError`], never a panic):
//! - format versions 1.0, 2.0 and 3.0 (the header is ASCII in 1.0 and 2.0, UTF-8 in 3.0);
//! - little-endian floating point: `<f4` (float32) is read and written; `<f2` (float16) is read and
//!   converted exactly to f32; `<f8` (float64) is read by [`read_f64`] (exactly) but refused by
//!   [`read_f32`], because narrowing would silently lose precision: convert it in NumPy with
//!   `a.astype(numpy.float32)` if that is what you want;
//! - C order only: `fortran_order: True` is refused (save `numpy.ascontiguousarray(a)` instead);
//! - the header is exactly the dict NumPy writes: the keys `descr`, `fortran_order` and `shape`, each
//!   once, and nothing else;
//! - the data is exactly `product(shape) x itemsize` bytes: a short file and trailing bytes are both
//!   errors.
//!
//! [`write_f32`] writes version 1.0 (2.0 when the header would not fit), with the header padded so
//! that the data starts at a multiple of 64 bytes, as NumPy does.
//!
//! ```
//! let mut file = Vec::new();
//! iapt_npy::write_f32(&mut file, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let a = iapt_npy::read_f32(&mut file.as_slice())?;
//! assert_eq!(a.shape, vec![2, 3]);
//! assert_eq!(a.data[5], 6.0);
//! # Ok::<(), iapt_npy::NpyError>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

/// The six magic bytes every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Largest header accepted, in bytes. NumPy's own reader refuses headers above 10000 bytes by
/// default (`max_header_size`); a float array's header is well under 200 bytes.
pub const MAX_HEADER_BYTES: usize = 10_000;

/// Largest number of dimensions accepted (NumPy's `NPY_MAXDIMS` is 64).
pub const MAX_DIMS: usize = 64;

/// Bytes read at a time when streaming array data, so that a lying header never causes a large
/// allocation before the bytes are actually there.
const READ_CHUNK: usize = 1 << 20;

/// The element types this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `<f2`: IEEE 754 binary16.
    F16,
    /// `<f4`: IEEE 754 binary32.
    F32,
    /// `<f8`: IEEE 754 binary64.
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    /// The NumPy `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::F16 => "<f2",
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
        }
    }

    /// The NumPy name (`float16`, `float32`, `float64`).
    pub fn numpy_name(self) -> &'static str {
        match self {
            Dtype::F16 => "float16",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.numpy_name(), self.descr())
    }
}

/// Why a `.npy` file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    /// Reading or writing failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with `\x93NUMPY`.
    #[error("not a .npy file (it does not start with the magic \\x93NUMPY); save it with numpy.save")]
    BadMagic,
    /// The file ended inside the preamble or header.
    #[error("the file ends inside the .npy header; it is truncated")]
    TruncatedHeader,
    /// A format version other than 1.0, 2.0 or 3.0.
    #[error("unsupported .npy format version {major}.{minor}; versions 1.0, 2.0 and 3.0 are supported")]
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The header length field exceeds [`MAX_HEADER_BYTES`].
    #[error("the .npy header is {len} bytes, more than the {MAX_HEADER_BYTES} accepted")]
    HeaderTooLong {
        /// The declared length.
        len: usize,
    },
    /// The header is not the dict NumPy writes.
    #[error("malformed .npy header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: String,
    },
    /// A dtype this crate does not handle (or, for [`read_f32`], float64).
    #[error("unsupported dtype {descr:?}: {hint}")]
    UnsupportedDtype {
        /// The `descr` string from the header.
        descr: String,
        /// How to fix it.
        hint: &'static str,
    },
    /// `fortran_order: True`.
    #[error("the array is stored in Fortran (column-major) order; only C order is supported: save numpy.ascontiguousarray(a)")]
    FortranOrder,
    /// The number of bytes the shape implies overflows.
    #[error("shape {shape:?} is too large")]
    ShapeOverflow {
        /// The shape.
        shape: Vec<usize>,
    },
    /// Fewer data bytes than the shape requires.
    #[error("the data is truncated: the shape needs {expected} bytes but only {got} are present")]
    TruncatedData {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// Bytes after the array data.
    #[error("{extra} unexpected bytes after the array data")]
    TrailingBytes {
        /// How many (at least).
        extra: u64,
    },
    /// `data.len()` differs from the product of the shape (writing).
    #[error("{len} values do not match shape {shape:?}")]
    LengthMismatch {
        /// The shape.
        shape: Vec<usize>,
        /// Number of values given.
        len: usize,
    },
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The format version (major, minor).
    pub version: (u8, u8),
    /// The element type.
    pub dtype: Dtype,
    /// The shape (empty for a 0-d array).
    pub shape: Vec<usize>,
}

impl Header {
    /// Number of elements (1 for a 0-d array).
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// Number of data bytes.
    pub fn data_bytes(&self) -> Option<u64> {
        let n = self.numel()?.checked_mul(self.dtype.size())?;
        u64::try_from(n).ok()
    }
}

/// An array read from a `.npy` file: the shape and the values in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<T> {
    /// The element type the file stored (the values are converted exactly to `T`).
    pub stored: Dtype,
    /// The shape (empty for a 0-d array).
    pub shape: Vec<usize>,
    /// `product(shape)` values, row-major.
    pub data: Vec<T>,
}

/// Reads the preamble and header, leaving `r` at the first data byte.
pub fn read_header<R: Read + ?Sized>(r: &mut R) -> Result<Header, NpyError> {
    let mut pre = [0u8; 8];
    read_exact_or(r, &mut pre, NpyError::TruncatedHeader)?;
    if &pre[..6] != MAGIC {
        return Err(NpyError::BadMagic);
    }
    let (major, minor) = (pre[6], pre[7]);
    let len = match (major, minor) {
        (1, 0) => {
            let mut b = [0u8; 2];
            read_exact_or(r, &mut b, NpyError::TruncatedHeader)?;
            usize::from(u16::from_le_bytes(b))
        }
        (2, 0) | (3, 0) => {
            let mut b = [0u8; 4];
            read_exact_or(r, &mut b, NpyError::TruncatedHeader)?;
            usize::try_from(u32::from_le_bytes(b)).unwrap_or(usize::MAX)
        }
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    if len > MAX_HEADER_BYTES {
        return Err(NpyError::HeaderTooLong { len });
    }
    let mut raw = vec![0u8; len];
    read_exact_or(r, &mut raw, NpyError::TruncatedHeader)?;
    let text = if major == 3 {
        std::str::from_utf8(&raw).map_err(|_| bad("the header is not valid UTF-8"))?
    } else {
        if !raw.is_ascii() {
            return Err(bad("a version 1.0/2.0 header must be ASCII"));
        }
        std::str::from_utf8(&raw).map_err(|_| bad("the header is not ASCII"))?
    };
    let (descr, fortran, shape) = parse_dict(text)?;
    if fortran {
        return Err(NpyError::FortranOrder);
    }
    let dtype = match descr.as_str() {
        "<f2" => Dtype::F16,
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        ">f2" | ">f4" | ">f8" => {
            return Err(NpyError::UnsupportedDtype { descr, hint: "big-endian data is not supported; save a.astype('<f4')" })
        }
        _ => {
            return Err(NpyError::UnsupportedDtype {
                descr,
                hint: "only little-endian float16, float32 and float64 are supported; save a.astype(numpy.float32)",
            })
        }
    };
    let header = Header { version: (major, minor), dtype, shape };
    if header.data_bytes().is_none() {
        return Err(NpyError::ShapeOverflow { shape: header.shape });
    }
    Ok(header)
}

/// Reads a whole `.npy` stream as f32: `<f4` as is, `<f2` converted exactly. `<f8` is refused
/// ([`NpyError::UnsupportedDtype`]) because narrowing loses precision. `r` must end right after the
/// data.
pub fn read_f32<R: Read + ?Sized>(r: &mut R) -> Result<Array<f32>, NpyError> {
    let h = read_header(r)?;
    if h.dtype == Dtype::F64 {
        return Err(NpyError::UnsupportedDtype {
            descr: h.dtype.descr().to_owned(),
            hint: "float64 is not narrowed silently; save a.astype(numpy.float32)",
        });
    }
    let data = read_data(r, &h, |dtype, bytes, out: &mut Vec<f32>| match dtype {
        Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        Dtype::F64 => {}
    })?;
    Ok(Array { stored: h.dtype, shape: h.shape, data })
}

/// Reads a whole `.npy` stream as f64 (every supported dtype converts exactly). `r` must end right
/// after the data.
pub fn read_f64<R: Read + ?Sized>(r: &mut R) -> Result<Array<f64>, NpyError> {
    let h = read_header(r)?;
    let data = read_data(r, &h, |dtype, bytes, out: &mut Vec<f64>| match dtype {
        Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))),
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        Dtype::F64 => out.extend(bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))),
    })?;
    Ok(Array { stored: h.dtype, shape: h.shape, data })
}

/// Opens `path` and reads it with [`read_f32`].
pub fn read_f32_file(path: impl AsRef<Path>) -> Result<Array<f32>, NpyError> {
    read_f32(&mut BufReader::with_capacity(READ_CHUNK, File::open(path)?))
}

/// Opens `path` and reads it with [`read_f64`].
pub fn read_f64_file(path: impl AsRef<Path>) -> Result<Array<f64>, NpyError> {
    read_f64(&mut BufReader::with_capacity(READ_CHUNK, File::open(path)?))
}

/// Writes `data` (row-major, `product(shape)` values) as a float32 `.npy` file: version 1.0, or 2.0
/// when the header needs more than 65535 bytes.
pub fn write_f32<W: Write + ?Sized>(w: &mut W, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel != Some(data.len()) {
        return Err(NpyError::LengthMismatch { shape: shape.to_vec(), len: data.len() });
    }
    w.write_all(&header_bytes(Dtype::F32, shape))?;
    let mut buf = Vec::with_capacity(READ_CHUNK.min(data.len() * 4));
    for chunk in data.chunks(READ_CHUNK / 4) {
        buf.clear();
        chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// The preamble and padded header for an array of `dtype` and `shape`, in C order.
pub fn header_bytes(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => String::new(),
        [one] => format!("{one},"),
        _ => shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': ({dims}), }}", dtype.descr());
    let (version, prefix) = if dict.len() + 1 + 10 <= usize::from(u16::MAX) { (1u8, 10) } else { (2u8, 12) };
    // Pad with spaces so that the data starts at a multiple of 64, then end with '\n'.
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    while prefix + dict.len() + 1 < total {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        // The branch condition guarantees the length fits in u16.
        out.extend_from_slice(&u16::try_from(dict.len()).unwrap_or(u16::MAX).to_le_bytes());
    } else {
        out.extend_from_slice(&u32::try_from(dict.len()).unwrap_or(u32::MAX).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out
}

fn bad(reason: impl Into<String>) -> NpyError {
    NpyError::BadHeader { reason: reason.into() }
}

fn read_exact_or<R: Read + ?Sized>(r: &mut R, buf: &mut [u8], eof: NpyError) -> Result<(), NpyError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(eof),
        Err(e) => Err(NpyError::Io(e)),
    }
}

/// Streams the data in chunks (no allocation beyond what is actually read), converting with `conv`,
/// then checks that nothing follows.
fn read_data<R: Read + ?Sized, T>(r: &mut R, h: &Header, conv: impl Fn(Dtype, &[u8], &mut Vec<T>)) -> Result<Vec<T>, NpyError> {
    let expected = h.data_bytes().ok_or_else(|| NpyError::ShapeOverflow { shape: h.shape.clone() })?;
    let item = h.dtype.size();
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut got: u64 = 0;
    while got < expected {
        let want = usize::try_from((expected - got).min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        let mut filled = 0;
        while filled < want {
            match r.read(&mut buf[filled..want]) {
                Ok(0) => return Err(NpyError::TruncatedData { expected, got: got + filled as u64 }),
                Ok(k) => filled += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NpyError::Io(e)),
            }
        }
        // READ_CHUNK is a multiple of every item size, so chunks never split an element.
        debug_assert_eq!(filled % item, 0);
        conv(h.dtype, &buf[..filled], &mut out);
        got += filled as u64;
    }
    let mut probe = [0u8; 64];
    loop {
        match r.read(&mut probe) {
            Ok(0) => break,
            Ok(k) => return Err(NpyError::TrailingBytes { extra: k as u64 }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NpyError::Io(e)),
        }
    }
    Ok(out)
}

/// A value in the header dict.
#[derive(Debug)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses the header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` followed
/// by optional spaces and a newline.
fn parse_dict(text: &str) -> Result<(String, bool, Vec<usize>), NpyError> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    p.ws();
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = p.value()?;
        let slot_taken = match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", Value::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", Value::Tuple(t)) => shape.replace(t).is_some(),
            ("descr" | "fortran_order" | "shape", v) => return Err(bad(format!("key {key:?} has a value of the wrong type: {v:?}"))),
            _ => return Err(bad(format!("unexpected key {key:?}; a .npy header has only descr, fortran_order and shape"))),
        };
        if slot_taken {
            return Err(bad(format!("key {key:?} appears twice")));
        }
        p.ws();
        if p.eat(b',') {
            continue;
        }
        p.ws();
        p.expect(b'}')?;
        break;
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(bad("unexpected text after the header dict"));
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err(bad("the header must have the keys descr, fortran_order and shape")),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), NpyError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(bad(format!("expected {:?} at byte {}", char::from(c), self.i)))
        }
    }

    fn string(&mut self) -> Result<String, NpyError> {
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(bad(format!("expected a quoted string at byte {}", self.i))),
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != quote {
            if self.s[self.i] == b'\\' {
                return Err(bad("escapes in header strings are not supported"));
            }
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err(bad("unterminated string"));
        }
        let v = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| bad("string is not UTF-8"))?.to_owned();
        self.i += 1;
        Ok(v)
    }

    fn word(&mut self, w: &str) -> bool {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Value, NpyError> {
        match self.s.get(self.i) {
            Some(b'\'' | b'"') => Ok(Value::Str(self.string()?)),
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    self.ws();
                    if self.eat(b')') {
                        break;
                    }
                    if dims.len() >= MAX_DIMS {
                        return Err(bad(format!("more than {MAX_DIMS} dimensions")));
                    }
                    dims.push(self.int()?);
                    self.ws();
                    if self.eat(b',') {
                        continue;
                    }
                    self.expect(b')')?;
                    // `(5)` is an int in Python, not a tuple.
                    if dims.len() == 1 {
                        return Err(bad("a one-dimensional shape must be written (n,)"));
                    }
                    break;
                }
                Ok(Value::Tuple(dims))
            }
            _ if self.word("True") => Ok(Value::Bool(true)),
            _ if self.word("False") => Ok(Value::Bool(false)),
            _ => Err(bad(format!("unexpected value at byte {}", self.i))),
        }
    }

    fn int(&mut self) -> Result<usize, NpyError> {
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
        if digits.is_empty() {
            return Err(bad(format!("expected a non-negative integer at byte {start}")));
        }
        // Python 2 era files may write `3L`.
        self.eat(b'L');
        digits.parse().map_err(|_| bad(format!("dimension {digits} is too large")))
    }
}

#[cfg(test)]
mod tests;
