//! The conversion itself: detect the input kind, list its tensors, map their names with a profile,
//! settle the hyperparameters, then read, reorder and re-type one tensor at a time, write tensors
//! that are identical in every layer once as `iapt.shared.*`, validate with every spec rule
//! ([`Adapter::from_parts`]) and only then write the output atomically.
//!
//! Memory: the converted tensors are held (they are the output); each source tensor is read just
//! before it is converted and dropped right after, so peak memory is about one output plus the
//! largest single tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use iapt_format::fingerprint;
use iapt_format::{keys, Adapter, BaseModelInfo, Container, DType, FormatError, MetaValue, Report, Role, Scope, Tensor, TensorName};

use crate::index::{self, IndexError};
use crate::infer::{self, ConfigFile, InferError};
use crate::pickle::{TensorRef, TorchDType};
use crate::profile::{Profile, ProfileError};
use crate::safetensors_in::{self, SafetensorsError, StEntry};
use crate::torch_zip::{TorchZip, TorchZipError};

/// The converter's name and version, written to `iapt.converter.version`.
pub const CONVERTER_VERSION: &str = concat!("iapt-convert ", env!("CARGO_PKG_VERSION"));

/// The dtype of the output tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// Keep each tensor's source dtype (F32, F16 or BF16).
    #[default]
    Keep,
    /// Convert every tensor (round to nearest even when narrowing); for Q8_0, quantize the matrices
    /// whose rows are whole blocks of 32 and keep the other tensors' source dtypes
    /// ([`Adapter::with_dtype`]).
    To(DType),
}

impl std::str::FromStr for DTypeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(DTypeChoice::Keep),
            other => {
                DType::from_lowercase(other).map(DTypeChoice::To).ok_or_else(|| format!("{other:?} is not keep, f32, f16, bf16 or q8_0"))
            }
        }
    }
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The hyperparameter JSON (`--config`).
    pub config: Option<PathBuf>,
    /// The name mapping (default: the reference training layout).
    pub profile: Profile,
    /// The base model's facts (`--base`), to fill and check arch, n_layer, n_embd.
    pub base: Option<BaseModelInfo>,
    /// Output dtype.
    pub dtype: DTypeChoice,
}

impl Default for Options {
    fn default() -> Self {
        Options { config: None, profile: Profile::reference(), base: None, dtype: DTypeChoice::Keep }
    }
}

/// A finished conversion.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// The validated adapter.
    pub adapter: Adapter,
    /// Checkpoint keys the profile did not map (base-model weights, buffers, optimizer state).
    pub ignored: Vec<String>,
    /// Roles written once as `iapt.shared.*` because every layer holds the same values.
    pub shared: Vec<Role>,
    /// Lowercase hex SHA-256 of the input file (the index file for a sharded checkpoint).
    pub source_sha256: String,
}

