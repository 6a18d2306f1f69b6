//! The typed adapter configuration (spec v1 section "Metadata keys"): key names, their types and
//! defaults, parsing from either container's metadata with every finding reported, and rendering
//! back to typed metadata.

use std::fmt;

use crate::meta::{MetaType, MetaValue, META_TYPES_KEY};
use crate::report::{Code, Finding, Report};

/// Metadata key names defined by spec v1.
pub mod keys {
    /// `"major.minor"`, string, required.
    pub const SPEC_VERSION: &str = "iapt.spec_version";
    /// u32, required: number of base-model layers (one generator per layer).
    pub const N_LAYER: &str = "iapt.n_layer";
    /// u32, required: the base model's hidden size d.
    pub const N_EMBD: &str = "iapt.n_embd";
    /// u32, required: m, soft tokens per layer.
    pub const N_SOFT_TOKENS: &str = "iapt.n_soft_tokens";
    /// u32, required: r, the generator's bottleneck width.
    pub const BOTTLENECK: &str = "iapt.bottleneck";
    /// string, required: the activation name.
    pub const ACTIVATION: &str = "iapt.activation";
    /// string, required: pooling type; v1 knows only `"query"`.
    pub const POOL_TYPE: &str = "iapt.pool.type";
    /// f32, required: the pool scale s.
    pub const POOL_SCALE: &str = "iapt.pool.scale";
    /// string, required: the base model's llama.cpp architecture name.
    pub const BASE_MODEL_ARCH: &str = "iapt.base_model.arch";
    /// string, required when rational: A, B, C or D.
    pub const RATIONAL_VARIANT: &str = "iapt.rational.variant";
    /// u32, required when rational: numerator degree M (0..=8).
    pub const RATIONAL_NUM_DEGREE: &str = "iapt.rational.numerator_degree";
    /// u32, required when rational: denominator degree N (0..=8).
    pub const RATIONAL_DEN_DEGREE: &str = "iapt.rational.denominator_degree";
    /// u32, required when rational: number of coefficient groups G (divides r).
    pub const RATIONAL_GROUPS: &str = "iapt.rational.groups";

    /// string, optional: a human name for the base model.
    pub const BASE_MODEL_NAME: &str = "iapt.base_model.name";
    /// string, optional provenance: the file name of the source checkpoint.
    pub const SOURCE_FILE: &str = "iapt.source.file";
    /// string, optional provenance: lowercase hex SHA-256 of the source checkpoint.
    pub const SOURCE_SHA256: &str = "iapt.source.sha256";
    /// string, optional provenance: the tool and version that wrote the file.
    pub const CONVERTER_VERSION: &str = "iapt.converter.version";
    /// string, optional: a human name for the adapter.
    pub const GENERAL_NAME: &str = "general.name";

    /// GGUF container key: must be `"adapter"`.
    pub const GENERAL_TYPE: &str = "general.type";
    /// GGUF container key: must be `"iapt"`.
    pub const ADAPTER_TYPE: &str = "adapter.type";
    /// GGUF container key: must equal `iapt.base_model.arch`.
    pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
    /// GGUF container key: data alignment, u32, optional, default 32.
    pub const GENERAL_ALIGNMENT: &str = "general.alignment";
}

/// Optional keys spec v1 defines (not reported as unknown).
pub const KNOWN_OPTIONAL_KEYS: [&str; 6] =
    [keys::BASE_MODEL_NAME, keys::SOURCE_FILE, keys::SOURCE_SHA256, keys::CONVERTER_VERSION, keys::GENERAL_NAME, META_TYPES_KEY];

/// Largest rational degree spec v1 allows (numerator and denominator).
pub const MAX_RATIONAL_DEGREE: u32 = 8;
/// Largest `n_layer` accepted (a guard against absurd allocations from a hostile file).
pub const MAX_N_LAYER: u32 = 4096;
/// Largest `n_embd` and `bottleneck` accepted.
pub const MAX_WIDTH: u32 = 1 << 20;
/// Largest `n_soft_tokens` accepted.
pub const MAX_SOFT_TOKENS: u32 = 4096;

/// The major version this reader implements.
pub const SPEC_MAJOR: u32 = 1;
/// The minor version this reader implements (writers write the lowest one a file needs).
pub const SPEC_MINOR: u32 = 1;

