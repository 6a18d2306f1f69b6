//! The spec v1 validation rules applied to a structurally parsed file: metadata (via `config`),
//! tensor names, the per-layer/shared sets, shapes, dtypes and finiteness, and the optional check
//! against a base model. Every finding is collected; nothing stops at the first.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{parse_config, type_safetensors_metadata, AdapterConfig, Container, Metadata, SpecVersion};
use crate::container::RawFile;
use crate::dtype::{DType, Q8_BLOCK, Q8_BLOCK_BYTES};
use crate::error::BaseModelError;
use crate::meta::MetaValue;
use crate::names::{Role, Scope, TensorName};
use crate::report::{Code, Finding, Report};

/// The result of checking a parsed file: the config (when usable), optional keys, and the tensors
/// that passed, in the raw file's indexing.
pub(crate) struct Checked {
    pub config: Option<AdapterConfig>,
    pub extras: Metadata,
    /// (parsed name, index into raw.tensors) for every tensor with a spec name.
    pub named: Vec<(TensorName, usize)>,
}

/// Typed metadata of a raw file (safetensors strings are parsed per the spec's key types).
pub(crate) fn typed_metadata(raw: &RawFile, report: &mut Report) -> Metadata {
    match raw.container {
        Container::Gguf => raw.metadata.clone(),
        Container::Safetensors => {
            let strings: Vec<(String, String)> =
                raw.metadata.iter().map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_text()))).collect();
            type_safetensors_metadata(&strings, report)
        }
    }
}

/// Applies every spec rule except finiteness (which needs the data) to a file's typed metadata and
/// tensor list. `container` selects the GGUF container-key rules.
pub(crate) fn check(typed: &Metadata, container: Container, raw: &RawFile, report: &mut Report) -> Checked {
    let (config, extras) = parse_config(typed, container, report);

    let mut named = Vec::new();
    for (i, t) in raw.tensors.iter().enumerate() {
        match TensorName::parse(&t.name) {
            Some(n) => named.push((n, i)),
            None => report.push(Finding::about(
                Code::UnexpectedTensor,
                t.name.clone(),
                "not a spec v1 tensor name (iapt.blk.{l}.{role} or iapt.shared.{role}); remove or rename it",
            )),
        }
        if t.dtype.is_none() {
            let hint = if t.dtype_label == "I8" {
                format!(
                    "I8 holds only the values of a Q8_0 matrix, with its F16 scales in {}{} beside it (spec 1.1); add them, or store F32, F16 or BF16",
                    t.name,
                    crate::container::Q8_SCALE_SUFFIX
                )
            } else {
                "store F32, F16 or BF16 (or Q8_0 for down.weight and up.weight)".to_owned()
            };
            report.push(Finding::about(Code::DTypeNotAllowed, t.name.clone(), format!("dtype {} is not allowed; {hint}", t.dtype_label)));
        }
    }
    check_q8(typed_version(&config), raw, &named, report);
    if let Some(cfg) = &config {
        check_tensor_set(cfg, raw, &named, report);
    }
    Checked { config, extras, named }
}

/// The spec version a file declares (1.0 when it cannot be read: other findings say why).
fn typed_version(config: &Option<AdapterConfig>) -> SpecVersion {
    config.as_ref().map_or(SpecVersion::V1_0, |c| c.spec_version)
}

/// Q8_0 (spec 1.1) is allowed only on the two matrices, and only in a file that says 1.1 or later
/// (a 1.0 reader refuses it with E206, so a file that says 1.0 must not need it).
fn check_q8(version: SpecVersion, raw: &RawFile, named: &[(TensorName, usize)], report: &mut Report) {
    for (n, i) in named {
        let t = &raw.tensors[*i];
        if t.dtype != Some(DType::Q8_0) {
            continue;
        }
        if !n.role.is_matrix() {
            report.push(Finding::about(
                Code::DTypeNotAllowed,
                t.name.clone(),
                format!("Q8_0 is allowed only for down.weight and up.weight, not {}; store F32, F16 or BF16", n.role),
            ));
        } else if version < SpecVersion::V1_1 {
            report.push(Finding::about(
                Code::DTypeNotAllowed,
                t.name.clone(),
                format!("Q8_0 needs spec 1.1, but iapt.spec_version is {version} (1.0 readers refuse Q8_0); write iapt.spec_version 1.1"),
            ));
        }
    }
}