/// Why a conversion failed. Nothing is written when it fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// An input file cannot be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The input is neither a torch.save zip, safetensors, nor an index.
    #[error("{}: not a torch.save zip, a safetensors file, or a *.index.json of shards", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A legacy (pre-zip) torch file.
    #[error(
        "{}: this is a legacy (pre-1.6, non-zip) torch.save file, which is a bare pickle stream; re-save it with a current PyTorch: \
         python -c \"import torch; torch.save(torch.load('IN', weights_only=True), 'OUT.pt')\" (or save it as safetensors)",
        path.display()
    )]
    LegacyTorch {
        /// The file.
        path: PathBuf,
    },
    /// A torch.save zip could not be read, or its pickle was refused.
    #[error("{}: {source}", path.display())]
    TorchZip {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: TorchZipError,
    },
    /// A safetensors file could not be read.
    #[error("{}: {source}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: SafetensorsError,
    },
    /// The shard index could not be used.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The profile could not be used.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The hyperparameters could not be determined.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// No key of the checkpoint matched the profile.
    #[error(
        "no tensor of the checkpoint matches profile {profile:?} (keys look like {sample}); choose another with --profile, \
         or write one (converters/profiles/README.md)"
    )]
    NoTensors {
        /// The profile's name.
        profile: String,
        /// A few keys of the checkpoint.
        sample: String,
    },
    /// Two keys map to the same IAPT tensor.
    #[error("both {first:?} and {second:?} map to {name}; the checkpoint holds two generators, or the profile is too loose")]
    DuplicateMapping {
        /// The IAPT tensor.
        name: String,
        /// The first key.
        first: String,
        /// The second key.
        second: String,
    },
    /// A checkpoint has the same key twice (across shards).
    #[error("the key {key:?} appears in more than one shard")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A tensor the profile transposes is not 2-D.
    #[error("{key:?} has shape {shape:?}; the profile transposes it, which needs exactly 2 dimensions")]
    NotMatrix {
        /// The key.
        key: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// A mapped tensor's dtype cannot become an adapter dtype.
    #[error("{key:?} has dtype {dtype}; {hint}")]
    UnsupportedDType {
        /// The key.
        key: String,
        /// Its dtype.
        dtype: String,
        /// What to do.
        hint: &'static str,
    },
    /// The converted adapter breaks a spec rule.
    #[error("the converted adapter is not valid (wrong --config or profile?):\n{report}")]
    Invalid {
        /// Every finding.
        report: Report,
    },
    /// The output's extension names no container.
    #[error("{}: cannot tell the container from the extension; name the output *.safetensors or *.gguf", path.display())]
    OutputExtension {
        /// The output path.
        path: PathBuf,
    },
    /// Writing the output failed (the output path is untouched).
    #[error(transparent)]
    Write(#[from] FormatError),
}

impl ConvertError {
    /// Whether the failure is an unreadable input or unusable argument (exit code 2) rather than
    /// bad input content (exit code 1).
    pub fn is_unreadable(&self) -> bool {
        matches!(
            self,
            ConvertError::Io { .. }
                | ConvertError::OutputExtension { .. }
                | ConvertError::Index(IndexError::Io { .. })
                | ConvertError::Profile(ProfileError::Io { .. } | ProfileError::Unknown { .. })
                | ConvertError::Infer(InferError::Io { .. })
        )
    }
}

/// Where a source tensor lives.
enum Loc {
    Torch(TensorRef),
    St(StEntry),
}

/// One tensor of the input.
struct Entry {
    key: String,
    dtype: Option<TorchDType>,
    dtype_label: String,
    shape: Vec<u64>,
    shard: usize,
    loc: Loc,
}

enum Shard {
    Torch(Box<TorchZip<BufReader<File>>>),
    St(BufReader<File>),
}

/// The open shard files of an input.
struct Input {
    paths: Vec<PathBuf>,
    shards: Vec<Shard>,
}

impl Input {
    fn read(&mut self, e: &Entry) -> Result<Vec<u8>, ConvertError> {
        let path = self.paths[e.shard].clone();
        match (&mut self.shards[e.shard], &e.loc) {
            (Shard::Torch(z), Loc::Torch(t)) => z.read_tensor(t).map_err(|source| ConvertError::TorchZip { path, source }),
            (Shard::St(f), Loc::St(s)) => safetensors_in::read_tensor(f, s).map_err(|source| ConvertError::Safetensors { path, source }),
            _ => Err(ConvertError::Io { path, source: io::Error::other("internal: a tensor entry does not match its shard's kind") }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    TorchZip,
    Safetensors,
    Legacy,
}

fn sniff(path: &Path) -> Result<Kind, ConvertError> {
    let io = |source| ConvertError::Io { path: path.to_owned(), source };
    let mut head = Vec::with_capacity(512);
    File::open(path).map_err(io)?.take(512).read_to_end(&mut head).map_err(io)?;
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Kind::TorchZip);
    }
    // Legacy torch.save: a pickle stream that starts with the magic number 0x1950a86a20f9469cfc6c
    // (stored little-endian as a LONG1); the oldest ones are tar archives.
    const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let pickled_magic = head.first() == Some(&0x80) && head[..head.len().min(32)].windows(10).any(|w| w == LEGACY_MAGIC);
    if pickled_magic || head.get(257..262) == Some(b"ustar") {
        return Ok(Kind::Legacy);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(Kind::Safetensors);
    }
    Err(ConvertError::UnknownFormat { path: path.to_owned() })
}

fn open_shard(path: &Path, shard: usize, entries: &mut Vec<Entry>) -> Result<Shard, ConvertError> {
    let io = |source| ConvertError::Io { path: path.to_owned(), source };
    match sniff(path)? {
        Kind::Legacy => Err(ConvertError::LegacyTorch { path: path.to_owned() }),
        Kind::TorchZip => {
            let f = BufReader::new(File::open(path).map_err(io)?);
            let z = TorchZip::new(f).map_err(|source| ConvertError::TorchZip { path: path.to_owned(), source })?;
            for (key, t) in z.tensors() {
                entries.push(Entry {
                    key: key.clone(),
                    dtype: Some(t.storage.dtype),
                    dtype_label: t.storage.dtype.name().to_owned(),
                    shape: t.shape.clone(),
                    shard,
                    loc: Loc::Torch(t.clone()),
                });
            }
            Ok(Shard::Torch(Box::new(z)))
        }
        Kind::Safetensors => {
            let mut f = BufReader::new(File::open(path).map_err(io)?);
            let list = safetensors_in::read_header(&mut f).map_err(|source| ConvertError::Safetensors { path: path.to_owned(), source })?;
            for s in list {
                entries.push(Entry {
                    key: s.name.clone(),
                    dtype: s.dtype,
                    dtype_label: s.dtype_label.clone(),
                    shape: s.shape.clone(),
                    shard,
                    loc: Loc::St(s),
                });
            }
            Ok(Shard::St(f))
        }
    }
}

fn open_input(path: &Path) -> Result<(Input, Vec<Entry>), ConvertError> {
    if !index::is_index_path(path) {
        let mut entries = Vec::new();
        let shard = open_shard(path, 0, &mut entries)?;
        return Ok((Input { paths: vec![path.to_owned()], shards: vec![shard] }, entries));
    }
    let idx = index::read_index(path)?;
    let mut shards = Vec::with_capacity(idx.shards.len());
    let mut all = Vec::new();
    for (i, p) in idx.shards.iter().enumerate() {
        shards.push(open_shard(p, i, &mut all)?);
    }
    // Keep exactly the tensors the index assigns to each shard.
    let mut by_key: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for (i, e) in all.iter().enumerate() {
        by_key.insert((e.shard, e.key.as_str()), i);
    }
    let mut keep = vec![false; all.len()];
    for (key, shard) in &idx.weight_map {
        match by_key.get(&(*shard, key.as_str())) {
            Some(&i) => keep[i] = true,
            None => return Err(IndexError::MissingInShard { key: key.clone(), shard: idx.shards[*shard].display().to_string() }.into()),
        }
    }
    let entries = all.into_iter().zip(keep).filter_map(|(e, k)| k.then_some(e)).collect();
    Ok((Input { paths: idx.shards, shards }, entries))
}

fn sha256_file(path: &Path) -> Result<String, ConvertError> {
    let io = |source| ConvertError::Io { path: path.to_owned(), source };
    let f = File::open(path).map_err(io)?;
    Ok(fingerprint::hex(&fingerprint::sha256_file(&f).map_err(io)?))
}

/// Converts a checkpoint to a validated adapter (nothing is written). `progress` is called with
/// (source bytes converted, total source bytes) after each tensor.
pub fn convert(ckpt: &Path, opts: &Options, progress: &mut dyn FnMut(u64, u64)) -> Result<Conversion, ConvertError> {
    let cfg = match &opts.config {
        Some(p) => ConfigFile::read(p)?,
        None => ConfigFile::default(),
    };
    let (mut input, entries) = open_input(ckpt)?;

    // Map names.
    let mut mapped: BTreeMap<(Scope, Role), (usize, bool)> = BTreeMap::new();
    let mut ignored = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(m) = opts.profile.map(&e.key) else {
            ignored.push(e.key.clone());
            continue;
        };
        if let Some((first, _)) = mapped.insert((m.scope, m.role), (i, m.transpose)) {
            return Err(ConvertError::DuplicateMapping {
                name: TensorName { scope: m.scope, role: m.role }.to_string(),
                first: entries[first].key.clone(),
                second: e.key.clone(),
            });
        }
    }
    if mapped.is_empty() {
        let sample = entries.iter().take(3).map(|e| format!("{:?}", e.key)).collect::<Vec<_>>().join(", ");
        return Err(ConvertError::NoTensors { profile: opts.profile.name().to_owned(), sample });
    }

    // Shapes (after transposes) settle the config.
    let mut shapes = BTreeMap::new();
    for (&k, &(i, transpose)) in &mapped {
        let e = &entries[i];
        let shape = if transpose {
            match e.shape[..] {
                [a, b] => vec![b, a],
                _ => return Err(ConvertError::NotMatrix { key: e.key.clone(), shape: e.shape.clone() }),
            }
        } else {
            e.shape.clone()
        };
        shapes.insert(k, shape);
    }
    let config = infer::infer_config(&shapes, &cfg, opts.base.as_ref())?;

    // Convert tensor by tensor, role by role.
    let total: u64 = mapped.values().map(|&(i, _)| source_bytes(&entries[i])).sum();
    let mut done = 0u64;
    let mut tensors = Vec::with_capacity(mapped.len());
    let mut shared = Vec::new();
    for role in Role::ALL {
        let mut group: Vec<(TensorName, DType, Vec<u64>, Vec<u8>)> = Vec::new();
        for (&(scope, r), &(i, transpose)) in &mapped {
            if r != role {
                continue;
            }
            let e = &entries[i];
            let (dtype, bytes) = convert_one(&mut input, e, transpose, opts.dtype)?;
            done += source_bytes(e);
            group.push((TensorName { scope, role }, dtype, shapes[&(scope, role)].clone(), bytes));
            progress(done, total);
        }
        let per_layer = group.iter().all(|g| matches!(g.0.scope, Scope::Layer(_)));
        let same = group.windows(2).all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2 && w[0].3 == w[1].3);
        if per_layer && group.len() > 1 && same {
            group.truncate(1);
            group[0].0 = TensorName::shared(role);
            shared.push(role);
        }
        for (name, dtype, shape, bytes) in group {
            let t = Tensor::from_bytes(name, dtype, shape, bytes).map_err(ConvertError::Write)?;
            tensors.push(t);
        }
    }

    let source_sha256 = sha256_file(ckpt)?;
    let file_name = ckpt.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let extras = vec![
        (keys::SOURCE_FILE.to_owned(), MetaValue::Str(file_name)),
        (keys::SOURCE_SHA256.to_owned(), MetaValue::Str(source_sha256.clone())),
        (keys::CONVERTER_VERSION.to_owned(), MetaValue::Str(CONVERTER_VERSION.to_owned())),
    ];
    let mut adapter = Adapter::from_parts(config, extras, tensors).map_err(|report| ConvertError::Invalid { report })?;
    if opts.dtype == DTypeChoice::To(DType::Q8_0) {
        // The tensors are in memory here; reading them cannot fail.
        adapter =
            adapter.with_dtype(DType::Q8_0).map_err(|source| ConvertError::Write(FormatError::Io { path: ckpt.to_owned(), source }))?;
    }
    Ok(Conversion { adapter, ignored, shared, source_sha256 })
}