/// Which container a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Container {
    /// safetensors: metadata values are strings in `__metadata__`.
    Safetensors,
    /// GGUF v3: typed metadata keys.
    Gguf,
}

impl Container {
    /// Chooses a container from an output path's extension (`.safetensors` or `.gguf`).
    pub fn from_extension(path: &std::path::Path) -> Option<Container> {
        match path.extension()?.to_str()? {
            "safetensors" => Some(Container::Safetensors),
            "gguf" => Some(Container::Gguf),
            _ => None,
        }
    }
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Container::Safetensors => "safetensors",
            Container::Gguf => "gguf",
        })
    }
}

/// `iapt.spec_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecVersion {
    /// Incompatible changes bump the major version.
    pub major: u32,
    /// Compatible additions bump the minor version.
    pub minor: u32,
}

impl SpecVersion {
    /// The version this crate reads: the highest it writes.
    pub const CURRENT: SpecVersion = SpecVersion { major: SPEC_MAJOR, minor: SPEC_MINOR };
    /// Spec 1.0: all a file of float tensors needs. Writers write the lowest version a file needs,
    /// so that a 1.0 reader reads every file it can without a W001 warning.
    pub const V1_0: SpecVersion = SpecVersion { major: 1, minor: 0 };
    /// Spec 1.1: adds Q8_0 matrices.
    pub const V1_1: SpecVersion = SpecVersion { major: 1, minor: 1 };

    /// Parses `"major.minor"` (canonical decimal numbers).
    pub fn parse(s: &str) -> Option<SpecVersion> {
        let (a, b) = s.split_once('.')?;
        let canon = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) && (t == "0" || !t.starts_with('0'));
        if !canon(a) || !canon(b) {
            return None;
        }
        Some(SpecVersion { major: a.parse().ok()?, minor: b.parse().ok()? })
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The denominator form of a rational activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RationalVariant {
    /// Q(x) = 1 + sum_{i=1..N} |b_i| |x|^i
    A,
    /// Q(x) = 1 + |sum_{i=1..N} b_i x^i|
    B,
    /// Q(x) = 0.1 + |sum_{i=0..N} b_i x^i|
    C,
    /// As B at inference.
    D,
}

impl RationalVariant {
    /// The metadata spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RationalVariant::A => "A",
            RationalVariant::B => "B",
            RationalVariant::C => "C",
            RationalVariant::D => "D",
        }
    }

    /// Parses `A`..`D` (upper case, as written by the spec).
    pub fn parse(s: &str) -> Option<RationalVariant> {
        match s {
            "A" => Some(RationalVariant::A),
            "B" => Some(RationalVariant::B),
            "C" => Some(RationalVariant::C),
            "D" => Some(RationalVariant::D),
            _ => None,
        }
    }
}

/// Parameters of a rational activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RationalConfig {
    /// The denominator form.
    pub variant: RationalVariant,
    /// M: the numerator has M + 1 coefficients a_0..a_M.
    pub numerator_degree: u32,
    /// N: the denominator has N coefficients b_1..b_N (N + 1, b_0..b_N, for variant C).
    pub denominator_degree: u32,
    /// G: the r channels split into G contiguous blocks, block k using coefficient row k.
    pub groups: u32,
}

impl RationalConfig {
    /// Number of denominator coefficients per group: N, or N + 1 for variant C.
    pub fn denominator_len(&self) -> u32 {
        match self.variant {
            RationalVariant::C => self.denominator_degree + 1,
            _ => self.denominator_degree,
        }
    }
}

/// The activation g applied to the pooled bottleneck vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// A learned rational function (Padé activation unit).
    Rational(RationalConfig),
    /// g(x) = x
    Identity,
    /// g(x) = max(x, 0)
    Relu,
    /// g(x) = x Φ(x), erf form
    Gelu,
    /// g(x) = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
    GeluTanh,
    /// g(x) = x σ(x)
    Silu,
    /// g(x) = tanh(x)
    Tanh,
}

impl Activation {
    /// Names of every activation in `iapt.activation`.
    pub const NAMES: [&'static str; 7] = ["rational", "identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"];

    /// The metadata spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Rational(_) => "rational",
            Activation::Identity => "identity",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Silu => "silu",
            Activation::Tanh => "tanh",
        }
    }

    /// The rational parameters, if rational.
    pub fn rational(&self) -> Option<&RationalConfig> {
        match self {
            Activation::Rational(r) => Some(r),
            _ => None,
        }
    }

    /// A fixed (non-rational) activation by name.
    pub fn fixed_from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "identity" => Activation::Identity,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_tanh" => Activation::GeluTanh,
            "silu" => Activation::Silu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }
}

