//! The validated adapter: config, optional metadata, tensors (read from the file on demand, so a
//! large adapter is never held twice in memory), opening with full validation, and atomic writing
//! in either container.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{is_gguf_container_key, keys, stringify_metadata, AdapterConfig, Container, Metadata, SpecVersion};
use crate::container::safetensors::Q8_SCALE_SUFFIX;
use crate::container::{self, gguf, safetensors, RawFile};
use crate::dtype::{DType, Q8_BLOCK, Q8_BLOCK_BYTES};
use crate::error::FormatError;
use crate::meta::{MetaValue, META_TYPES_KEY};
use crate::names::{Role, Scope, TensorName};
use crate::report::{Code, Finding, Report};
use crate::validate::{self, first_large, first_non_finite, BaseModelInfo};

/// Where a tensor's bytes live.
#[derive(Debug, Clone)]
enum TensorData {
    /// A byte range of an open file, read on demand.
    File { file: Arc<File>, offset: u64, len: u64 },
    /// Bytes in memory.
    Memory(Arc<Vec<u8>>),
    /// A Q8_0 tensor of a safetensors file, stored as two tensors: the signed bytes (`I8`, row-major)
    /// and one F16 scale per block of 32 (spec 1.1); read back as ggml blocks.
    Q8Pair { values: Box<TensorData>, scales: Box<TensorData> },
}

impl TensorData {
    /// The bytes (read from the file when file-backed); a Q8_0 pair interleaved into ggml blocks.
    fn read(&self) -> std::io::Result<Cow<'_, [u8]>> {
        match self {
            TensorData::Memory(b) => Ok(Cow::Borrowed(b.as_slice())),
            TensorData::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; *len as usize];
                file.read_exact_at(&mut buf, *offset)?;
                Ok(Cow::Owned(buf))
            }
            TensorData::Q8Pair { values, scales } => Ok(Cow::Owned(q8_blocks(&values.read()?, &scales.read()?))),
        }
    }
}

/// ggml Q8_0 blocks from the two halves a safetensors file stores: per block, its F16 scale then
/// its 32 signed bytes. The lengths were checked when the pair was parsed (32 values per scale).
fn q8_blocks(values: &[u8], scales: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_BLOCK * Q8_BLOCK_BYTES);
    for (q, d) in values.chunks_exact(Q8_BLOCK).zip(scales.chunks_exact(2)) {
        out.extend_from_slice(d);
        out.extend_from_slice(q);
    }
    out
}

/// The two halves of ggml Q8_0 blocks as a safetensors file stores them: the signed bytes of every
/// block in order, and the F16 scales in order.
pub(crate) fn q8_split(blocks: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = blocks.len() / Q8_BLOCK_BYTES;
    let (mut values, mut scales) = (Vec::with_capacity(n * Q8_BLOCK), Vec::with_capacity(n * 2));
    for b in blocks.chunks_exact(Q8_BLOCK_BYTES) {
        scales.extend_from_slice(&b[..2]);
        values.extend_from_slice(&b[2..]);
    }
    (values, scales)
}

/// One adapter tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    name: TensorName,
    dtype: DType,
    shape: Vec<u64>,
    data: TensorData,
}

impl Tensor {
    /// A tensor from little-endian bytes in memory (ggml blocks for Q8_0). Fails if the byte length
    /// is not [`DType::data_bytes`] of the shape (or a Q8_0 row is not whole blocks).
    pub fn from_bytes(name: TensorName, dtype: DType, shape: Vec<u64>, bytes: Vec<u8>) -> Result<Tensor, FormatError> {
        if dtype.data_bytes(&shape) != Some(bytes.len() as u64) {
            return Err(FormatError::TensorSize { name: name.to_string(), dtype, shape, bytes: bytes.len() });
        }
        Ok(Tensor { name, dtype, shape, data: TensorData::Memory(Arc::new(bytes)) })
    }

    /// A tensor from f32 values, stored as `dtype` (rounded to nearest even for F16/BF16, ggml's
    /// quantization for Q8_0).
    pub fn from_f32(name: TensorName, dtype: DType, shape: Vec<u64>, values: &[f32]) -> Result<Tensor, FormatError> {
        Tensor::from_bytes(name, dtype, shape, dtype.encode(values))
    }