/// Converts `ckpt` and writes the adapter to `out` atomically, in the container its extension
/// names. On any failure `out` is not created (or left as it was).
pub fn convert_to_file(ckpt: &Path, out: &Path, opts: &Options, progress: &mut dyn FnMut(u64, u64)) -> Result<Conversion, ConvertError> {
    let container = Container::from_extension(out).ok_or_else(|| ConvertError::OutputExtension { path: out.to_owned() })?;
    let conv = convert(ckpt, opts, progress)?;
    conv.adapter.save(out, container)?;
    Ok(conv)
}

fn source_bytes(e: &Entry) -> u64 {
    let item = e.dtype.map_or(0, |d| d.size() as u64);
    e.shape.iter().fold(item, |a, &d| a.saturating_mul(d))
}

/// Reads one tensor, transposes it if asked, and converts it to the output dtype.
fn convert_one(input: &mut Input, e: &Entry, transpose: bool, choice: DTypeChoice) -> Result<(DType, Vec<u8>), ConvertError> {
    let unsupported = |hint| ConvertError::UnsupportedDType { key: e.key.clone(), dtype: e.dtype_label.clone(), hint };
    let src = match e.dtype {
        Some(TorchDType::F32) => Src::Spec(DType::F32),
        Some(TorchDType::F16) => Src::Spec(DType::F16),
        Some(TorchDType::BF16) => Src::Spec(DType::BF16),
        Some(TorchDType::F64) => Src::F64,
        _ => return Err(unsupported("adapter tensors are floating point (F32, F16, BF16); check the profile maps the right key")),
    };
    let target = match (choice, src) {
        // Q8_0 is applied to the finished adapter (only its matrices are quantized).
        (DTypeChoice::To(DType::Q8_0), Src::Spec(d)) => d,
        (DTypeChoice::To(DType::Q8_0), Src::F64) => DType::F32,
        (DTypeChoice::To(d), _) => d,
        (DTypeChoice::Keep, Src::Spec(d)) => d,
        (DTypeChoice::Keep, Src::F64) => return Err(unsupported("spec v1 has no F64; pass --dtype f32 (or f16, bf16)")),
    };
    let mut bytes = input.read(e)?;
    if transpose {
        if let [rows, cols] = e.shape[..] {
            bytes = transpose_bytes(&bytes, rows as usize, cols as usize, e.dtype.map_or(1, TorchDType::size));
        }
    }
    Ok((target, retype(bytes, src, target)))
}