/// The typed configuration of an IAPT adapter (the required keys of spec v1).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The spec version the file declares (a reader accepts any 1.x).
    pub spec_version: SpecVersion,
    /// L: layers of the base model, one generator each.
    pub n_layer: u32,
    /// d: the base model's hidden size.
    pub n_embd: u32,
    /// m: soft tokens per layer.
    pub n_soft_tokens: u32,
    /// r: bottleneck width.
    pub bottleneck: u32,
    /// g: the activation.
    pub activation: Activation,
    /// s: the pool scale (default 1.0 when a converter is not told otherwise).
    pub pool_scale: f32,
    /// The base model's llama.cpp architecture (`llama`, `qwen2`, ...).
    pub base_model_arch: String,
}

impl AdapterConfig {
    /// Checks the value rules of spec v1 that need no file (ranges, divisibility, finiteness).
    pub fn check(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let dims = [
            (keys::N_LAYER, self.n_layer, MAX_N_LAYER),
            (keys::N_EMBD, self.n_embd, MAX_WIDTH),
            (keys::N_SOFT_TOKENS, self.n_soft_tokens, MAX_SOFT_TOKENS),
            (keys::BOTTLENECK, self.bottleneck, MAX_WIDTH),
        ];
        for (key, v, max) in dims {
            if v == 0 || v > max {
                out.push(Finding::about(Code::BadKeyValue, key, format!("{v} is out of range; it must be 1..={max}")));
            }
        }
        if !self.pool_scale.is_finite() {
            out.push(Finding::about(
                Code::BadKeyValue,
                keys::POOL_SCALE,
                format!("{} is not finite; use a finite scale such as 1.0", self.pool_scale),
            ));
        }
        if !is_arch_name(&self.base_model_arch) {
            out.push(Finding::about(
                Code::BadKeyValue,
                keys::BASE_MODEL_ARCH,
                format!("{:?} is not a llama.cpp architecture name (lowercase letters, digits, '_' and '-')", self.base_model_arch),
            ));
        }
        if let Some(rc) = self.activation.rational() {
            for (key, deg) in [(keys::RATIONAL_NUM_DEGREE, rc.numerator_degree), (keys::RATIONAL_DEN_DEGREE, rc.denominator_degree)] {
                if deg > MAX_RATIONAL_DEGREE {
                    out.push(Finding::about(Code::DegreeOutOfRange, key, format!("degree {deg} is outside 0..={MAX_RATIONAL_DEGREE}")));
                }
            }
            if rc.groups == 0 || self.bottleneck % rc.groups != 0 {
                out.push(Finding::about(
                    Code::GroupsDoNotDivide,
                    keys::RATIONAL_GROUPS,
                    format!(
                        "{} groups do not divide the bottleneck {}; use a divisor of it (1 is always valid)",
                        rc.groups, self.bottleneck
                    ),
                ));
            }
        }
        out
    }

    /// The required keys as typed metadata, in spec order (the canonical write order).
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        let mut m = vec![
            (keys::SPEC_VERSION.to_owned(), MetaValue::Str(self.spec_version.to_string())),
            (keys::N_LAYER.to_owned(), MetaValue::U32(self.n_layer)),
            (keys::N_EMBD.to_owned(), MetaValue::U32(self.n_embd)),
            (keys::N_SOFT_TOKENS.to_owned(), MetaValue::U32(self.n_soft_tokens)),
            (keys::BOTTLENECK.to_owned(), MetaValue::U32(self.bottleneck)),
            (keys::ACTIVATION.to_owned(), MetaValue::Str(self.activation.name().to_owned())),
            (keys::POOL_TYPE.to_owned(), MetaValue::Str("query".to_owned())),
            (keys::POOL_SCALE.to_owned(), MetaValue::F32(self.pool_scale)),
            (keys::BASE_MODEL_ARCH.to_owned(), MetaValue::Str(self.base_model_arch.clone())),
        ];
        if let Some(rc) = self.activation.rational() {
            m.push((keys::RATIONAL_VARIANT.to_owned(), MetaValue::Str(rc.variant.as_str().to_owned())));
            m.push((keys::RATIONAL_NUM_DEGREE.to_owned(), MetaValue::U32(rc.numerator_degree)));
            m.push((keys::RATIONAL_DEN_DEGREE.to_owned(), MetaValue::U32(rc.denominator_degree)));
            m.push((keys::RATIONAL_GROUPS.to_owned(), MetaValue::U32(rc.groups)));
        }
        m
    }
}

