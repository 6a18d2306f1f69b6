//! Metadata values: the GGUF value types, and their text form in safetensors `__metadata__`.
//!
//! GGUF metadata is typed; safetensors metadata is a map of strings. Spec v1 fixes the GGUF type of
//! every key it defines, so those convert without extra information. Optional keys of other types
//! keep their type through safetensors by an entry in the reserved key [`META_TYPES_KEY`], a JSON
//! object mapping key to type name (`"u64"`, `"array[u32]"`, ...), so GGUF -> safetensors -> GGUF is
//! lossless.

use std::fmt;

/// The reserved safetensors metadata key that records GGUF types of optional non-string keys.
pub const META_TYPES_KEY: &str = "iapt.meta_types";

/// A GGUF metadata value type. Discriminants are the GGUF `gguf_metadata_value_type` ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaType {
    /// GGUF type 0.
    U8,
    /// GGUF type 1.
    I8,
    /// GGUF type 2.
    U16,
    /// GGUF type 3.
    I16,
    /// GGUF type 4.
    U32,
    /// GGUF type 5.
    I32,
    /// GGUF type 6.
    F32,
    /// GGUF type 7.
    Bool,
    /// GGUF type 8.
    Str,
    /// GGUF type 9, with the element type.
    Array(Box<MetaType>),
    /// GGUF type 10.
    U64,
    /// GGUF type 11.
    I64,
    /// GGUF type 12.
    F64,
}

impl MetaType {
    /// The GGUF type id.
    pub fn gguf_id(&self) -> u32 {
        match self {
            MetaType::U8 => 0,
            MetaType::I8 => 1,
            MetaType::U16 => 2,
            MetaType::I16 => 3,
            MetaType::U32 => 4,
            MetaType::I32 => 5,
            MetaType::F32 => 6,
            MetaType::Bool => 7,
            MetaType::Str => 8,
            MetaType::Array(_) => 9,
            MetaType::U64 => 10,
            MetaType::I64 => 11,
            MetaType::F64 => 12,
        }
    }

    /// The scalar type for a GGUF id (arrays are built by the reader, not here).
    pub fn scalar_from_gguf_id(id: u32) -> Option<MetaType> {
        Some(match id {
            0 => MetaType::U8,
            1 => MetaType::I8,
            2 => MetaType::U16,
            3 => MetaType::I16,
            4 => MetaType::U32,
            5 => MetaType::I32,
            6 => MetaType::F32,
            7 => MetaType::Bool,
            8 => MetaType::Str,
            10 => MetaType::U64,
            11 => MetaType::I64,
            12 => MetaType::F64,
            _ => return None,
        })
    }

    /// Parses a type name as written by [`fmt::Display`] (`u32`, `string`, `array[f32]`, ...).
    pub fn parse(name: &str) -> Option<MetaType> {
        if let Some(inner) = name.strip_prefix("array[").and_then(|s| s.strip_suffix(']')) {
            return Some(MetaType::Array(Box::new(MetaType::parse(inner)?)));
        }
        Some(match name {
            "u8" => MetaType::U8,
            "i8" => MetaType::I8,
            "u16" => MetaType::U16,
            "i16" => MetaType::I16,
            "u32" => MetaType::U32,
            "i32" => MetaType::I32,
            "f32" => MetaType::F32,
            "bool" => MetaType::Bool,
            "string" => MetaType::Str,
            "u64" => MetaType::U64,
            "i64" => MetaType::I64,
            "f64" => MetaType::F64,
            _ => return None,
        })
    }
}

