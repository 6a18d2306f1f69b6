//! Validation findings: the stable rule codes of spec v1 section "Validation rules", severities, and
//! the report that collects every finding of a file (not only the first).

use std::fmt;

use serde::Serialize;

/// A validation rule of spec v1. The code strings (`E101`, ...) are stable: they never change
/// meaning, and retired codes are never reused. `spec/iapt-v1.md` lists them with their rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub enum Code {
    /// E001: the file cannot be read at all (missing, permission, I/O error).
    Unreadable,
    /// E002: the file ends before the structure its header declares (truncated).
    Truncated,
    /// E003: neither a GGUF nor a safetensors file (magic / header sniffing failed).
    UnknownContainer,
    /// E004: the container header is malformed (bad JSON, bad GGUF structure, limits exceeded).
    MalformedHeader,
    /// E005: tensor data offsets are wrong: out of bounds, overlapping, holes, misaligned, or a size
    /// that does not match dtype x shape.
    BadOffsets,
    /// E006: unsupported GGUF container version (only 3 is accepted).
    UnsupportedContainerVersion,
    /// E007: a metadata key appears twice.
    DuplicateKey,
    /// E101: a required metadata key is missing.
    MissingKey,
    /// E102: a metadata value has the wrong type (or, in safetensors, text that does not parse as it).
    BadKeyType,
    /// E103: a metadata value has the right type but an invalid value.
    BadKeyValue,
    /// E104: `iapt.spec_version` has a major version this reader does not know.
    UnknownSpecMajor,
    /// E105: `iapt.activation` names an unknown activation.
    UnknownActivation,
    /// E106: `iapt.rational.variant` names an unknown rational variant.
    UnknownRationalVariant,
    /// E107: a rational degree is outside 0..=8.
    DegreeOutOfRange,
    /// E108: `iapt.rational.groups` is zero or does not divide `iapt.bottleneck`.
    GroupsDoNotDivide,
    /// E109: a GGUF container key (`general.type`, `adapter.type`, `general.architecture`) is wrong.
    BadContainerKey,
    /// E201: a required tensor is missing (including a per-layer set with some layers missing).
    MissingTensor,
    /// E202: a tensor that spec v1 does not define, or that this config does not allow.
    UnexpectedTensor,
    /// E203: two tensors have the same name.
    DuplicateTensor,
    /// E204: a role is present both per layer and shared.
    SharedAndPerLayer,
    /// E205: a tensor's shape differs from the shape its role requires.
    ShapeMismatch,
    /// E206: a tensor's dtype is not F32, F16 or BF16, nor Q8_0 on a matrix (`down.weight`,
    /// `up.weight`) of a file that says spec 1.1 or later.
    DTypeNotAllowed,
    /// E207: a tensor holds NaN or an infinity.
    NonFinite,
    /// E208: a Q8_0 matrix whose rows are not whole blocks of 32 values, or (safetensors) whose
    /// `I8` values and `F16` scales `NAME_scale` do not make a pair (spec 1.1).
    BadQ8Layout,
    /// E301: the adapter's base architecture differs from the base model's `general.architecture`.
    BaseArchMismatch,
    /// E302: `iapt.n_layer` differs from the base model's `{arch}.block_count`.
    BaseLayerMismatch,
    /// E303: `iapt.n_embd` differs from the base model's `{arch}.embedding_length`.
    BaseEmbdMismatch,
    /// E304: the base model GGUF cannot be read or lacks the keys needed for the check.
    BaseModelUnreadable,
    /// W001: the spec minor version is newer than this reader's; read as 1.0.
    NewerMinor,
    /// W002: an optional metadata key this reader does not know (kept as-is).
    UnknownOptionalKey,
    /// W003: a tensor element's magnitude exceeds 65504 (the largest F16 value): no trained adapter
    /// needs it, and the generator overflows f32 with it on ordinary hidden states. The file is
    /// valid; runtimes (the engine, libiapt) refuse such an adapter at load.
    LargeWeight,
}