/// Whether `s` looks like a llama.cpp architecture name.
pub fn is_arch_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The GGUF type spec v1 fixes for a key it defines, if it defines the key.
pub fn defined_type(key: &str) -> Option<MetaType> {
    use keys::*;
    Some(match key {
        SPEC_VERSION | ACTIVATION | POOL_TYPE | BASE_MODEL_ARCH | RATIONAL_VARIANT => MetaType::Str,
        N_LAYER | N_EMBD | N_SOFT_TOKENS | BOTTLENECK | RATIONAL_NUM_DEGREE | RATIONAL_DEN_DEGREE | RATIONAL_GROUPS => MetaType::U32,
        POOL_SCALE => MetaType::F32,
        BASE_MODEL_NAME | SOURCE_FILE | SOURCE_SHA256 | CONVERTER_VERSION | GENERAL_NAME | META_TYPES_KEY => MetaType::Str,
        GENERAL_TYPE | ADAPTER_TYPE | GENERAL_ARCHITECTURE => MetaType::Str,
        GENERAL_ALIGNMENT => MetaType::U32,
        _ => return None,
    })
}

/// Keys that belong to the GGUF container (derived from the config when writing GGUF, dropped when
/// writing safetensors).
pub fn is_gguf_container_key(key: &str) -> bool {
    matches!(key, keys::GENERAL_TYPE | keys::ADAPTER_TYPE | keys::GENERAL_ARCHITECTURE | keys::GENERAL_ALIGNMENT)
}

/// Metadata as read from a file: an ordered list of keys and values (duplicates already reported).
pub type Metadata = Vec<(String, MetaValue)>;

