//! Element types an adapter tensor may have and their encodings in both containers: the floats F32,
//! F16 and BF16 (spec 1.0), and Q8_0 (spec 1.1), ggml's 8-bit blocks, for the two matrices.
//!
//! A Q8_0 tensor is held here in ggml's block layout, the bytes GGUF stores: each run of
//! [`Q8_BLOCK`] values along a row is one block of [`Q8_BLOCK_BYTES`] bytes, an F16 scale `d` then
//! 32 signed bytes `q`, and value `i` of the block is `d * q[i]`. That product is exact in f32 (an
//! F16 significand of 11 bits times 8 bits of `q`), so decoding is exact, like widening F16.
//! Quantizing is ggml's reference rule (`quantize_row_q8_0_ref`, also gguf-py's): `d = max|x| /
//! 127` in f32, stored rounded to F16, and `q = round(x / d)` computed as `x * (1 / d)` and
//! rounded half away from zero, so our blocks equal theirs byte for byte (the test vectors check
//! it against gguf-py).

use std::fmt;

/// Values per Q8_0 block (ggml's `QK8_0`).
pub const Q8_BLOCK: usize = 32;
/// Bytes per Q8_0 block: an F16 scale and 32 signed bytes (ggml's `sizeof(block_q8_0)`).
pub const Q8_BLOCK_BYTES: usize = 34;

/// The element type of an adapter tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE 754 binary32, little-endian.
    F32,
    /// IEEE 754 binary16, little-endian.
    F16,
    /// bfloat16 (the upper half of a binary32), little-endian.
    BF16,
    /// ggml's Q8_0 (spec 1.1): blocks of 32 values along a row, an F16 scale and 32 signed bytes
    /// each. Only `down.weight` and `up.weight` may have it, with rows a multiple of 32 long.
    Q8_0,
}

impl DType {
    /// Every dtype, in spec order.
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0];
    /// The float dtypes: every tensor of any shape may have one of these (spec 1.0).
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Values per storage block along a row: 1 for the floats, [`Q8_BLOCK`] for Q8_0.
    pub fn block_len(self) -> u64 {
        match self {
            DType::Q8_0 => Q8_BLOCK as u64,
            _ => 1,
        }
    }

    /// Bytes per storage block (per element for the floats).
    pub fn block_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => Q8_BLOCK_BYTES as u64,
        }
    }

    /// Data bytes of a tensor of this dtype and row-major `shape`: `None` when a Q8_0 tensor's rows
    /// (its last dimension) are not a multiple of [`Q8_BLOCK`], or on overflow.
    pub fn data_bytes(self, shape: &[u64]) -> Option<u64> {
        let row = shape.last().copied().unwrap_or(1);
        if row % self.block_len() != 0 {
            return None;
        }
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        (numel / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Whether this is one of the float dtypes of spec 1.0.
    pub fn is_float(self) -> bool {
        self != DType::Q8_0
    }

    /// The safetensors `dtype` string of the floats; Q8_0 has none (a safetensors file stores it as
    /// an `I8` tensor and an `F16` scale tensor, spec 1.1), and this gives `"Q8_0"` for messages.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
        }
    }

    /// Parses a safetensors `dtype` string; `None` for any dtype a tensor cannot have on its own
    /// (including `I8`, which is only the values half of a Q8_0 pair).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The `ggml_type` id used in GGUF tensor infos (GGML_TYPE_F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30).
    pub fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q8_0 => 8,
            DType::BF16 => 30,
        }
    }

    /// Maps a `ggml_type` id back; `None` for every type the spec does not allow.
    pub fn from_ggml_type(id: u32) -> Option<DType> {
        match id {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            8 => Some(DType::Q8_0),
            30 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Parses the user-facing lowercase name (`f32`, `f16`, `bf16`, `q8_0`).
    pub fn from_lowercase(name: &str) -> Option<DType> {
        match name {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            "q8_0" => Some(DType::Q8_0),
            _ => None,
        }
    }

    /// Decodes little-endian data of this dtype into `out`, which must hold the values `bytes`
    /// encodes (whole blocks for Q8_0). Exact for every dtype.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len() as u64, out.len() as u64 / self.block_len() * self.block_bytes());
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
            DType::Q8_0 => {
                for (o, b) in out.chunks_exact_mut(Q8_BLOCK).zip(bytes.chunks_exact(Q8_BLOCK_BYTES)) {
                    let d = q8_scale(b);
                    for (v, &q) in o.iter_mut().zip(&b[2..]) {
                        *v = d * f32::from(q as i8);
                    }
                }
            }
        }
    }

    /// Decodes little-endian data into a new `Vec<f32>`.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() as u64 / self.block_bytes() * self.block_len();
        let mut out = vec![0.0f32; n as usize];
        let used = (n / self.block_len() * self.block_bytes()) as usize;
        self.decode_into(&bytes[..used], &mut out);
        out
    }

    /// Encodes f32 values as this dtype: round to nearest even for F16/BF16; for Q8_0 ggml's
    /// reference quantization of each run of 32 values (a trailing partial run is dropped, which
    /// [`crate::Tensor::from_f32`] then refuses as a size mismatch).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity((values.len() as u64 / self.block_len() * self.block_bytes()) as usize);
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
            DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
            DType::Q8_0 => values.chunks_exact(Q8_BLOCK).for_each(|x| quantize_q8_block(x, &mut out)),
        }
        out
    }
}

