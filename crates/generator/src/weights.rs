//! The two large matrices of a layer (W_down, W_up) held as the adapter stores them: F32, F16,
//! BF16 or Q8_0 blocks. A resident adapter then costs its stored size, not twice it (issue 29).
//!
//! They are only ever read by the tail's row products ([`Weights::dot_rows`]), whose kernel widens
//! each chunk of a row to f32 in registers right before its multiply-adds (`kernels::RowElem`).
//! Widening F16 and BF16 to f32 is exact and every product is computed as before, so the result has
//! the same bits as with the weights converted to f32 at load (tested), while the matrix is read
//! from memory at half the bytes.
//!
//! Q8_0 rows are decoded (exactly: `d * q` fits an f32) a few rows at a time into a small f32
//! buffer that the same f32 kernel then reads, so a Q8_0 matrix also gives the bits of its decoded
//! f32 matrix (tested) while it is held at 34 bytes per 32 values.

use std::sync::Arc;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use iapt_format::{DType, Tensor, Q8_BLOCK, Q8_BLOCK_BYTES};

use crate::kernels;

/// A row-major matrix in its stored element type.
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    F32(Arc<[f32]>),
    F16(Arc<[f16]>),
    Bf16(Arc<[bf16]>),
    /// ggml Q8_0 blocks as stored (34 bytes per 32 values along a row).
    Q8(Arc<[u8]>),
}

/// Q8_0 rows decoded per kernel call: a buffer of a few rows stays in the L1/L2 cache.
const Q8_ROWS: usize = 8;

impl Weights {
    /// The tensor's values as stored.
    pub(crate) fn from_tensor(t: &Tensor) -> std::io::Result<Weights> {
        let bytes = t.bytes()?;
        let halves = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        Ok(match t.dtype() {
            DType::F32 => Weights::F32(t.dtype().decode(&bytes).into()),
            DType::F16 => Weights::F16(halves().map(f16::from_bits).collect()),
            DType::BF16 => Weights::Bf16(halves().map(bf16::from_bits).collect()),
            DType::Q8_0 => Weights::Q8(bytes.as_ref().into()),
        })
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::F16(v) => v.len(),
            Weights::Bf16(v) => v.len(),
            Weights::Q8(b) => b.len() / Q8_BLOCK_BYTES * Q8_BLOCK,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Weights::F32(v) => v.len() * 4,
            Weights::F16(v) => v.len() * 2,
            Weights::Bf16(v) => v.len() * 2,
            Weights::Q8(b) => b.len(),
        }
    }

    /// Identity of the allocation (a tensor shared by every layer is held once).
    pub(crate) fn key(&self) -> usize {
        match self {
            Weights::F32(v) => Arc::as_ptr(v) as *const f32 as usize,
            Weights::F16(v) => Arc::as_ptr(v) as *const f16 as usize,
            Weights::Bf16(v) => Arc::as_ptr(v) as *const bf16 as usize,
            Weights::Q8(b) => Arc::as_ptr(b) as *const u8 as usize,
        }
    }

    /// The values when held as f32.
    pub(crate) fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Weights::F32(v) => Some(v),
            _ => None,
        }
    }

    /// All values widened to f32.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len()];
        match self {
            Weights::F32(v) => out.copy_from_slice(v),
            Weights::F16(v) => v.convert_to_f32_slice(&mut out),
            Weights::Bf16(v) => v.convert_to_f32_slice(&mut out),
            Weights::Q8(b) => DType::Q8_0.decode_into(b, &mut out),
        }
        out
    }

    /// `out[k * n + i] = scale * <vecs[k], row(rows.start + i)>` for `k < m`, `i < n` over rows of
    /// `c` values (`n = rows.len()`): [`kernels::dot_rows`] on the rows as stored.
    pub(crate) fn dot_rows(&self, vecs: &[f32], m: usize, rows: std::ops::Range<usize>, c: usize, scale: f32, out: &mut [f32]) {
        let span = rows.start * c..rows.end * c;
        match self {
            Weights::F32(v) => kernels::dot_rows(vecs, m, &v[span], c, scale, out),
            Weights::F16(v) => kernels::dot_rows(vecs, m, &v[span], c, scale, out),
            Weights::Bf16(v) => kernels::dot_rows(vecs, m, &v[span], c, scale, out),
            Weights::Q8(b) => q8_dot_rows(b, vecs, m, rows, c, scale, out),
        }
    }
}

/// [`Weights::dot_rows`] for Q8_0 rows of `c` values (whole blocks): [`Q8_ROWS`] rows at a time
/// decoded into f32, then [`kernels::dot_rows`] on them. Each output depends only on its row and
/// vector, so the result has the bits of the f32 kernel on the whole decoded matrix.
fn q8_dot_rows(blocks: &[u8], vecs: &[f32], m: usize, rows: std::ops::Range<usize>, c: usize, scale: f32, out: &mut [f32]) {
    let row_bytes = c / Q8_BLOCK * Q8_BLOCK_BYTES;
    let n = rows.len();
    let mut buf = vec![0.0f32; Q8_ROWS.min(n) * c];
    let mut part = vec![0.0f32; m * Q8_ROWS.min(n)];
    for r0 in rows.clone().step_by(Q8_ROWS) {
        let k = (rows.end - r0).min(Q8_ROWS);
        DType::Q8_0.decode_into(&blocks[r0 * row_bytes..(r0 + k) * row_bytes], &mut buf[..k * c]);
        kernels::dot_rows(vecs, m, &buf[..k * c], c, scale, &mut part[..m * k]);
        let i0 = r0 - rows.start;
        for g in 0..m {
            out[g * n + i0..g * n + i0 + k].copy_from_slice(&part[g * k..(g + 1) * k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use iapt_format::{Role, TensorName};

    /// The stored-type product has the bits of the f32 product of the widened matrix, for every
    /// dtype, rows whose length is not a multiple of the kernels' chunks, 1 to 5 vectors (every
    /// group size), and a row range that does not start at 0.
    #[test]
    fn stored_products_equal_the_widened_f32_products() {
        let mut rng = Rng::new(29);
        let name = TensorName::layer(0, Role::DownWeight);
        // (Q8_0 runs on the shapes whose rows are whole blocks: 40 x 64, 3 x 8192, 19 x 96.)
        for &(rows, c) in &[(7usize, 3000usize), (40, 64), (3, 8192), (9, 8193), (19, 96)] {
            let values = rng.vec_f32(rows * c, 1.0);
            for dtype in DType::ALL {
                let shape = vec![rows as u64, c as u64];
                let Some(stored) = dtype.data_bytes(&shape) else { continue };
                let t = Tensor::from_f32(name, dtype, shape, &values).unwrap();
                let w = Weights::from_tensor(&t).unwrap();
                assert_eq!(w.bytes() as u64, stored);
                let wide = w.to_f32();
                assert_eq!(wide, t.to_f32().unwrap(), "{dtype:?}: widening is the format's decoding");
                for m in 1..=5 {
                    let vecs = rng.vec_f32(m * c, 1.0);
                    let (r0, r1) = (1, rows);
                    let mut got = vec![f32::NAN; m * (r1 - r0)];
                    w.dot_rows(&vecs, m, r0..r1, c, 0.5, &mut got);
                    let mut want = vec![f32::NAN; m * (r1 - r0)];
                    kernels::dot_rows(&vecs, m, &wide[r0 * c..r1 * c], c, 0.5, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{dtype:?} {rows}x{c} m {m}");
                }
            }
        }
    }
}