    /// The spec name.
    pub fn name(&self) -> TensorName {
        self.name
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The row-major shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Number of data bytes (as GGUF stores them: ggml blocks for Q8_0).
    pub fn byte_len(&self) -> u64 {
        // Every constructor checked the shape against the dtype.
        self.dtype.data_bytes(&self.shape).unwrap_or(0)
    }

    /// The little-endian data bytes, as GGUF stores them (read from the file if the tensor is
    /// file-backed; a Q8_0 tensor as ggml blocks whichever container it came from).
    pub fn bytes(&self) -> std::io::Result<Cow<'_, [u8]>> {
        self.data.read()
    }

    /// The values as f32 (exact for every allowed dtype).
    pub fn to_f32(&self) -> std::io::Result<Vec<f32>> {
        Ok(self.dtype.decode(&self.bytes()?))
    }

    /// This tensor stored as another dtype (values rounded to nearest even when narrowing, ggml's
    /// quantization for Q8_0). Fails with [`std::io::ErrorKind::InvalidInput`] for Q8_0 when the
    /// rows are not whole blocks of 32 values ([`DType::data_bytes`]).
    pub fn to_dtype(&self, dtype: DType) -> std::io::Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if dtype.data_bytes(&self.shape).is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: shape {:?} cannot be {dtype} (rows must be whole blocks of {} values)",
                    self.name,
                    self.shape,
                    dtype.block_len()
                ),
            ));
        }
        let values = self.to_f32()?;
        Ok(Tensor { name: self.name, dtype, shape: self.shape.clone(), data: TensorData::Memory(Arc::new(dtype.encode(&values))) })
    }
}

/// A valid IAPT adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    config: AdapterConfig,
    extras: Metadata,
    tensors: Vec<Tensor>,
    warnings: Vec<Finding>,
    source: Option<(PathBuf, Container)>,
}

/// What validating a file found: the report, and the adapter when the file is valid.
#[derive(Debug)]
pub struct Validation {
    /// Every finding.
    pub report: Report,
    /// The container, when it could be recognised.
    pub container: Option<Container>,
    /// The adapter, when the report has no error.
    pub adapter: Option<Adapter>,
}

impl Adapter {
    /// Opens and validates an adapter file (container detected by content). Warnings are kept in
    /// [`Adapter::warnings`]; any error fails with [`FormatError::Invalid`] carrying the full report.
    pub fn open(path: impl AsRef<Path>) -> Result<Adapter, FormatError> {
        let path = path.as_ref();
        let v = validate_file(path, None);
        match v.adapter {
            Some(a) => Ok(a),
            None if v.report.has(Code::Unreadable) => {
                Err(FormatError::Io { path: path.to_owned(), source: std::io::Error::other(v.report.to_string()) })
            }
            None => Err(FormatError::Invalid { path: path.to_owned(), report: v.report }),
        }
    }

    /// Builds an adapter from parts, applying every spec rule. Tensors are put in canonical order.
    pub fn from_parts(config: AdapterConfig, extras: Metadata, tensors: Vec<Tensor>) -> Result<Adapter, Report> {
        let mut report = Report::default();
        let mut meta = config.to_metadata();
        for (k, _) in &extras {
            let owned =
                meta.iter().any(|(m, _)| m == k) || k.starts_with("iapt.rational.") || is_gguf_container_key(k) || k == META_TYPES_KEY;
            if owned {
                report.push(Finding::about(
                    Code::DuplicateKey,
                    k.clone(),
                    "optional metadata repeats a key the config or container owns; drop it",
                ));
            }
        }
        meta.extend(extras.iter().cloned());
        let raw = RawFile {
            container: Container::Safetensors,
            metadata: Vec::new(),
            tensors: tensors
                .iter()
                .map(|t| container::RawTensor {
                    name: t.name.to_string(),
                    dtype: Some(t.dtype),
                    dtype_label: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    start: 0,
                    len: t.byte_len(),
                    in_bounds: false,
                    scales: None,
                })
                .collect(),
        };
        let mut seen = std::collections::HashSet::with_capacity(raw.tensors.len());
        for t in &raw.tensors {
            if !seen.insert(t.name.as_str()) {
                report.push(Finding::about(Code::DuplicateTensor, t.name.clone(), "tensor given more than once"));
            }
        }
        let checked = validate::check(&meta, Container::Safetensors, &raw, &mut report);
        for t in &tensors {
            match t.bytes() {
                Ok(b) => {
                    if let Some(f) = value_findings(t.dtype, &b, &t.name.to_string()) {
                        report.push(f);
                    }
                }
                Err(e) => report.push(Finding::about(Code::Unreadable, t.name.to_string(), format!("cannot read tensor data: {e}"))),
            }
        }
        match checked.config {
            Some(config) if !report.has_errors() => {
                let mut tensors = tensors;
                tensors.sort_by_key(|t| t.name.canonical_key());
                let warnings = report.warnings().cloned().collect();
                let mut extras = checked.extras;
                extras.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(Adapter { config, extras, tensors, warnings, source: None })
            }
            _ => Err(report),
        }
    }