/// The f32 value of a Q8_0 block's F16 scale (its first two bytes).
#[inline]
pub(crate) fn q8_scale(block: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// Appends one Q8_0 block for 32 values: ggml's `quantize_row_q8_0_ref`.
fn quantize_q8_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    // `round` is C's roundf (half away from zero); `as i8` saturates, and |x * id| <= 127 anyway.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's rule on values whose quantized form is known by hand: the block's largest magnitude
    /// maps to +-127 and the scale is max|x| / 127 rounded to F16; zeros give a zero block.
    #[test]
    fn q8_blocks_follow_ggml_reference_rule() {
        let mut x = [0.0f32; 32];
        x[0] = 1.27;
        x[1] = -1.27;
        x[2] = 0.005; // 0.5 of a step: rounds away from zero
        x[3] = 0.3;
        let b = DType::Q8_0.encode(&x);
        assert_eq!(b.len(), 34);
        let d = half::f16::from_f32(1.27f32 / 127.0);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), d.to_bits());
        assert_eq!(b[2] as i8, 127);
        assert_eq!(b[3] as i8, -127);
        assert_eq!(b[4] as i8, (0.005f32 * (1.0 / (1.27f32 / 127.0))).round() as i8);
        assert_eq!(b[5] as i8, 30);
        let back = DType::Q8_0.decode(&b);
        assert_eq!(back[0], d.to_f32() * 127.0);
        assert_eq!(back[3], d.to_f32() * 30.0);
        assert_eq!(DType::Q8_0.encode(&[0.0; 32]), vec![0u8; 34]);
    }

    /// Decoding then encoding a Q8_0 tensor gives back its bytes (the values are the stored ones;
    /// each block's largest |q| is 127, so the scale is found again), and each decoded value is
    /// within half a step of its input plus what rounding the scale to F16 moves it (|q| x the
    /// scale's rounding error).
    #[test]
    fn q8_round_trips_and_is_within_half_a_step() {
        let mut s = 7u64;
        let x: Vec<f32> = (0..32 * 40)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        let b = DType::Q8_0.encode(&x);
        assert_eq!(b.len(), 40 * 34);
        let y = DType::Q8_0.decode(&b);
        assert_eq!(DType::Q8_0.encode(&y), b);
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let step = blk_x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            let scale_err = (half::f16::from_f32(step).to_f32() - step).abs();
            for (a, b) in blk_x.iter().zip(blk_y) {
                let bound = 0.5 * step + 127.0 * scale_err;
                assert!((a - b).abs() <= bound * 1.0001, "{a} vs {b}, step {step}");
            }
        }
    }

    #[test]
    fn data_bytes_needs_whole_blocks_per_row() {
        assert_eq!(DType::Q8_0.data_bytes(&[3, 64]), Some(3 * 2 * 34));
        assert_eq!(DType::Q8_0.data_bytes(&[64, 3]), None);
        assert_eq!(DType::F16.data_bytes(&[3, 5]), Some(30));
        assert_eq!(DType::F32.data_bytes(&[u64::MAX, 2]), None);
    }
}
