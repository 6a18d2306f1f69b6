//! Hyperparameters: read from the `--config` JSON where given, inferred from tensor shapes where
//! that is unambiguous, filled and checked against a base model with `--base`. Every value that
//! cannot be determined is named in one error together with how to give it.
//!
//! From shapes: `n_layer` (highest layer + 1), `n_embd` and `bottleneck` (`down.weight` is
//! `[r, d]`, `up.weight` is `[d, r]`), `n_soft_tokens` (`pool.query` is `[m, r]`), and for a
//! rational activation the degrees and groups (`act.num` is `[G, M+1]`, `act.den` is `[G, N]`).
//! Never from shapes: the rational variant (the denominator length is N for A, B, D but N+1 for C),
//! a fixed activation's kind, and the base architecture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iapt_format::{Activation, AdapterConfig, BaseModelInfo, RationalConfig, RationalVariant, Role, Scope, SpecVersion};
use serde::Deserialize;

/// Largest config file accepted.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Why the hyperparameters could not be determined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// Reading the config file failed.
    #[error("cannot read config {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not the expected JSON.
    #[error("config {}: {what}", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Values that neither the config, the shapes nor the base model give.
    #[error("cannot determine {}:\n{}", names.join(", "), hints.join("\n"))]
    Missing {
        /// The missing values.
        names: Vec<&'static str>,
        /// One line per missing value: how to give it.
        hints: Vec<String>,
    },
    /// Two sources disagree about a value.
    #[error("{key}: {a} but {b}; fix the config, the profile or the base model so they agree")]
    Conflict {
        /// The value.
        key: &'static str,
        /// What one source says.
        a: String,
        /// What the other says.
        b: String,
    },
    /// A per-layer role is present for some layers but not all.
    #[error("{role} is present for layers {present} but missing for layers {missing}; a checkpoint must give it for every layer or none")]
    PartialLayers {
        /// The role.
        role: Role,
        /// Layers that have it.
        present: String,
        /// Layers that lack it.
        missing: String,
    },
    /// A role is given both per layer and shared.
    #[error("{role} is given both per layer and shared; a profile must map it one way")]
    Both {
        /// The role.
        role: Role,
    },
}

/// The `--config` file. Unknown keys are ignored, so a training config can be given as is.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ConfigFile {
    /// m.
    pub n_soft_tokens: Option<u32>,
    /// r.
    pub bottleneck: Option<u32>,
    /// L (usually inferred).
    pub n_layer: Option<u32>,
    /// d (usually inferred).
    pub n_embd: Option<u32>,
    /// The activation.
    pub activation: Option<ActivationSpec>,
    /// llama.cpp architecture of the base model.
    pub base_model_arch: Option<String>,
    /// s, default 1.0.
    pub pool_scale: Option<f32>,
}

/// `"activation": {"kind": "rational", "variant": "B"}` (degrees and groups optional).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ActivationSpec {
    /// `rational`, `identity`, `relu`, `gelu`, `gelu_tanh`, `silu` or `tanh`.
    pub kind: String,
    /// `A`, `B`, `C` or `D` (rational only).
    pub variant: Option<String>,
    /// M (rational only; inferred from `act.num`).
    pub numerator_degree: Option<u32>,
    /// N (rational only; inferred from `act.den`).
    pub denominator_degree: Option<u32>,
    /// G (rational only; inferred from `act.num`).
    pub groups: Option<u32>,
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<ConfigFile, InferError> {
        let io = |source| InferError::Io { path: path.to_owned(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(InferError::BadConfig { path: path.to_owned(), what: format!("{len} bytes is more than the limit") });
        }
        let text = std::fs::read(path).map_err(io)?;
        serde_json::from_slice(&text).map_err(|e| InferError::BadConfig {
            path: path.to_owned(),
            what: format!("{e} (expected keys n_soft_tokens, bottleneck, activation {{kind, variant}}, base_model_arch, pool_scale)"),
        })
    }
}

/// Settles one value from the config, the shapes and the base model; records what is missing.
struct Settle {
    names: Vec<&'static str>,
    hints: Vec<String>,
}

impl Settle {
    fn one<T: PartialEq + std::fmt::Display + Clone>(
        &mut self,
        key: &'static str,
        sources: &[(Option<T>, String)],
        hint: &str,
    ) -> Result<Option<T>, InferError> {
        let mut found: Option<(T, &String)> = None;
        for (v, from) in sources {
            let Some(v) = v else { continue };
            match &found {
                Some((f, ffrom)) if f != v => {
                    return Err(InferError::Conflict { key, a: format!("{ffrom} gives {f}"), b: format!("{from} gives {v}") });
                }
                Some(_) => {}
                None => found = Some((v.clone(), from)),
            }
        }
        if found.is_none() {
            self.names.push(key);
            self.hints.push(format!("  {key}: {hint}"));
        }
        Ok(found.map(|(v, _)| v))
    }
}