/// Turns safetensors string metadata into typed metadata: spec-defined keys get their spec type,
/// other keys the type recorded in [`META_TYPES_KEY`] or string. Unparseable text is reported
/// (E102) and the key dropped.
pub fn type_safetensors_metadata(raw: &[(String, String)], report: &mut Report) -> Metadata {
    let mut recorded: std::collections::HashMap<String, MetaType> = std::collections::HashMap::new();
    if let Some((_, text)) = raw.iter().find(|(k, _)| k == META_TYPES_KEY) {
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
            Ok(map) => {
                for (k, v) in map {
                    match v.as_str().and_then(MetaType::parse) {
                        Some(t) => {
                            recorded.insert(k, t);
                        }
                        None => report.push(Finding::about(
                            Code::BadKeyValue,
                            META_TYPES_KEY,
                            format!("type of {k:?} is not a GGUF type name (u32, f32, string, array[u32], ...)"),
                        )),
                    }
                }
            }
            Err(e) => {
                report.push(Finding::about(Code::BadKeyValue, META_TYPES_KEY, format!("must be a JSON object of key -> type name: {e}")))
            }
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    for (k, text) in raw {
        if k == META_TYPES_KEY {
            continue;
        }
        let ty = defined_type(k).or_else(|| recorded.get(k).cloned()).unwrap_or(MetaType::Str);
        match MetaValue::from_text(&ty, text) {
            Some(v) => out.push((k.clone(), v)),
            None => {
                report.push(Finding::about(
                    Code::BadKeyType,
                    k.clone(),
                    format!("{text:?} is not a {ty}; write it as a canonical {ty} in text"),
                ));
                // Kept as text so that the key counts as present (no second finding as "missing").
                out.push((k.clone(), MetaValue::Str(text.clone())));
            }
        }
    }
    out
}

/// Renders typed metadata as safetensors strings, adding [`META_TYPES_KEY`] for optional keys whose
/// type is not string. Container keys of GGUF are left out.
pub fn stringify_metadata(meta: &[(String, MetaValue)]) -> Vec<(String, String)> {
    let mut types = serde_json::Map::new();
    let mut out = Vec::with_capacity(meta.len() + 1);
    for (k, v) in meta {
        if is_gguf_container_key(k) || k == META_TYPES_KEY {
            continue;
        }
        let ty = v.meta_type();
        if defined_type(k).is_none() && ty != MetaType::Str {
            types.insert(k.clone(), serde_json::Value::String(ty.to_string()));
        }
        out.push((k.clone(), v.to_text()));
    }
    if !types.is_empty() {
        out.push((META_TYPES_KEY.to_owned(), serde_json::Value::Object(types).to_string()));
    }
    out
}

/// Parses the configuration from typed metadata, pushing every finding into `report`. Returns the
/// config (if every required key is usable) and the optional keys, in file order.
///
/// The steps, in the order their findings appear: the type of every spec-defined key; the spec
/// version (an unknown major stops here); the four sizes; pooling; the base architecture; the
/// activation (with the rational keys); GGUF's container keys; the optional keys; and the
/// config's own value checks.
pub fn parse_config(meta: &[(String, MetaValue)], container: Container, report: &mut Report) -> (Option<AdapterConfig>, Metadata) {
    let keys = Keys::new(meta);
    check_defined_types(meta, container, report);
    let Ok(version) = read_version(&keys, report) else {
        return (None, Vec::new());
    };
    let n_layer = keys.require_u32(keys::N_LAYER, report);
    let n_embd = keys.require_u32(keys::N_EMBD, report);
    let n_soft = keys.require_u32(keys::N_SOFT_TOKENS, report);
    let bottleneck = keys.require_u32(keys::BOTTLENECK, report);
    let pool_scale = read_pool(&keys, report);
    let arch = keys.str_key(keys::BASE_MODEL_ARCH);
    if arch.is_none() {
        missing(keys::BASE_MODEL_ARCH, report);
    }
    let activation = read_activation(&keys, report);
    if container == Container::Gguf {
        check_gguf_container_keys(&keys, &arch, report);
    }
    let extras = optional_keys(meta, &keys, &activation, report);
    let config = match (version, n_layer, n_embd, n_soft, bottleneck, activation, pool_scale, arch) {
        (
            Some(version),
            Some(n_layer),
            Some(n_embd),
            Some(n_soft_tokens),
            Some(bottleneck),
            Some(activation),
            Some(pool_scale),
            Some(Some(base_model_arch)),
        ) => {
            let spec_version = SpecVersion::parse(&version).unwrap_or(SpecVersion::CURRENT);
            let c = AdapterConfig { spec_version, n_layer, n_embd, n_soft_tokens, bottleneck, activation, pool_scale, base_model_arch };
            checked(c, report)
        }
        _ => None,
    };
    (config, extras)
}

/// Metadata looked up by key in constant time (the first occurrence: duplicates were reported
/// when the file was read).
struct Keys<'a> {
    map: std::collections::HashMap<&'a str, &'a MetaValue>,
}

impl<'a> Keys<'a> {
    fn new(meta: &'a [(String, MetaValue)]) -> Keys<'a> {
        let mut map = std::collections::HashMap::with_capacity(meta.len());
        for (k, v) in meta {
            map.entry(k.as_str()).or_insert(v);
        }
        Keys { map }
    }

    fn get(&self, key: &str) -> Option<&'a MetaValue> {
        self.map.get(key).copied()
    }

    /// The value of `key` when it has the type spec v1 defines for it.
    fn typed(&self, key: &str) -> Option<&'a MetaValue> {
        self.get(key).filter(|v| Some(v.meta_type()) == defined_type(key))
    }

    /// `None` when absent; `Some(None)` when present with the wrong type (reported by
    /// [`check_defined_types`]); `Some(Some(s))` otherwise.
    fn str_key(&self, key: &str) -> Option<Option<String>> {
        self.get(key).map(|_| match self.typed(key) {
            Some(MetaValue::Str(s)) => Some(s.clone()),
            _ => None,
        })
    }

    /// A required string key: missing is reported, mistyped was.
    fn require_str(&self, key: &str, report: &mut Report) -> Option<String> {
        match self.str_key(key) {
            None => {
                missing(key, report);
                None
            }
            Some(s) => s,
        }
    }

    /// A required u32 key: missing is reported, mistyped was.
    fn require_u32(&self, key: &str, report: &mut Report) -> Option<u32> {
        match self.get(key) {
            None => {
                missing(key, report);
                None
            }
            Some(_) => match self.typed(key) {
                Some(MetaValue::U32(n)) => Some(*n),
                _ => None,
            },
        }
    }

    /// Whether `iapt.activation` is the string "rational" (whatever else is wrong).
    fn says_rational(&self) -> Option<bool> {
        match self.get(keys::ACTIVATION) {
            Some(MetaValue::Str(s)) => Some(s == "rational"),
            _ => None,
        }
    }
}