#[derive(Clone, Copy)]
enum Src {
    Spec(DType),
    F64,
}

/// Converts little-endian elements between dtypes (exact widening; round to nearest even when narrowing).
fn retype(bytes: Vec<u8>, src: Src, target: DType) -> Vec<u8> {
    match src {
        Src::Spec(d) if d == target => bytes,
        Src::Spec(DType::BF16) if target == DType::F16 => {
            // bf16 -> f32 is exact, so this equals bf16 -> f32 -> f16 without the f32 buffer.
            let mut out = Vec::with_capacity(bytes.len());
            for c in bytes.chunks_exact(2) {
                let v = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            }
            out
        }
        Src::Spec(d) => {
            // Only the floats come here (Q8_0 is applied to the finished adapter): one element per block.
            let (ds, ts) = (d.block_bytes() as usize, target.block_bytes() as usize);
            let mut out = Vec::with_capacity(bytes.len() / ds * ts);
            // Chunked so the f32 intermediate stays small.
            let mut tmp = vec![0f32; 4096];
            for chunk in bytes.chunks(4096 * ds) {
                let n = chunk.len() / ds;
                d.decode_into(chunk, &mut tmp[..n]);
                out.extend_from_slice(&target.encode(&tmp[..n]));
            }
            out
        }
        Src::F64 => {
            let values: Vec<f32> =
                bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect();
            target.encode(&values)
        }
    }
}

fn transpose_bytes(bytes: &[u8], rows: usize, cols: usize, item: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for i in 0..rows {
        for j in 0..cols {
            let s = (i * cols + j) * item;
            let d = (j * rows + i) * item;
            out[d..d + item].copy_from_slice(&bytes[s..s + item]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps() {
        // [[1,2,3],[4,5,6]] -> [[1,4],[2,5],[3,6]]
        assert_eq!(transpose_bytes(&[1, 2, 3, 4, 5, 6], 2, 3, 1), vec![1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn retype_matches_the_format_crate() {
        let vals = [0.0f32, 1.0, -2.5, 1e-8, 65504.0, 1234.567, -0.33333334, 0.1];
        for src in DType::FLOATS {
            for dst in DType::FLOATS {
                let b = src.encode(&vals);
                let want = dst.encode(&src.decode(&b));
                assert_eq!(retype(b, Src::Spec(src), dst), want, "{src} -> {dst}");
            }
        }
    }
}