/// Determines the adapter config. `shapes` holds the row-major shape of every mapped tensor.
///
/// The steps: the layer count the per-layer tensors give (`layer_count`); the sizes, each
/// settled from every source that gives it (shapes, `--config`, `--base`) and refused when two
/// disagree (`settle_sizes`); the activation (`infer_activation`); then the config, or every
/// value still missing with a hint.
pub fn infer_config(
    shapes: &BTreeMap<(Scope, Role), Vec<u64>>,
    cfg: &ConfigFile,
    base: Option<&BaseModelInfo>,
) -> Result<AdapterConfig, InferError> {
    let shapes = RoleShapes(shapes);
    let mut st = Settle { names: Vec::new(), hints: Vec::new() };
    let sizes = settle_sizes(&mut st, &shapes, layer_count(&shapes)?, cfg, base)?;
    let activation = infer_activation(&mut st, &shapes, cfg)?;
    match (sizes, activation) {
        (
            Sizes {
                n_layer: Some(n_layer),
                n_embd: Some(n_embd),
                bottleneck: Some(bottleneck),
                n_soft_tokens: Some(n_soft_tokens),
                base_model_arch: Some(base_model_arch),
            },
            Some(activation),
        ) if st.names.is_empty() => Ok(AdapterConfig {
            spec_version: SpecVersion::V1_0,
            n_layer,
            n_embd,
            n_soft_tokens,
            bottleneck,
            activation,
            pool_scale: cfg.pool_scale.unwrap_or(1.0),
            base_model_arch,
        }),
        _ => Err(InferError::Missing { names: st.names, hints: st.hints }),
    }
}

/// The mapped tensors' shapes by (scope, role).
struct RoleShapes<'a>(&'a BTreeMap<(Scope, Role), Vec<u64>>);

impl RoleShapes<'_> {
    /// The shape of a role: layer 0's, or the shared one.
    fn shape(&self, role: Role) -> Option<&Vec<u64>> {
        self.0.get(&(Scope::Layer(0), role)).or_else(|| self.0.get(&(Scope::Shared, role)))
    }

    /// Dimension `i` of a role's shape, when it fits in a u32.
    fn dim(&self, role: Role, i: usize) -> Option<u32> {
        self.shape(role).and_then(|s| s.get(i)).and_then(|&d| u32::try_from(d).ok())
    }

    /// The layers a role is stored for, in order.
    fn layers(&self, role: Role) -> std::collections::BTreeSet<u32> {
        self.0
            .keys()
            .filter_map(|(s, r)| match s {
                Scope::Layer(l) if *r == role => Some(*l),
                _ => None,
            })
            .collect()
    }
}

/// The layer count the per-layer tensors give (`None` when every role is shared): each per-layer
/// role must cover the same layers 0..L, and no role may be both shared and per layer.
fn layer_count(shapes: &RoleShapes<'_>) -> Result<Option<u32>, InferError> {
    let mut n_layer: Option<u32> = None;
    let mut per_role = Vec::new();
    for role in Role::ALL {
        let layers = shapes.layers(role);
        let Some(&last) = layers.last() else { continue };
        if shapes.0.contains_key(&(Scope::Shared, role)) {
            return Err(InferError::Both { role });
        }
        if last >= iapt_format::MAX_N_LAYER {
            return Err(InferError::Conflict {
                key: "n_layer",
                a: format!("the tensors name layer {last} of {role}"),
                b: format!("spec v1 allows at most {} layers", iapt_format::MAX_N_LAYER),
            });
        }
        n_layer = Some(n_layer.map_or(last + 1, |o| o.max(last + 1)));
        per_role.push((role, layers));
    }
    if let Some(n) = n_layer {
        for (role, present) in per_role {
            if present.len() as u32 != n {
                let missing: Vec<u32> = (0..n).filter(|l| !present.contains(l)).collect();
                let present: Vec<u32> = present.into_iter().collect();
                return Err(InferError::PartialLayers { role, present: list(&present), missing: list(&missing) });
            }
        }
    }
    Ok(n_layer)
}

/// The five sizes, each settled from the shapes, `--config` and `--base`.
struct Sizes {
    n_layer: Option<u32>,
    n_embd: Option<u32>,
    bottleneck: Option<u32>,
    n_soft_tokens: Option<u32>,
    base_model_arch: Option<String>,
}

