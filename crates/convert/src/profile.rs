//! Mapping profiles: which checkpoint keys become which IAPT tensors.
//!
//! A profile is a JSON file (format documented in `converters/profiles/README.md`):
//!
//! ```json
//! { "name": "blocks", "description": "...",
//!   "tensors": [ { "pattern": "blocks.{layer}.gen.w_down", "role": "down.weight", "transpose": true },
//!                { "pattern": "queries", "role": "pool.query" } ] }
//! ```
//!
//! A pattern matches a key when it equals the key's tail starting at the key's beginning or right
//! after a `.` (so any prefix is allowed); `{layer}` stands for a decimal layer number. A pattern
//! without `{layer}` maps to the shared tensor of its role. Rules are tried in order and the first
//! match wins. `transpose` swaps the two dimensions of a 2-D tensor.
//!
//! The profiles shipped in `converters/profiles/` are built in and selected by name.

use std::path::{Path, PathBuf};

use iapt_format::{Role, Scope, MAX_N_LAYER};
use serde::Deserialize;

/// Profiles built into the converter: `(name, JSON)`.
pub const BUILTIN: [(&str, &str); 2] = [
    ("reference", include_str!("../../../converters/profiles/reference.json")),
    ("blocks", include_str!("../../../converters/profiles/blocks.json")),
];

/// Largest profile file accepted.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Reading the profile file failed.
    #[error("cannot read profile {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a built-in profile name nor an existing file.
    #[error("no profile named {name:?}; built-in profiles are {builtin}, or give the path of a profile JSON file")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The built-in names.
        builtin: String,
    },
    /// The profile JSON is malformed.
    #[error("profile {name}: {what} (see converters/profiles/README.md for the format)")]
    Malformed {
        /// The profile name or file.
        name: String,
        /// What was wrong.
        what: String,
    },
}

/// What a key maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// One layer, or shared by all.
    pub scope: Scope,
    /// The IAPT role.
    pub role: Role,
    /// Whether to swap the two dimensions.
    pub transpose: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: String,
    /// Text before `{layer}` (the whole pattern when there is none).
    pre: String,
    /// Text after `{layer}`; `None` for a shared pattern.
    post: Option<String>,
    role: Role,
    transpose: bool,
}

/// A parsed mapping profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    name: String,
    description: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    description: String,
    tensors: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    pattern: String,
    role: String,
    #[serde(default)]
    transpose: bool,
}

impl Profile {
    /// The default profile: the reference training layout.
    pub fn reference() -> Profile {
        Profile::builtin("reference").expect("the built-in reference profile parses (tested)")
    }

    /// A built-in profile by name.
    pub fn builtin(name: &str) -> Option<Profile> {
        BUILTIN.iter().find(|(n, _)| *n == name).and_then(|(n, text)| Profile::from_json(n, text).ok())
    }

