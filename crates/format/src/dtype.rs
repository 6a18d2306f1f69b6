//! Element types an adapter tensor may have (F32, F16, BF16) and their encodings in both containers.

use std::fmt;

/// The element type of an adapter tensor. Spec v1 allows exactly these three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE 754 binary32, little-endian.
    F32,
    /// IEEE 754 binary16, little-endian.
    F16,
    /// bfloat16 (the upper half of a binary32), little-endian.
    BF16,
}

impl DType {
    /// All dtypes, in spec order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors `dtype` string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Parses a safetensors `dtype` string; `None` for any dtype spec v1 does not allow.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The `ggml_type` id used in GGUF tensor infos (GGML_TYPE_F32 = 0, F16 = 1, BF16 = 30).
    pub fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 30,
        }
    }

    /// Maps a `ggml_type` id back; `None` for quantized or other types spec v1 does not allow.
    pub fn from_ggml_type(id: u32) -> Option<DType> {
        match id {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            30 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Parses the user-facing lowercase name (`f32`, `f16`, `bf16`).
    pub fn from_lowercase(name: &str) -> Option<DType> {
        match name {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Decodes little-endian elements of this dtype into `out` (which must hold `bytes.len() / size`
    /// elements). Exact: every F16/BF16 value is representable in f32.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }

    /// Decodes little-endian elements into a new `Vec<f32>`.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0f32; bytes.len() / self.size()];
        self.decode_into(&bytes[..out.len() * self.size()], &mut out);
        out
    }

    /// Encodes f32 values as little-endian elements of this dtype (round to nearest even for F16/BF16).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
            DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
        }
        out
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}