fn missing(key: &str, report: &mut Report) {
    report.push(Finding::about(Code::MissingKey, key, "required key is missing; add it (see spec/iapt-v1.md, Metadata keys)"));
}

/// E102 for every spec-defined key present with another type.
fn check_defined_types(meta: &[(String, MetaValue)], container: Container, report: &mut Report) {
    for (k, v) in meta {
        if let Some(t) = defined_type(k) {
            // Safetensors text that did not parse was reported when it was typed.
            let reported = container == Container::Safetensors && matches!(v, MetaValue::Str(_));
            if v.meta_type() != t && !reported {
                report.push(Finding::about(Code::BadKeyType, k.clone(), format!("has type {} but spec v1 requires {t}", v.meta_type())));
            }
        }
    }
}

/// The spec version text (`None` when missing or mistyped); `Err` when it is malformed or of an
/// unknown major, which stops interpretation of everything else. A newer minor is a warning.
fn read_version(keys: &Keys<'_>, report: &mut Report) -> Result<Option<String>, ()> {
    let version = keys.require_str(keys::SPEC_VERSION, report);
    if let Some(v) = &version {
        match SpecVersion::parse(v) {
            None => {
                report.push(Finding::about(Code::BadKeyValue, keys::SPEC_VERSION, format!("{v:?} is not \"major.minor\"; write \"1.0\"")));
                return Err(());
            }
            Some(sv) if sv.major != SPEC_MAJOR => {
                report.push(Finding::about(
                    Code::UnknownSpecMajor,
                    keys::SPEC_VERSION,
                    format!(
                        "spec major version {} is not supported by this reader (it implements {SPEC_MAJOR}.x); upgrade the toolkit",
                        sv.major
                    ),
                ));
                return Err(());
            }
            Some(sv) if sv.minor > SPEC_MINOR => {
                report.push(Finding::about(
                    Code::NewerMinor,
                    keys::SPEC_VERSION,
                    format!("file is spec {sv}, newer than this reader's {}; reading it as {}", SpecVersion::CURRENT, SpecVersion::CURRENT),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(version)
}

/// Checks `iapt.pool.type` (only "query") and returns `iapt.pool.scale`.
fn read_pool(keys: &Keys<'_>, report: &mut Report) -> Option<f32> {
    match keys.str_key(keys::POOL_TYPE) {
        None => missing(keys::POOL_TYPE, report),
        Some(Some(t)) if t != "query" => report.push(Finding::about(
            Code::BadKeyValue,
            keys::POOL_TYPE,
            format!("{t:?} is not a pooling type of spec v1; the only one is \"query\""),
        )),
        _ => {}
    }
    match keys.get(keys::POOL_SCALE) {
        None => {
            missing(keys::POOL_SCALE, report);
            None
        }
        Some(_) => match keys.typed(keys::POOL_SCALE) {
            Some(MetaValue::F32(f)) => Some(*f),
            _ => None,
        },
    }
}

/// `iapt.activation`: a fixed activation, or a rational one with its four keys.
fn read_activation(keys: &Keys<'_>, report: &mut Report) -> Option<Activation> {
    match keys.str_key(keys::ACTIVATION) {
        None => {
            missing(keys::ACTIVATION, report);
            None
        }
        Some(None) => None,
        Some(Some(name)) if name == "rational" => read_rational(keys, report),
        Some(Some(name)) => match Activation::fixed_from_name(&name) {
            Some(a) => Some(a),
            None => {
                report.push(Finding::about(
                    Code::UnknownActivation,
                    keys::ACTIVATION,
                    format!("{name:?} is not an activation of spec v1; use one of {}", Activation::NAMES.join(", ")),
                ));
                None
            }
        },
    }
}

/// The rational activation's variant, degrees and groups.
fn read_rational(keys: &Keys<'_>, report: &mut Report) -> Option<Activation> {
    let variant = match keys.str_key(keys::RATIONAL_VARIANT) {
        None => {
            missing(keys::RATIONAL_VARIANT, report);
            None
        }
        Some(None) => None,
        Some(Some(v)) => match RationalVariant::parse(&v) {
            Some(v) => Some(v),
            None => {
                report.push(Finding::about(
                    Code::UnknownRationalVariant,
                    keys::RATIONAL_VARIANT,
                    format!("{v:?} is not a rational variant; use \"A\", \"B\", \"C\" or \"D\""),
                ));
                None
            }
        },
    };
    let num = keys.require_u32(keys::RATIONAL_NUM_DEGREE, report);
    let den = keys.require_u32(keys::RATIONAL_DEN_DEGREE, report);
    let groups = keys.require_u32(keys::RATIONAL_GROUPS, report);
    match (variant, num, den, groups) {
        (Some(variant), Some(numerator_degree), Some(denominator_degree), Some(groups)) => {
            Some(Activation::Rational(RationalConfig { variant, numerator_degree, denominator_degree, groups }))
        }
        _ => None,
    }
}

/// GGUF only: `general.type` = "adapter", `adapter.type` = "iapt", and `general.architecture`
/// equal to `iapt.base_model.arch`.
fn check_gguf_container_keys(keys: &Keys<'_>, arch: &Option<Option<String>>, report: &mut Report) {
    let expect = [(keys::GENERAL_TYPE, "adapter"), (keys::ADAPTER_TYPE, "iapt")];
    for (key, want) in expect {
        match keys.get(key) {
            None => {
                report.push(Finding::about(Code::BadContainerKey, key, format!("missing; a GGUF IAPT adapter must set it to {want:?}")))
            }
            Some(MetaValue::Str(s)) if s == want => {}
            Some(MetaValue::Str(s)) => report.push(Finding::about(Code::BadContainerKey, key, format!("is {s:?} but must be {want:?}"))),
            Some(_) => {}
        }
    }
    match (keys.get(keys::GENERAL_ARCHITECTURE), arch) {
        (None, _) => {
            report.push(Finding::about(Code::BadContainerKey, keys::GENERAL_ARCHITECTURE, "missing; it must equal iapt.base_model.arch"))
        }
        (Some(MetaValue::Str(g)), Some(Some(a))) if g != a => report.push(Finding::about(
            Code::BadContainerKey,
            keys::GENERAL_ARCHITECTURE,
            format!("is {g:?} but iapt.base_model.arch is {a:?}; they must be equal"),
        )),
        _ => {}
    }
}

/// The optional keys (everything not required now, nor a container key), in file order: unknown
/// ones are kept with W002; rational keys without a rational activation are dropped with W002.
fn optional_keys(meta: &[(String, MetaValue)], keys: &Keys<'_>, activation: &Option<Activation>, report: &mut Report) -> Metadata {
    let says_rational = keys.says_rational();
    let mut required_now = vec![
        keys::SPEC_VERSION,
        keys::N_LAYER,
        keys::N_EMBD,
        keys::N_SOFT_TOKENS,
        keys::BOTTLENECK,
        keys::ACTIVATION,
        keys::POOL_TYPE,
        keys::POOL_SCALE,
        keys::BASE_MODEL_ARCH,
    ];
    if matches!(activation, Some(Activation::Rational(_))) || says_rational == Some(true) {
        required_now.extend([keys::RATIONAL_VARIANT, keys::RATIONAL_NUM_DEGREE, keys::RATIONAL_DEN_DEGREE, keys::RATIONAL_GROUPS]);
    }
    let mut extras = Vec::new();
    for (k, v) in meta {
        if required_now.contains(&k.as_str()) || is_gguf_container_key(k) || k == META_TYPES_KEY {
            continue;
        }
        if k.starts_with("iapt.rational.") && says_rational == Some(false) {
            report.push(Finding::about(Code::UnknownOptionalKey, k.clone(), "ignored and dropped: the activation is not rational"));
            continue;
        }
        if !KNOWN_OPTIONAL_KEYS.contains(&k.as_str()) {
            report.push(Finding::about(Code::UnknownOptionalKey, k.clone(), "optional key not defined by spec v1; kept as-is"));
        }
        extras.push((k.clone(), v.clone()));
    }
    extras
}

/// The config when its own value checks pass (their findings are pushed).
fn checked(c: AdapterConfig, report: &mut Report) -> Option<AdapterConfig> {
    let findings = c.check();
    let fatal = !findings.is_empty();
    for f in findings {
        report.push(f);
    }
    if fatal {
        None
    } else {
        Some(c)
    }
}