fn settle_sizes(
    st: &mut Settle,
    shapes: &RoleShapes<'_>,
    n_layer_shapes: Option<u32>,
    cfg: &ConfigFile,
    base: Option<&BaseModelInfo>,
) -> Result<Sizes, InferError> {
    let cfg_name = "--config";
    let base_name = "--base";
    let n_layer = st.one(
        "n_layer",
        &[(n_layer_shapes, "the tensors".into()), (cfg.n_layer, cfg_name.into()), (base.map(|b| b.n_layer), base_name.into())],
        "every role is shared, so give \"n_layer\" in --config or pass --base BASE.gguf",
    )?;
    let n_embd = st.one(
        "n_embd",
        &[
            (shapes.dim(Role::DownWeight, 1), "down.weight".into()),
            (shapes.dim(Role::UpWeight, 0), "up.weight".into()),
            (cfg.n_embd, cfg_name.into()),
            (base.map(|b| b.n_embd), base_name.into()),
        ],
        "add \"n_embd\" to --config or pass --base BASE.gguf",
    )?;
    let bottleneck = st.one(
        "bottleneck",
        &[
            (shapes.dim(Role::DownWeight, 0), "down.weight".into()),
            (shapes.dim(Role::UpWeight, 1), "up.weight".into()),
            (shapes.dim(Role::PoolQuery, 1), "pool.query".into()),
            (cfg.bottleneck, cfg_name.into()),
        ],
        "add \"bottleneck\" to --config",
    )?;
    let n_soft_tokens = st.one(
        "n_soft_tokens",
        &[(shapes.dim(Role::PoolQuery, 0), "pool.query".into()), (cfg.n_soft_tokens, cfg_name.into())],
        "add \"n_soft_tokens\" to --config",
    )?;
    let base_model_arch = st.one(
        "base_model_arch",
        &[(cfg.base_model_arch.clone(), cfg_name.into()), (base.map(|b| b.arch.clone()), base_name.into())],
        "add \"base_model_arch\": \"llama\" (the llama.cpp architecture) to --config, or pass --base BASE.gguf",
    )?;
    Ok(Sizes { n_layer, n_embd, bottleneck, n_soft_tokens, base_model_arch })
}

/// The activation: from `--config`'s `activation`, or rational when the checkpoint holds
/// coefficients; a fixed activation with coefficients is a conflict.
fn infer_activation(st: &mut Settle, shapes: &RoleShapes<'_>, cfg: &ConfigFile) -> Result<Option<Activation>, InferError> {
    let has_coeffs = shapes.shape(Role::ActNum).is_some() || shapes.shape(Role::ActDen).is_some();
    let spec = cfg.activation.clone();
    let kind = match (&spec, has_coeffs) {
        (Some(s), _) => Some(s.kind.clone()),
        (None, true) => Some("rational".to_owned()),
        (None, false) => None,
    };
    match kind.as_deref() {
        None => {
            st.names.push("activation");
            st.hints.push(
                "  activation: the checkpoint has no rational coefficients, so add \"activation\": {\"kind\": \"gelu\"} \
                 (or identity, relu, gelu_tanh, silu, tanh) to --config"
                    .into(),
            );
            Ok(None)
        }
        Some("rational") => infer_rational(st, shapes, spec.unwrap_or_default()),
        Some(fixed) => {
            if has_coeffs {
                return Err(InferError::Conflict {
                    key: "activation",
                    a: format!("--config gives the fixed activation {fixed:?}"),
                    b: "the checkpoint has rational coefficients (act.num/act.den)".into(),
                });
            }
            Ok(Some(Activation::fixed_from_name(fixed).ok_or_else(|| InferError::Conflict {
                key: "activation.kind",
                a: format!("--config gives {fixed:?}"),
                b: format!("it must be one of {}", Activation::NAMES.join(", ")),
            })?))
        }
    }
}