    /// A built-in profile name, or else the path of a profile file.
    pub fn load(name_or_file: &str) -> Result<Profile, ProfileError> {
        if let Some(p) = Profile::builtin(name_or_file) {
            return Ok(p);
        }
        let path = Path::new(name_or_file);
        if !path.is_file() {
            let builtin = BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            return Err(ProfileError::Unknown { name: name_or_file.to_owned(), builtin });
        }
        let io = |source| ProfileError::Io { path: path.to_owned(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_PROFILE_BYTES {
            return Err(ProfileError::Malformed {
                name: path.display().to_string(),
                what: format!("{len} bytes is more than the {MAX_PROFILE_BYTES}-byte limit"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Profile::from_json(&path.display().to_string(), &text)
    }

    /// Parses a profile's JSON; `origin` names it in messages.
    pub fn from_json(origin: &str, text: &str) -> Result<Profile, ProfileError> {
        let bad = |what: String| ProfileError::Malformed { name: origin.to_owned(), what };
        let raw: RawProfile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if raw.tensors.is_empty() {
            return Err(bad("\"tensors\" is empty".into()));
        }
        let mut rules = Vec::with_capacity(raw.tensors.len());
        for r in raw.tensors {
            let role = Role::parse(&r.role)
                .ok_or_else(|| bad(format!("role {:?} is not one of {}", r.role, Role::ALL.map(Role::as_str).join(", "))))?;
            let (pre, post) = match r.pattern.split_once("{layer}") {
                Some((a, b)) => (a.to_owned(), Some(b.to_owned())),
                None => (r.pattern.clone(), None),
            };
            let extra_brace = |s: &str| s.contains('{') || s.contains('}');
            if r.pattern.is_empty() || extra_brace(&pre) || post.as_deref().is_some_and(extra_brace) {
                return Err(bad(format!("pattern {:?} must be non-empty with at most one {{layer}} and no other braces", r.pattern)));
            }
            if r.pattern.starts_with('.') {
                return Err(bad(format!("pattern {:?} must not start with '.'", r.pattern)));
            }
            rules.push(Rule { pattern: r.pattern, pre, post, role, transpose: r.transpose });
        }
        Ok(Profile { name: raw.name, description: raw.description, rules })
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The profile's description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// What `key` maps to, if any rule matches.
    pub fn map(&self, key: &str) -> Option<Mapped> {
        self.rules.iter().find_map(|r| r.matches(key))
    }
}

impl Rule {
    fn matches(&self, key: &str) -> Option<Mapped> {
        // Try every tail of the key that starts at its beginning or right after a '.'.
        let starts = std::iter::once(0).chain(key.match_indices('.').map(|(i, _)| i + 1));
        for s in starts {
            let tail = &key[s..];
            let Some(after) = tail.strip_prefix(self.pre.as_str()) else { continue };
            match &self.post {
                None if after.is_empty() => {
                    return Some(Mapped { scope: Scope::Shared, role: self.role, transpose: self.transpose });
                }
                None => {}
                Some(post) => {
                    let digits = after.bytes().take_while(u8::is_ascii_digit).count();
                    let (num, rest) = after.split_at(digits);
                    let canonical = !num.is_empty() && (num == "0" || !num.starts_with('0'));
                    if canonical && rest == post {
                        if let Ok(l) = num.parse::<u32>() {
                            if l < MAX_N_LAYER {
                                return Some(Mapped { scope: Scope::Layer(l), role: self.role, transpose: self.transpose });
                            }
                        }
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        for (name, text) in BUILTIN {
            let p = Profile::from_json(name, text).unwrap();
            assert_eq!(p.name(), name);
        }
    }

    #[test]
    fn reference_maps_any_prefix() {
        let p = Profile::reference();
        let m = p.map("base_model.model.model.layers.12.prompt_generator.down.weight").unwrap();
        assert_eq!((m.scope, m.role, m.transpose), (Scope::Layer(12), Role::DownWeight, false));
        let m = p.map("layers.0.prompt_generator.activation.numerator").unwrap();
        assert_eq!((m.scope, m.role), (Scope::Layer(0), Role::ActNum));
        let m = p.map("model.prompt_generator.activation.numerator").unwrap();
        assert_eq!((m.scope, m.role), (Scope::Shared, Role::ActNum));
        assert_eq!(p.map("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(p.map("xlayers.0.prompt_generator.down.weight"), None);
        assert_eq!(p.map("layers.01.prompt_generator.down.weight"), None);
        assert_eq!(p.map("layers.1.prompt_generator.down.weight.extra"), None);
    }

    #[test]
    fn malformed_profiles_are_refused() {
        for bad in [
            r#"{"name":"x","tensors":[]}"#,
            r#"{"name":"x","tensors":[{"pattern":"a.{layer}.{layer}","role":"down.weight"}]}"#,
            r#"{"name":"x","tensors":[{"pattern":"a","role":"down.weights"}]}"#,
            r#"{"name":"x","tensors":[{"pattern":"a","role":"down.weight","transpos":true}]}"#,
        ] {
            assert!(matches!(Profile::from_json("t", bad), Err(ProfileError::Malformed { .. })), "{bad}");
        }
    }
}