fn check_tensor_set(cfg: &AdapterConfig, raw: &RawFile, named: &[(TensorName, usize)], report: &mut Report) {
    let mut layers: BTreeMap<Role, BTreeSet<u32>> = BTreeMap::new();
    let mut shared: BTreeSet<Role> = BTreeSet::new();
    for (n, i) in named {
        let t = &raw.tensors[*i];
        if !n.role.is_allowed(cfg) {
            report.push(Finding::about(
                Code::UnexpectedTensor,
                t.name.clone(),
                format!("role {} is only allowed with a rational activation, but iapt.activation is {:?}", n.role, cfg.activation.name()),
            ));
            continue;
        }
        match n.scope {
            Scope::Shared => {
                shared.insert(n.role);
            }
            Scope::Layer(l) if l >= cfg.n_layer => {
                report.push(Finding::about(
                    Code::UnexpectedTensor,
                    t.name.clone(),
                    format!("layer {l} does not exist: iapt.n_layer is {}", cfg.n_layer),
                ));
                continue;
            }
            Scope::Layer(l) => {
                layers.entry(n.role).or_default().insert(l);
            }
        }
        let want = n.role.expected_shape(cfg);
        if t.shape != want {
            report.push(Finding::about(
                Code::ShapeMismatch,
                t.name.clone(),
                format!("shape {:?} but {} must be {:?} (row-major)", t.shape, n.role, want),
            ));
        }
    }
    for role in Role::ALL {
        if !role.is_allowed(cfg) {
            continue;
        }
        let per = layers.get(&role);
        let is_shared = shared.contains(&role);
        if is_shared && per.is_some() {
            report.push(Finding::about(
                Code::SharedAndPerLayer,
                format!("iapt.shared.{role}"),
                format!("role {role} is stored both shared and per layer; keep one form"),
            ));
        }
        match per {
            Some(set) if !is_shared && set.len() as u32 != cfg.n_layer => {
                let missing: Vec<String> = (0..cfg.n_layer).filter(|l| !set.contains(l)).take(8).map(|l| l.to_string()).collect();
                report.push(Finding::about(
                    Code::MissingTensor,
                    format!("iapt.blk.*.{role}"),
                    format!(
                        "per-layer {role} is missing for layers {}{}; a per-layer role needs all {} layers",
                        missing.join(", "),
                        if missing.len() == 8 { ", ..." } else { "" },
                        cfg.n_layer
                    ),
                ));
            }
            None if !is_shared && role.is_required(cfg) => report.push(Finding::about(
                Code::MissingTensor,
                format!("iapt.blk.*.{role}"),
                format!("required role {role} is missing; store iapt.blk.{{l}}.{role} for every layer or one iapt.shared.{role}"),
            )),
            _ => {}
        }
    }
}

/// Index of the first NaN or infinite element, if any.
/// The largest weight magnitude that is not a W003 finding: the largest finite F16 value.
pub const MAX_WEIGHT_ABS: f32 = 65504.0;

/// The first element (index and value) whose magnitude exceeds [`MAX_WEIGHT_ABS`] (W003); only
/// for data with no non-finite element. F16 cannot hold such a value.
pub(crate) fn first_large(dt: DType, data: &[u8]) -> Option<(usize, f32)> {
    let large = |v: f32| v.abs() > MAX_WEIGHT_ABS;
    match dt {
        DType::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).enumerate().find(|&(_, v)| large(v)),
        DType::F16 => None,
        DType::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .enumerate()
            .find(|&(_, v)| large(v)),
        DType::Q8_0 => data.chunks_exact(Q8_BLOCK_BYTES).enumerate().find_map(|(b, blk)| {
            let d = crate::dtype::q8_scale(blk);
            blk[2..].iter().map(|&q| d * f32::from(q as i8)).enumerate().find(|&(_, v)| large(v)).map(|(i, v)| (b * Q8_BLOCK + i, v))
        }),
    }
}