/// A rational activation: the variant from `--config`; the degrees and groups from the
/// coefficient shapes and `--config`, settled.
fn infer_rational(st: &mut Settle, shapes: &RoleShapes<'_>, spec: ActivationSpec) -> Result<Option<Activation>, InferError> {
    let cfg_name = "--config";
    let variant = match spec.variant.as_deref() {
        Some(v) => Some(RationalVariant::parse(v).ok_or_else(|| InferError::Conflict {
            key: "activation.variant",
            a: format!("--config gives {v:?}"),
            b: "it must be one of A, B, C, D".into(),
        })?),
        None => {
            st.names.push("activation.variant");
            st.hints.push(
                "  activation.variant: cannot be told from shapes; add \"activation\": {\"kind\": \"rational\", \"variant\": \"B\"} \
                 (A, B, C or D, as trained) to --config"
                    .into(),
            );
            None
        }
    };
    let c_extra = u32::from(variant == Some(RationalVariant::C));
    let num_len = shapes.dim(Role::ActNum, 1);
    let den_len = shapes.dim(Role::ActDen, 1);
    let m = st.one(
        "activation.numerator_degree",
        &[(num_len.and_then(|n| n.checked_sub(1)), "act.num".into()), (spec.numerator_degree, cfg_name.into())],
        "the checkpoint has no numerator coefficients; check the profile maps act.num",
    )?;
    let n = match variant {
        Some(_) => st.one(
            "activation.denominator_degree",
            &[(den_len.and_then(|n| n.checked_sub(c_extra)), "act.den".into()), (spec.denominator_degree, cfg_name.into())],
            "the checkpoint has no denominator coefficients; check the profile maps act.den",
        )?,
        None => None,
    };
    let groups = st.one(
        "activation.groups",
        &[(shapes.dim(Role::ActNum, 0), "act.num".into()), (shapes.dim(Role::ActDen, 0), "act.den".into()), (spec.groups, cfg_name.into())],
        "add \"groups\" to the activation in --config",
    )?;
    Ok(match (variant, m, n, groups) {
        (Some(variant), Some(numerator_degree), Some(denominator_degree), Some(groups)) => {
            Some(Activation::Rational(RationalConfig { variant, numerator_degree, denominator_degree, groups }))
        }
        _ => None,
    })
}

fn list(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(n_layer: u32, d: u64, r: u64, m: u64) -> BTreeMap<(Scope, Role), Vec<u64>> {
        let mut s = BTreeMap::new();
        for l in 0..n_layer {
            s.insert((Scope::Layer(l), Role::DownWeight), vec![r, d]);
            s.insert((Scope::Layer(l), Role::PoolQuery), vec![m, r]);
            s.insert((Scope::Layer(l), Role::UpWeight), vec![d, r]);
            s.insert((Scope::Layer(l), Role::ActNum), vec![1, 7]);
            s.insert((Scope::Layer(l), Role::ActDen), vec![1, 5]);
        }
        s
    }

    #[test]
    fn infers_everything_but_variant_and_arch() {
        let err = infer_config(&shapes(3, 32, 8, 4), &ConfigFile::default(), None).unwrap_err();
        let InferError::Missing { names, .. } = &err else { panic!("{err}") };
        assert_eq!(names, &["base_model_arch", "activation.variant"]);
        assert!(err.to_string().contains("--base BASE.gguf"), "{err}");
    }

    #[test]
    fn config_and_base_complete_it() {
        let cfg = ConfigFile {
            activation: Some(ActivationSpec { kind: "rational".into(), variant: Some("C".into()), ..Default::default() }),
            ..Default::default()
        };
        let base = BaseModelInfo { arch: "llama".into(), n_layer: 3, n_embd: 32 };
        let c = infer_config(&shapes(3, 32, 8, 4), &cfg, Some(&base)).unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.bottleneck, c.n_soft_tokens), (3, 32, 8, 4));
        // Variant C: 5 denominator coefficients are b_0..b_4, degree 4.
        assert_eq!(c.activation.rational().unwrap().denominator_degree, 4);
        assert_eq!(c.activation.rational().unwrap().numerator_degree, 6);
    }

    #[test]
    fn conflicts_are_named() {
        let cfg = ConfigFile { bottleneck: Some(16), ..Default::default() };
        let err = infer_config(&shapes(2, 32, 8, 4), &cfg, None).unwrap_err();
        assert!(matches!(err, InferError::Conflict { key: "bottleneck", .. }), "{err}");
        let base = BaseModelInfo { arch: "llama".into(), n_layer: 4, n_embd: 32 };
        let err = infer_config(&shapes(2, 32, 8, 4), &ConfigFile::default(), Some(&base)).unwrap_err();
        assert!(matches!(err, InferError::Conflict { key: "n_layer", .. }), "{err}");
    }

    #[test]
    fn partial_layers_are_refused() {
        let mut s = shapes(3, 32, 8, 4);
        s.remove(&(Scope::Layer(1), Role::UpWeight));
        let err = infer_config(&s, &ConfigFile::default(), None).unwrap_err();
        assert!(matches!(err, InferError::PartialLayers { role: Role::UpWeight, .. }), "{err}");
    }

    #[test]
    fn a_huge_layer_index_is_refused_without_counting_up_to_it() {
        let mut s = shapes(1, 8, 4, 2);
        s.insert((Scope::Layer(u32::MAX - 1), Role::DownWeight), vec![4, 8]);
        let err = infer_config(&s, &ConfigFile::default(), None).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}
