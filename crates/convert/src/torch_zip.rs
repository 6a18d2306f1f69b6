//! `torch.save` files: a zip archive `{name}/data.pkl` (the pickle, read with [`crate::pickle`]),
//! `{name}/byteorder` (`little` or `big`; absent in files older than PyTorch 1.10, which were all
//! little-endian) and one stored (uncompressed) entry `{name}/data/{key}` per storage.
//!
//! Tensors are read on demand, one at a time: only the byte range a view needs is read from its
//! storage entry, then gathered into row-major order and byte-swapped to little-endian. Every size
//! taken from the file is checked against the archive's real length before anything is allocated.

use std::io::{self, Read, Seek, SeekFrom};

use crate::pickle::{self, PickleError, StateDict, TensorRef};

/// Largest `data.pkl` accepted (state_dict pickles are kilobytes to a few megabytes).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// The byte order of a checkpoint's storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    /// Little-endian (every common machine).
    Little,
    /// Big-endian (s390x, some POWER).
    Big,
}

/// Why a `torch.save` zip could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TorchZipError {
    /// Reading the file failed.
    #[error("cannot read the checkpoint: {0}")]
    Io(#[from] io::Error),
    /// The zip structure is damaged.
    #[error("the checkpoint is not a readable zip archive ({0}); re-save it with torch.save")]
    Zip(String),
    /// No `*/data.pkl` entry, or more than one.
    #[error("the zip has {found} `<name>/data.pkl` entries (a torch.save file has exactly one); is this a torch checkpoint?")]
    NoPickle {
        /// How many were found.
        found: usize,
    },
    /// The pickle was refused or is malformed.
    #[error(transparent)]
    Pickle(#[from] PickleError),
    /// The `byteorder` entry holds something other than `little` or `big`.
    #[error("the byteorder entry says {0:?}; expected \"little\" or \"big\"")]
    ByteOrder(String),
    /// An entry is larger than this reader accepts.
    #[error("entry {entry} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The entry.
        entry: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A storage named by the pickle has no zip entry.
    #[error("storage {key:?} is named by the pickle but has no entry data/{key} in the zip; the file is incomplete")]
    MissingStorage {
        /// The storage key.
        key: String,
    },
    /// A storage entry is compressed; torch.save stores them uncompressed.
    #[error("storage entry {entry} is compressed; torch.save writes storages uncompressed, re-save the checkpoint with torch.save")]
    CompressedStorage {
        /// The entry.
        entry: String,
    },
    /// A storage entry's size disagrees with the pickle, or runs past the end of the file.
    #[error("storage entry {entry} holds {size} bytes but the pickle says {numel} elements of {item} bytes (or the file is truncated)")]
    StorageSize {
        /// The entry.
        entry: String,
        /// Its size in bytes.
        size: u64,
        /// Elements the pickle declares.
        numel: u64,
        /// Bytes per element.
        item: usize,
    },
    /// A tensor's view reaches outside its storage, or is a broadcast (more elements than storage).
    #[error(
        "tensor view (offset {offset}, shape {shape:?}, stride {stride:?}) does not fit in its storage of {numel} elements; \
         call .contiguous() on it before saving"
    )]
    BadView {
        /// Storage offset.
        offset: u64,
        /// Sizes.
        shape: Vec<u64>,
        /// Strides.
        stride: Vec<u64>,
        /// Storage elements.
        numel: u64,
    },
}

impl From<zip::result::ZipError> for TorchZipError {
    fn from(e: zip::result::ZipError) -> Self {
        match e {
            zip::result::ZipError::Io(e) => TorchZipError::Io(e),
            other => TorchZipError::Zip(other.to_string()),
        }
    }
}

/// An open `torch.save` checkpoint.
pub struct TorchZip<R: Read + Seek> {
    archive: zip::ZipArchive<R>,
    prefix: String,
    byteorder: ByteOrder,
    file_len: u64,
    state: StateDict,
}

impl<R: Read + Seek> std::fmt::Debug for TorchZip<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchZip").field("prefix", &self.prefix).field("byteorder", &self.byteorder).finish_non_exhaustive()
    }
}

impl<R: Read + Seek> TorchZip<R> {
    /// Opens the archive and reads its pickle (storages are read later, on demand).
    pub fn new(mut reader: R) -> Result<Self, TorchZipError> {
        let file_len = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let mut archive = zip::ZipArchive::new(reader)?;
        let pickles: Vec<String> = archive
            .file_names()
            .filter(|n| n.strip_suffix("data.pkl").is_some_and(|p| p.ends_with('/') && p.matches('/').count() == 1))
            .map(str::to_owned)
            .collect();
        let [pkl] = pickles.as_slice() else { return Err(TorchZipError::NoPickle { found: pickles.len() }) };
        let prefix = pkl.trim_end_matches("data.pkl").to_owned();
        let bytes = read_entry(&mut archive, pkl, MAX_PICKLE_BYTES, file_len)?;
        let state = pickle::read_state_dict(&bytes)?;
        drop(bytes);
        let order_name = format!("{prefix}byteorder");
        let byteorder = if archive.index_for_name(&order_name).is_some() {
            let b = read_entry(&mut archive, &order_name, 16, file_len)?;
            match b.as_slice() {
                b"little" => ByteOrder::Little,
                b"big" => ByteOrder::Big,
                other => return Err(TorchZipError::ByteOrder(String::from_utf8_lossy(other).into_owned())),
            }
        } else {
            ByteOrder::Little
        };
        Ok(TorchZip { archive, prefix, byteorder, file_len, state })
    }