impl fmt::Display for MetaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaType::U8 => f.write_str("u8"),
            MetaType::I8 => f.write_str("i8"),
            MetaType::U16 => f.write_str("u16"),
            MetaType::I16 => f.write_str("i16"),
            MetaType::U32 => f.write_str("u32"),
            MetaType::I32 => f.write_str("i32"),
            MetaType::F32 => f.write_str("f32"),
            MetaType::Bool => f.write_str("bool"),
            MetaType::Str => f.write_str("string"),
            MetaType::Array(t) => write!(f, "array[{t}]"),
            MetaType::U64 => f.write_str("u64"),
            MetaType::I64 => f.write_str("i64"),
            MetaType::F64 => f.write_str("f64"),
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    Str(String),
    /// Array of values all of the element type.
    Array(MetaType, Vec<MetaValue>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl MetaValue {
    /// This value's type.
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::Str(_) => MetaType::Str,
            MetaValue::Array(t, _) => MetaType::Array(Box::new(t.clone())),
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The canonical text form used in safetensors metadata: strings as-is, integers in decimal,
    /// floats in the shortest decimal that parses back to the same value, booleans `true`/`false`,
    /// arrays as a JSON array of the elements' JSON forms.
    pub fn to_text(&self) -> String {
        match self {
            MetaValue::Str(s) => s.clone(),
            MetaValue::Array(..) => self.to_json().to_string(),
            other => other.scalar_text(),
        }
    }

    fn scalar_text(&self) -> String {
        match self {
            MetaValue::U8(v) => v.to_string(),
            MetaValue::I8(v) => v.to_string(),
            MetaValue::U16(v) => v.to_string(),
            MetaValue::I16(v) => v.to_string(),
            MetaValue::U32(v) => v.to_string(),
            MetaValue::I32(v) => v.to_string(),
            MetaValue::U64(v) => v.to_string(),
            MetaValue::I64(v) => v.to_string(),
            MetaValue::F32(v) => float_text(f64::from(*v), v.to_string()),
            MetaValue::F64(v) => float_text(*v, v.to_string()),
            MetaValue::Bool(v) => v.to_string(),
            MetaValue::Str(s) => s.clone(),
            MetaValue::Array(..) => self.to_json().to_string(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            MetaValue::Str(s) => serde_json::Value::String(s.clone()),
            MetaValue::Array(_, vs) => serde_json::Value::Array(vs.iter().map(|v| v.to_json()).collect()),
            MetaValue::Bool(b) => serde_json::Value::Bool(*b),
            // Numbers go through their exact text so that JSON never rounds them.
            other => {
                let text = other.scalar_text();
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
            }
        }
    }

    /// Parses the text form of a value of type `ty`; `None` if the text is not of that type.
    pub fn from_text(ty: &MetaType, text: &str) -> Option<MetaValue> {
        match ty {
            MetaType::Str => Some(MetaValue::Str(text.to_owned())),
            MetaType::Array(_) => {
                let json: serde_json::Value = serde_json::from_str(text).ok()?;
                MetaValue::from_json(ty, &json)
            }
            _ => parse_scalar(ty, text),
        }
    }

    fn from_json(ty: &MetaType, json: &serde_json::Value) -> Option<MetaValue> {
        match ty {
            MetaType::Array(elem) => {
                let items = json.as_array()?;
                let values = items.iter().map(|j| MetaValue::from_json(elem, j)).collect::<Option<Vec<_>>>()?;
                Some(MetaValue::Array((**elem).clone(), values))
            }
            MetaType::Str => Some(MetaValue::Str(json.as_str()?.to_owned())),
            MetaType::Bool => Some(MetaValue::Bool(json.as_bool()?)),
            scalar => {
                let text = match json {
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    _ => return None,
                };
                parse_scalar(scalar, &text)
            }
        }
    }
}

/// Floats: Rust's shortest round-trip text, except that non-finite values use the JSON-free names
/// `nan`, `inf`, `-inf`.
fn float_text(v: f64, shortest: String) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        shortest
    }
}

fn parse_scalar(ty: &MetaType, text: &str) -> Option<MetaValue> {
    // Integers: canonical decimal only (no sign but a '-' on non-zero values, no leading zeros),
    // so that text and value map one to one.
    fn int_ok(t: &str) -> bool {
        let digits = t.strip_prefix('-').unwrap_or(t);
        let canonical = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
        canonical && t != "-0"
    }
    Some(match ty {
        MetaType::U8 if int_ok(text) => MetaValue::U8(text.parse().ok()?),
        MetaType::I8 if int_ok(text) => MetaValue::I8(text.parse().ok()?),
        MetaType::U16 if int_ok(text) => MetaValue::U16(text.parse().ok()?),
        MetaType::I16 if int_ok(text) => MetaValue::I16(text.parse().ok()?),
        MetaType::U32 if int_ok(text) => MetaValue::U32(text.parse().ok()?),
        MetaType::I32 if int_ok(text) => MetaValue::I32(text.parse().ok()?),
        MetaType::U64 if int_ok(text) => MetaValue::U64(text.parse().ok()?),
        MetaType::I64 if int_ok(text) => MetaValue::I64(text.parse().ok()?),
        MetaType::F32 => MetaValue::F32(text.parse().ok()?),
        MetaType::F64 => MetaValue::F64(text.parse().ok()?),
        MetaType::Bool => match text {
            "true" => MetaValue::Bool(true),
            "false" => MetaValue::Bool(false),
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_every_type() {
        let values = vec![
            MetaValue::U8(7),
            MetaValue::I8(-7),
            MetaValue::U16(65535),
            MetaValue::I16(-300),
            MetaValue::U32(4096),
            MetaValue::I32(-1),
            MetaValue::F32(0.1),
            MetaValue::F32(1e-40),
            MetaValue::Bool(true),
            MetaValue::Str("héllo \"x\"".into()),
            MetaValue::U64(u64::MAX),
            MetaValue::I64(i64::MIN),
            MetaValue::F64(std::f64::consts::PI),
            MetaValue::Array(MetaType::U32, vec![MetaValue::U32(1), MetaValue::U32(2)]),
            MetaValue::Array(MetaType::Str, vec![MetaValue::Str("a,b".into())]),
            MetaValue::Array(MetaType::F32, vec![MetaValue::F32(0.3), MetaValue::F32(-2.5)]),
        ];
        for v in values {
            let ty = v.meta_type();
            let text = v.to_text();
            assert_eq!(MetaValue::from_text(&ty, &text), Some(v.clone()), "{text}");
            assert_eq!(MetaType::parse(&ty.to_string()), Some(ty));
        }
    }

    #[test]
    fn integers_reject_non_canonical_text() {
        for t in ["+1", " 1", "1.0", "0x10", "", "007", "00"] {
            assert_eq!(MetaValue::from_text(&MetaType::U32, t), None, "{t:?}");
        }
        assert_eq!(MetaValue::from_text(&MetaType::I32, "-0"), None);
        assert_eq!(MetaValue::from_text(&MetaType::U32, "0"), Some(MetaValue::U32(0)));
    }
}