/// Index of the first NaN or infinite element, if any (for Q8_0: the first element of the first
/// block whose scale is not finite).
pub(crate) fn first_non_finite(dt: DType, data: &[u8]) -> Option<usize> {
    match dt {
        DType::F32 => data.chunks_exact(4).position(|c| {
            let bits = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            bits & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::F16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        DType::BF16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        DType::Q8_0 => {
            data.chunks_exact(Q8_BLOCK_BYTES).position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00).map(|b| b * Q8_BLOCK)
        }
    }
}

/// Base-model facts used by the `--model` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModelInfo {
    /// `general.architecture`.
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: u32,
    /// `{arch}.embedding_length`.
    pub n_embd: u32,
}

impl BaseModelInfo {
    /// Reads the three facts from a base model GGUF's metadata (only the header is read), after
    /// checking the file is as long as the tensor data its header declares.
    pub fn read(path: &std::path::Path) -> Result<BaseModelInfo, BaseModelError> {
        let io = |source| BaseModelError::Io { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(io(std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory")));
        }
        let meta = crate::container::read_gguf_metadata(&file, path)?;
        let get = |k: &str| meta.iter().find(|(mk, _)| mk == k).map(|(_, v)| v);
        let arch = match get("general.architecture") {
            Some(MetaValue::Str(s)) => s.clone(),
            _ => return Err(BaseModelError::NoArchitecture { path: path.to_owned() }),
        };
        let num = |key: String| {
            let bad = |why| BaseModelError::BadKey { path: path.to_owned(), key: key.clone(), why };
            match get(&key) {
                Some(MetaValue::U32(v)) => Ok(*v),
                Some(MetaValue::U64(v)) => u32::try_from(*v).map_err(|_| bad("too large")),
                Some(MetaValue::I32(v)) => u32::try_from(*v).map_err(|_| bad("negative")),
                _ => Err(bad("missing or not an integer")),
            }
        };
        Ok(BaseModelInfo { n_layer: num(format!("{arch}.block_count"))?, n_embd: num(format!("{arch}.embedding_length"))?, arch })
    }

    /// Compares an adapter config with this base model.
    pub fn check(&self, cfg: &AdapterConfig) -> Vec<Finding> {
        let mut out = Vec::new();
        if cfg.base_model_arch != self.arch {
            out.push(Finding::about(
                Code::BaseArchMismatch,
                "iapt.base_model.arch",
                format!("adapter is for {:?} but the base model is {:?} (wrong base model?)", cfg.base_model_arch, self.arch),
            ));
        }
        if cfg.n_layer != self.n_layer {
            out.push(Finding::about(
                Code::BaseLayerMismatch,
                "iapt.n_layer",
                format!("adapter has {} layers but the base model has {} (wrong base model?)", cfg.n_layer, self.n_layer),
            ));
        }
        if cfg.n_embd != self.n_embd {
            out.push(Finding::about(
                Code::BaseEmbdMismatch,
                "iapt.n_embd",
                format!("adapter has n_embd {} but the base model has {} (wrong base model?)", cfg.n_embd, self.n_embd),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// W003 and E207 on Q8_0 blocks: an element is its block's scale times its signed byte, so a
    /// large scale with a large byte is found at that element, and a non-finite scale at the
    /// block's first element.
    #[test]
    fn q8_large_and_non_finite_elements_are_found_where_they_are() {
        let mut blocks = vec![0u8; 2 * Q8_BLOCK_BYTES];
        blocks[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        blocks[2..Q8_BLOCK_BYTES].fill(100);
        let second = Q8_BLOCK_BYTES;
        blocks[second..second + 2].copy_from_slice(&half::f16::from_f32(1000.0).to_bits().to_le_bytes());
        blocks[second + 2 + 5] = 100; // 1000 x 100 = 100000 > 65504, element 32 + 5
        assert_eq!(first_large(DType::Q8_0, &blocks), Some((Q8_BLOCK + 5, 100_000.0)));
        assert_eq!(first_non_finite(DType::Q8_0, &blocks), None);
        blocks[second..second + 2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
        assert_eq!(first_non_finite(DType::Q8_0, &blocks), Some(Q8_BLOCK));
    }
}