    /// The tensors of the state_dict, in file order.
    pub fn tensors(&self) -> &[(String, TensorRef)] {
        &self.state.tensors
    }

    /// Keys of the state_dict whose values are not tensors.
    pub fn skipped(&self) -> &[String] {
        &self.state.skipped
    }

    /// The byte order the file records.
    pub fn byteorder(&self) -> ByteOrder {
        self.byteorder
    }

    /// Reads one tensor as row-major little-endian bytes of its storage's dtype.
    pub fn read_tensor(&mut self, t: &TensorRef) -> Result<Vec<u8>, TorchZipError> {
        let item = t.storage.dtype.size();
        let bad_view =
            || TorchZipError::BadView { offset: t.offset, shape: t.shape.clone(), stride: t.stride.clone(), numel: t.storage.numel };
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(bad_view)?;
        if numel == 0 {
            return Ok(Vec::new());
        }
        // Highest element index the view touches; it and the element count must fit the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| a.checked_add(x)))
            .ok_or_else(bad_view)?;
        if last >= t.storage.numel || numel > t.storage.numel {
            return Err(bad_view());
        }
        let entry = format!("{}data/{}", self.prefix, t.storage.key);
        let storage_bytes = t.storage.numel.checked_mul(item as u64).ok_or_else(bad_view)?;
        let mut f = match self.archive.by_name(&entry) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Err(TorchZipError::MissingStorage { key: t.storage.key.clone() }),
            Err(e) => return Err(e.into()),
        };
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(TorchZipError::CompressedStorage { entry });
        }
        let size = f.size();
        if size != storage_bytes || f.data_start().checked_add(size).is_none_or(|end| end > self.file_len) {
            return Err(TorchZipError::StorageSize { entry, size, numel: t.storage.numel, item });
        }
        // Read only [offset, last] of the storage; the checks above bound this by the file length.
        let skip = t.offset * item as u64;
        let span = ((last - t.offset + 1) * item as u64) as usize;
        io::copy(&mut (&mut f).take(skip), &mut io::sink())?;
        let mut raw = vec![0u8; span];
        f.read_exact(&mut raw)?;
        drop(f);
        let mut out = if is_row_major(&t.shape, &t.stride) { raw } else { gather(&raw, &t.shape, &t.stride, item, numel as usize) };
        if self.byteorder == ByteOrder::Big && item > 1 {
            out.chunks_exact_mut(item).for_each(<[u8]>::reverse);
        }
        Ok(out)
    }
}

fn read_entry<R: Read + Seek>(archive: &mut zip::ZipArchive<R>, name: &str, limit: u64, file_len: u64) -> Result<Vec<u8>, TorchZipError> {
    let f = archive.by_name(name)?;
    let size = f.size();
    // A stored entry cannot be larger than the file; a compressed one is read with a hard cap.
    if size > limit || (f.compression() == zip::CompressionMethod::Stored && size > file_len) {
        return Err(TorchZipError::TooLarge { entry: name.to_owned(), size, limit });
    }
    let mut buf = Vec::new();
    f.take(size).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(TorchZipError::Zip(format!("entry {name} is shorter than its header says")));
    }
    Ok(buf)
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size 1 may have any stride).
fn is_row_major(shape: &[u64], stride: &[u64]) -> bool {
    let mut want = 1u64;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != want {
            return false;
        }
        want = want.saturating_mul(n);
    }
    true
}

/// Copies a strided view (relative to its first element) into row-major order.
fn gather(raw: &[u8], shape: &[u64], stride: &[u64], item: usize, numel: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(numel * item);
    let dims = shape.len();
    let mut idx = vec![0u64; dims];
    // The innermost dimension is copied as a run when contiguous, else element by element.
    for _ in 0..numel {
        let off = idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<u64>() as usize * item;
        out.extend_from_slice(&raw[off..off + item]);
        for d in (0..dims).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_detection() {
        assert!(is_row_major(&[2, 3], &[3, 1]));
        assert!(is_row_major(&[1, 3], &[99, 1]));
        assert!(!is_row_major(&[2, 3], &[1, 2]));
        assert!(is_row_major(&[], &[]));
    }

    #[test]
    fn gather_transposes() {
        // storage 0..6 as [2,3]; its transpose is shape [3,2] stride [1,3].
        let raw: Vec<u8> = (0..6).collect();
        assert_eq!(gather(&raw, &[3, 2], &[1, 3], 1, 6), vec![0, 3, 1, 4, 2, 5]);
    }
}