impl Code {
    /// The stable code string, e.g. `"E201"`.
    pub fn as_str(self) -> &'static str {
        use Code::*;
        match self {
            Unreadable => "E001",
            Truncated => "E002",
            UnknownContainer => "E003",
            MalformedHeader => "E004",
            BadOffsets => "E005",
            UnsupportedContainerVersion => "E006",
            DuplicateKey => "E007",
            MissingKey => "E101",
            BadKeyType => "E102",
            BadKeyValue => "E103",
            UnknownSpecMajor => "E104",
            UnknownActivation => "E105",
            UnknownRationalVariant => "E106",
            DegreeOutOfRange => "E107",
            GroupsDoNotDivide => "E108",
            BadContainerKey => "E109",
            MissingTensor => "E201",
            UnexpectedTensor => "E202",
            DuplicateTensor => "E203",
            SharedAndPerLayer => "E204",
            ShapeMismatch => "E205",
            DTypeNotAllowed => "E206",
            NonFinite => "E207",
            BadQ8Layout => "E208",
            BaseArchMismatch => "E301",
            BaseLayerMismatch => "E302",
            BaseEmbdMismatch => "E303",
            BaseModelUnreadable => "E304",
            NewerMinor => "W001",
            UnknownOptionalKey => "W002",
            LargeWeight => "W003",
        }
    }

    /// A short kebab-case name for the rule, e.g. `"missing-tensor"`.
    pub fn slug(self) -> &'static str {
        use Code::*;
        match self {
            Unreadable => "unreadable",
            Truncated => "truncated",
            UnknownContainer => "unknown-container",
            MalformedHeader => "malformed-header",
            BadOffsets => "bad-offsets",
            UnsupportedContainerVersion => "unsupported-container-version",
            DuplicateKey => "duplicate-key",
            MissingKey => "missing-key",
            BadKeyType => "bad-key-type",
            BadKeyValue => "bad-key-value",
            UnknownSpecMajor => "unknown-spec-major",
            UnknownActivation => "unknown-activation",
            UnknownRationalVariant => "unknown-rational-variant",
            DegreeOutOfRange => "degree-out-of-range",
            GroupsDoNotDivide => "groups-do-not-divide",
            BadContainerKey => "bad-container-key",
            MissingTensor => "missing-tensor",
            UnexpectedTensor => "unexpected-tensor",
            DuplicateTensor => "duplicate-tensor",
            SharedAndPerLayer => "shared-and-per-layer",
            ShapeMismatch => "shape-mismatch",
            DTypeNotAllowed => "dtype-not-allowed",
            NonFinite => "non-finite",
            BadQ8Layout => "bad-q8-layout",
            BaseArchMismatch => "base-arch-mismatch",
            BaseLayerMismatch => "base-layer-mismatch",
            BaseEmbdMismatch => "base-embd-mismatch",
            BaseModelUnreadable => "base-model-unreadable",
            NewerMinor => "newer-minor",
            UnknownOptionalKey => "unknown-optional-key",
            LargeWeight => "large-weight",
        }
    }

    /// Whether a finding with this code makes the file invalid (errors) or is informational (warnings).
    pub fn severity(self) -> Severity {
        if self.as_str().starts_with('W') {
            Severity::Warning
        } else {
            Severity::Error
        }
    }

    /// Every code, in code order (used by docs and tests).
    pub const ALL: [Code; 31] = {
        use Code::*;
        [
            Unreadable,
            Truncated,
            UnknownContainer,
            MalformedHeader,
            BadOffsets,
            UnsupportedContainerVersion,
            DuplicateKey,
            MissingKey,
            BadKeyType,
            BadKeyValue,
            UnknownSpecMajor,
            UnknownActivation,
            UnknownRationalVariant,
            DegreeOutOfRange,
            GroupsDoNotDivide,
            BadContainerKey,
            MissingTensor,
            UnexpectedTensor,
            DuplicateTensor,
            SharedAndPerLayer,
            ShapeMismatch,
            DTypeNotAllowed,
            NonFinite,
            BadQ8Layout,
            BaseArchMismatch,
            BaseLayerMismatch,
            BaseEmbdMismatch,
            BaseModelUnreadable,
            NewerMinor,
            UnknownOptionalKey,
            LargeWeight,
        ]
    };
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_str(), self.slug())
    }
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file is invalid.
    Error,
    /// The file is valid; the reader tells the user something.
    Warning,
}

/// One finding: a rule, where it applies, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The rule that fired.
    pub code: Code,
    /// The metadata key or tensor name the finding is about, if any.
    pub subject: Option<String>,
    /// What is wrong, lowercase, with a hint at the fix.
    pub message: String,
}

impl Finding {
    /// A finding about a named key or tensor.
    pub fn about(code: Code, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Finding { code, subject: Some(subject.into()), message: message.into() }
    }

    /// A finding about the file as a whole.
    pub fn file(code: Code, message: impl Into<String>) -> Self {
        Finding { code, subject: None, message: message.into() }
    }

    /// The severity of this finding's code.
    pub fn severity(&self) -> Severity {
        self.code.severity()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity() {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.subject {
            Some(s) => write!(f, "{level}[{}]: {s}: {}", self.code, self.message),
            None => write!(f, "{level}[{}]: {}", self.code, self.message),
        }
    }
}

impl Serialize for Finding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Finding", 5)?;
        st.serialize_field("code", self.code.as_str())?;
        st.serialize_field("rule", self.code.slug())?;
        st.serialize_field("severity", &self.severity())?;
        st.serialize_field("subject", &self.subject)?;
        st.serialize_field("message", &self.message)?;
        st.end()
    }
}

/// Every finding about one file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Findings in the order they were found (structure, metadata, tensors, base model).
    pub findings: Vec<Finding>,
}

impl Report {
    /// Adds a finding.
    pub fn push(&mut self, finding: Finding) {
        self.findings.push(finding);
    }

    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity() == Severity::Error)
    }

    /// The error findings.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity() == Severity::Error)
    }

    /// The warning findings.
    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity() == Severity::Warning)
    }

    /// Whether some finding has this code.
    pub fn has(&self, code: Code) -> bool {
        self.findings.iter().any(|f| f.code == code)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, finding) in self.findings.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {}", c.as_str());
            assert!(seen.insert(c.slug()), "duplicate slug {}", c.slug());
        }
    }
}