    /// The typed configuration.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Optional metadata keys (provenance and anything else), sorted by key.
    pub fn extras(&self) -> &Metadata {
        &self.extras
    }

    /// Sets (or replaces) an optional metadata key. Keys the config or the containers own (the
    /// required `iapt.*` keys, `iapt.rational.*`, `general.type`, `adapter.type`,
    /// `general.architecture`, `general.alignment`, `iapt.meta_types`) are refused.
    pub fn set_extra(&mut self, key: &str, value: MetaValue) -> Result<(), FormatError> {
        let owned = self.config.to_metadata().iter().any(|(k, _)| k == key)
            || key.starts_with("iapt.rational.")
            || is_gguf_container_key(key)
            || key == META_TYPES_KEY;
        if owned {
            return Err(FormatError::ReservedKey { key: key.to_owned() });
        }
        if let Some(slot) = self.extras.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.extras.push((key.to_owned(), value));
            self.extras.sort_by(|a, b| a.0.cmp(&b.0));
        }
        Ok(())
    }

    /// Warnings found when the adapter was opened (newer minor version, unknown optional keys).
    pub fn warnings(&self) -> &[Finding] {
        &self.warnings
    }

    /// The file and container this adapter was read from, if any.
    pub fn source(&self) -> Option<(&Path, Container)> {
        self.source.as_ref().map(|(p, c)| (p.as_path(), *c))
    }

    /// Tensors in canonical order (shared first, then layer by layer).
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensor layer `layer` uses for `role`: the per-layer one, else the shared one.
    pub fn tensor(&self, layer: u32, role: Role) -> Option<&Tensor> {
        // Tensors are kept in canonical order: a binary search, not a scan per lookup.
        let find = |name: TensorName| {
            self.tensors.binary_search_by_key(&name.canonical_key(), |t| t.name.canonical_key()).ok().map(|i| &self.tensors[i])
        };
        find(TensorName::layer(layer, role)).or_else(|| find(TensorName::shared(role)))
    }

    /// Whether `role` is stored once for all layers.
    pub fn is_shared(&self, role: Role) -> bool {
        self.tensors.iter().any(|t| t.name.scope == Scope::Shared && t.name.role == role)
    }

    /// Total number of parameters stored (shared tensors counted once).
    pub fn param_count(&self) -> u64 {
        self.tensors.iter().map(Tensor::numel).sum()
    }

    /// Total tensor data bytes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(Tensor::byte_len).sum()
    }

    /// This adapter with its tensors stored as `dtype`. To a float dtype every tensor is converted
    /// (a Q8_0 one decoded exactly first). To Q8_0 only the matrices (`down.weight`, `up.weight`)
    /// whose rows are whole blocks of 32 are quantized; every other tensor keeps its dtype, as
    /// llama.cpp's quantizer keeps small and 1-D tensors (the biases, `pool.query` and the rational
    /// coefficients are a few hundred values per layer). A file with a Q8_0 tensor says spec 1.1.
    pub fn with_dtype(&self, dtype: DType) -> std::io::Result<Adapter> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| match dtype {
                DType::Q8_0 if !(t.name.role.is_matrix() && dtype.data_bytes(&t.shape).is_some()) => Ok(t.clone()),
                _ => t.to_dtype(dtype),
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut config = self.config.clone();
        if tensors.iter().any(|t| t.dtype == DType::Q8_0) && config.spec_version < SpecVersion::V1_1 {
            config.spec_version = SpecVersion::V1_1;
        }
        Ok(Adapter { config, tensors, ..self.clone() })
    }

    /// Typed metadata as written to GGUF, in canonical order: container keys, required keys in
    /// spec order, then optional keys sorted by name.
    pub fn gguf_metadata(&self) -> Metadata {
        let mut m: Metadata = vec![
            (keys::GENERAL_ARCHITECTURE.to_owned(), MetaValue::Str(self.config.base_model_arch.clone())),
            (keys::GENERAL_TYPE.to_owned(), MetaValue::Str("adapter".to_owned())),
            (keys::ADAPTER_TYPE.to_owned(), MetaValue::Str("iapt".to_owned())),
        ];
        m.extend(self.config.to_metadata());
        m.extend(self.extras.iter().cloned());
        m
    }

    /// String metadata as written to safetensors (sorted by key when written).
    pub fn safetensors_metadata(&self) -> Vec<(String, String)> {
        let mut m = self.config.to_metadata();
        m.extend(self.extras.iter().cloned());
        stringify_metadata(&m)
    }

    /// Writes the adapter in `container` to `w`, streaming one tensor's bytes at a time.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W, container: Container) -> std::io::Result<()> {
        // Headers need only names, shapes and lengths; data is read and written tensor by tensor.
        match container {
            Container::Gguf => {
                let infos: Vec<gguf::WriteTensor<'_>> = self
                    .tensors
                    .iter()
                    .map(|t| gguf::WriteTensor {
                        name: t.name.to_string(),
                        shape: &t.shape,
                        ggml_type: t.dtype.ggml_type(),
                        len: t.byte_len(),
                    })
                    .collect();
                let (head, _) = gguf::header(&self.gguf_metadata(), &infos);
                w.write_all(&head)?;
                let zeros = [0u8; container::GGUF_DEFAULT_ALIGNMENT as usize];
                for t in &self.tensors {
                    let b = t.bytes()?;
                    w.write_all(&b)?;
                    let a = container::GGUF_DEFAULT_ALIGNMENT as usize;
                    w.write_all(&zeros[..(a - b.len() % a) % a])?;
                }
            }
            Container::Safetensors => {
                // A Q8_0 tensor is two entries (spec 1.1): its signed bytes as `I8` under its own
                // name, then its scales as `F16` under the name + `_scale`.
                let mut infos: Vec<safetensors::WriteTensor<'_>> = Vec::with_capacity(self.tensors.len());
                for t in &self.tensors {
                    let name = t.name.to_string();
                    if t.dtype == DType::Q8_0 {
                        let blocks = t.byte_len() / Q8_BLOCK_BYTES as u64;
                        let rows = t.shape.first().copied().unwrap_or(1);
                        infos.push(safetensors::WriteTensor {
                            name: name.clone(),
                            shape: Cow::Borrowed(&t.shape),
                            dtype: "I8",
                            len: blocks * Q8_BLOCK as u64,
                        });
                        infos.push(safetensors::WriteTensor {
                            name: format!("{name}{Q8_SCALE_SUFFIX}"),
                            shape: Cow::Owned(vec![rows, blocks / rows.max(1)]),
                            dtype: "F16",
                            len: blocks * 2,
                        });
                    } else {
                        infos.push(safetensors::WriteTensor {
                            name,
                            shape: Cow::Borrowed(&t.shape),
                            dtype: t.dtype.safetensors_name(),
                            len: t.byte_len(),
                        });
                    }
                }
                w.write_all(&safetensors::header(&self.safetensors_metadata(), &infos))?;
                for t in &self.tensors {
                    let b = t.bytes()?;
                    if t.dtype == DType::Q8_0 {
                        let (values, scales) = q8_split(&b);
                        w.write_all(&values)?;
                        w.write_all(&scales)?;
                    } else {
                        w.write_all(&b)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The whole file in `container`, in memory (for tests and small adapters).
    pub fn to_bytes(&self, container: Container) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out, container)?;
        Ok(out)
    }

    /// Writes the adapter to `path` atomically: a temporary file in the same directory, synced,
    /// then renamed over `path`. On any failure `path` is untouched and no temporary is left.
    pub fn save(&self, path: impl AsRef<Path>, container: Container) -> Result<(), FormatError> {
        write_atomically(path.as_ref(), |w| self.write_to(w, container))
    }
}

/// Runs `write` into a temporary file next to `path`, then renames it into place.
///
/// The temporary is named as [`crate::temp`] describes and registered as in flight while it
/// exists (a signal handler can remove it); stale temporaries a killed process left in the same
/// directory are removed first.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), FormatError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let io = |source| FormatError::Io { path: path.to_owned(), source };
    crate::temp::remove_stale(&dir);
    let tmp = tempfile::Builder::new().prefix(&crate::temp::temp_prefix()).tempfile_in(&dir).map_err(io)?;
    let _in_flight = crate::temp::register(tmp.path());
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    // tempfile creates 0600; an adapter is an ordinary output file, readable like any other.
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Validates a file: structure, every spec rule, finiteness of every tensor, and (with `base`)
/// compatibility with a base model. Never panics on any input; I/O failures become `E001`.
pub fn validate_file(path: &Path, base: Option<&BaseModelInfo>) -> Validation {
    match File::open(path) {
        Ok(file) => validate_opened(file, path, base),
        Err(e) => {
            let mut report = Report::default();
            report.push(Finding::file(Code::Unreadable, format!("cannot open {}: {e}", path.display())));
            Validation { report, container: None, adapter: None }
        }
    }
}

/// [`validate_file`] on a file the caller opened (a server confines its opens to a directory);
/// `path` names it in messages. The adapter's tensors stay in the file and are read when used, so
/// validating costs no copy of the file in memory.
pub fn validate_opened(file: File, path: &Path, base: Option<&BaseModelInfo>) -> Validation {
    let mut report = Report::default();
    let raw = match container::parse_file(&file, &mut report) {
        Ok(Some(raw)) => raw,
        Ok(None) => return Validation { report, container: None, adapter: None },
        Err(e) => {
            report.push(Finding::file(Code::Unreadable, format!("cannot read {}: {e}", path.display())));
            return Validation { report, container: None, adapter: None };
        }
    };
    let file = Arc::new(file);
    let container = raw.container;
    let adapter = build(raw, &mut report, |start, len| TensorData::File { file: file.clone(), offset: start, len }, base);
    let adapter = adapter.map(|mut a| {
        a.source = Some((path.to_owned(), container));
        a
    });
    Validation { report, container: Some(container), adapter }
}

/// Validates a whole file held in memory (used by fuzzing and tests).
pub fn validate_bytes(bytes: &[u8]) -> Validation {
    let mut report = Report::default();
    let Some(raw) = container::parse(bytes, &mut report) else {
        return Validation { report, container: None, adapter: None };
    };
    let container = raw.container;
    let adapter =
        build(raw, &mut report, |start, len| TensorData::Memory(Arc::new(bytes[start as usize..(start + len) as usize].to_vec())), None);
    Validation { report, container: Some(container), adapter }
}

fn build(raw: RawFile, report: &mut Report, data: impl Fn(u64, u64) -> TensorData, base: Option<&BaseModelInfo>) -> Option<Adapter> {
    let typed = validate::typed_metadata(&raw, report);
    let checked = validate::check(&typed, raw.container, &raw, report);
    let mut tensors = Vec::with_capacity(checked.named.len());
    for (name, i) in &checked.named {
        let t = &raw.tensors[*i];
        let (Some(dtype), true) = (t.dtype, t.in_bounds) else { continue };
        let tensor_data = match t.scales {
            // A safetensors Q8_0 pair: `len` is the blocks' size, the values are 32 of every 34 bytes.
            Some((s_start, s_len)) => TensorData::Q8Pair {
                values: Box::new(data(t.start, t.len / Q8_BLOCK_BYTES as u64 * Q8_BLOCK as u64)),
                scales: Box::new(data(s_start, s_len)),
            },
            None => data(t.start, t.len),
        };
        let tensor = Tensor { name: *name, dtype, shape: t.shape.clone(), data: tensor_data };
        match tensor.bytes() {
            Ok(b) => {
                if let Some(f) = value_findings(dtype, &b, &t.name) {
                    report.push(f);
                }
            }
            Err(e) => report.push(Finding::about(Code::Unreadable, t.name.clone(), format!("cannot read tensor data: {e}"))),
        }
        tensors.push(tensor);
    }
    if let (Some(b), Some(cfg)) = (base, &checked.config) {
        for f in b.check(cfg) {
            report.push(f);
        }
    }
    let config = checked.config?;
    if report.has_errors() {
        return None;
    }
    tensors.sort_by_key(|t| t.name.canonical_key());
    let mut extras = checked.extras;
    extras.sort_by(|a, b| a.0.cmp(&b.0));
    Some(Adapter { config, extras, tensors, warnings: report.warnings().cloned().collect(), source: None })
}

/// What a tensor's values break: E207 for a NaN or an infinity, else W003 for a magnitude beyond
/// [`crate::MAX_WEIGHT_ABS`].
fn value_findings(dtype: DType, data: &[u8], name: &str) -> Option<Finding> {
    if let Some(bad) = first_non_finite(dtype, data) {
        return Some(Finding::about(Code::NonFinite, name, format!("element {bad} is NaN or infinite; adapters must hold finite values")));
    }
    first_large(dtype, data).map(|(i, v)| {
        Finding::about(
            Code::LargeWeight,
            name,
            format!(
                "element {i} is {v:e}, beyond +-65504 (the largest F16 value): no trained adapter needs it and the generator overflows f32 with it; runtimes refuse this adapter"
            ),
        )
    })
}
