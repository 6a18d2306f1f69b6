//! The generator's thin products, by hand: every product with m (the soft tokens, 4 in the paper)
//! on one side. Written here rather than through `gemm` because `gemm` packs its operands before
//! multiplying, and for an m-row product the packing costs more than the arithmetic: profiling one
//! prefill at the TinyLlama shape (`examples/prefill_profile.rs`, `perf record`) put 44% of the
//! generator's time in `gemm_common::pack_operands::pack_lhs` and most of the rest in two small
//! microkernels. These loops read each large operand (hidden rows, W_down, W_up) once, in place,
//! and keep the m accumulators in registers.
//!
//! - [`dot_rows`]: `out[k][i] = scale * <vecs[k], rows[i]>` (scores H K, pooled W_down^T, u W_up^T);
//! - [`weighted_sum`]: `out[k] = sum_i e[k][i] * rows[i]` (the softmax-weighted pooling of a slice).
//!
//! Each body is written once, generic over whether to fuse multiply-adds, and compiled three times:
//! for AVX-512F, for AVX2 + FMA, and for the target's baseline; the widest one the CPU has is
//! picked at run time (`is_x86_feature_detected!`), as `gemm` does, so a default build (baseline
//! x86-64) still runs the AVX-512 loops. The accumulators are arrays of [`LANES`] independent
//! f32 sums that the compiler turns into vector registers; their order of summation is fixed, so a
//! given CPU always gives the same bits.
#![allow(unsafe_code)]

/// Independent f32 partial sums per accumulator (two AVX-512 registers, four AVX2 registers).
const LANES: usize = 32;
/// Soft tokens handled together (their accumulators stay in registers).
const GROUP: usize = 4;

/// `out[k * n + i] = scale * dot(vecs[k * c..][..c], rows[i * c..][..c])` for `k < m`, `i < n`,
/// where `n = rows.len() / c`. Panics (an internal bug) if a slice has the wrong length.
pub(crate) fn dot_rows(vecs: &[f32], m: usize, rows: &[f32], c: usize, scale: f32, out: &mut [f32]) {
    assert!(c > 0 && rows.len() % c == 0, "dot_rows: rows not a multiple of {c}");
    let n = rows.len() / c;
    assert_eq!(vecs.len(), m * c, "dot_rows: vecs");
    assert_eq!(out.len(), m * n, "dot_rows: out");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: `dot_rows_avx512` is `#[target_feature(enable = "avx512f")]`; calling it is
            // sound exactly when the running CPU supports AVX-512F, which the runtime check on the
            // line above established. Its body is the same safe code as the fallback below.
            return unsafe { x86::dot_rows_avx512(vecs, m, rows, c, scale, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above, for `#[target_feature(enable = "avx2,fma")]`: both features were
            // detected on the running CPU by the condition of this `if`.
            return unsafe { x86::dot_rows_avx2(vecs, m, rows, c, scale, out) };
        }
    }
    dot_rows_body::<false>(vecs, m, rows, c, scale, out);
}

/// `out[k * w..][..w] = sum_{i < ns} e[k * es + i] * rows[i * w..][..w]` for `k < m`, where
/// `ns = rows.len() / w` (overwrites `out`). Panics (an internal bug) if a slice is too short.
pub(crate) fn weighted_sum(e: &[f32], es: usize, m: usize, rows: &[f32], w: usize, out: &mut [f32]) {
    assert!(w > 0 && rows.len() % w == 0, "weighted_sum: rows not a multiple of {w}");
    let ns = rows.len() / w;
    assert!(m == 0 || (es >= ns && e.len() >= (m - 1) * es + ns), "weighted_sum: weights");
    assert_eq!(out.len(), m * w, "weighted_sum: out");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: `weighted_sum_avx512` is `#[target_feature(enable = "avx512f")]`; the runtime
            // check on the line above established that the running CPU supports AVX-512F.
            return unsafe { x86::weighted_sum_avx512(e, es, m, rows, w, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: `#[target_feature(enable = "avx2,fma")]`; both detected by this `if`.
            return unsafe { x86::weighted_sum_avx2(e, es, m, rows, w, out) };
        }
    }
    weighted_sum_body::<false>(e, es, m, rows, w, out);
}

/// The per-feature copies of the bodies (safe functions whose only precondition, the CPU feature,
/// is checked by the callers above).
#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_rows_avx512(vecs: &[f32], m: usize, rows: &[f32], c: usize, scale: f32, out: &mut [f32]) {
        super::dot_rows_body::<true>(vecs, m, rows, c, scale, out);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_rows_avx2(vecs: &[f32], m: usize, rows: &[f32], c: usize, scale: f32, out: &mut [f32]) {
        super::dot_rows_body::<true>(vecs, m, rows, c, scale, out);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn weighted_sum_avx512(e: &[f32], es: usize, m: usize, rows: &[f32], w: usize, out: &mut [f32]) {
        super::weighted_sum_body::<true>(e, es, m, rows, w, out);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum_avx2(e: &[f32], es: usize, m: usize, rows: &[f32], w: usize, out: &mut [f32]) {
        super::weighted_sum_body::<true>(e, es, m, rows, w, out);
    }
}

/// `a * b + c`, fused (one rounding) when the copy is compiled with FMA, else two roundings
/// (`f32::mul_add` without FMA hardware is a slow libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The first [`LANES`] values of `s` as an array (panics if shorter: an internal bug).
#[inline(always)]
fn lanes(s: &[f32]) -> &[f32; LANES] {
    s[..LANES].try_into().expect("LANES values")
}

/// `acc[l] += a[l] * x[l]` lane by lane: one loop over a fixed-size array, which the compiler
/// turns into vector instructions.
#[inline(always)]
fn fma_lanes<const FMA: bool>(acc: &mut [f32; LANES], a: &[f32; LANES], x: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = madd::<FMA>(a[l], x[l], acc[l]);
    }
}

#[inline(always)]
fn dot_rows_body<const FMA: bool>(vecs: &[f32], m: usize, rows: &[f32], c: usize, scale: f32, out: &mut [f32]) {
    let n = rows.len() / c;
    let mut k0 = 0;
    while k0 < m {
        let g = (m - k0).min(GROUP);
        let v = &vecs[k0 * c..(k0 + g) * c];
        let o = &mut out[k0 * n..(k0 + g) * n];
        match g {
            4 => dot_group::<4, FMA>(v, rows, c, scale, o),
            3 => dot_group::<3, FMA>(v, rows, c, scale, o),
            2 => dot_group::<2, FMA>(v, rows, c, scale, o),
            _ => dot_group::<1, FMA>(v, rows, c, scale, o),
        }
        k0 += g;
    }
}

/// [`dot_rows`] for `G` vectors: each row is read from memory once and dotted with all `G`; for
/// four vectors, in one pass that loads each chunk of the row once for the four products.
#[inline(always)]
fn dot_group<const G: usize, const FMA: bool>(vecs: &[f32], rows: &[f32], c: usize, scale: f32, out: &mut [f32]) {
    let n = rows.len() / c;
    for (i, row) in rows.chunks_exact(c).enumerate() {
        if G == 4 {
            let v: [&[f32]; 4] = std::array::from_fn(|g| &vecs[g * c..(g + 1) * c]);
            let d = dot4::<FMA>(v, row);
            for g in 0..4 {
                out[g * n + i] = scale * d[g];
            }
        } else {
            for (g, v) in vecs.chunks_exact(c).enumerate() {
                out[g * n + i] = scale * dot::<FMA>(v, row);
            }
        }
    }
}

/// Four dot products with one row, [`LANES`] / 2 partial sums each (four accumulators of one
/// AVX-512 register: the row chunk is loaded once for four multiply-adds).
#[inline(always)]
fn dot4<'a, const FMA: bool>(v: [&'a [f32]; 4], row: &'a [f32]) -> [f32; 4] {
    const H: usize = LANES / 2;
    let c = row.len();
    let full = c / H * H;
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; H], [0.0f32; H], [0.0f32; H], [0.0f32; H]);
    let chunks = |s: &'a [f32]| s[..full].chunks_exact(H).map(|c| -> &'a [f32; H] { c.try_into().expect("H values") });
    let vs = chunks(v[0]).zip(chunks(v[1])).zip(chunks(v[2])).zip(chunks(v[3]));
    for (x, (((v0, v1), v2), v3)) in chunks(row).zip(vs) {
        for l in 0..H {
            a0[l] = madd::<FMA>(v0[l], x[l], a0[l]);
            a1[l] = madd::<FMA>(v1[l], x[l], a1[l]);
            a2[l] = madd::<FMA>(v2[l], x[l], a2[l]);
            a3[l] = madd::<FMA>(v3[l], x[l], a3[l]);
        }
    }
    let mut s = [a0.iter().sum::<f32>(), a1.iter().sum::<f32>(), a2.iter().sum::<f32>(), a3.iter().sum::<f32>()];
    for j in full..c {
        for (g, sg) in s.iter_mut().enumerate() {
            *sg = madd::<FMA>(v[g][j], row[j], *sg);
        }
    }
    s
}

/// `<a, b>` for slices of equal length, in [`LANES`] independent partial sums.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        fma_lanes::<FMA>(&mut acc, lanes(x), lanes(y));
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s = madd::<FMA>(*x, *y, s);
    }
    s
}

#[inline(always)]
fn weighted_sum_body<const FMA: bool>(e: &[f32], es: usize, m: usize, rows: &[f32], w: usize, out: &mut [f32]) {
    let mut k0 = 0;
    while k0 < m {
        let g = (m - k0).min(GROUP);
        let o = &mut out[k0 * w..(k0 + g) * w];
        match g {
            4 => wsum_group::<4, FMA>(e, es, k0, rows, w, o),
            3 => wsum_group::<3, FMA>(e, es, k0, rows, w, o),
            2 => wsum_group::<2, FMA>(e, es, k0, rows, w, o),
            _ => wsum_group::<1, FMA>(e, es, k0, rows, w, o),
        }
        k0 += g;
    }
}

/// [`weighted_sum`] for soft tokens `k0..k0 + G`, a tile of [`LANES`] columns at a time: the
/// tile's `G` accumulators stay in registers while the rows stream past.
#[inline(always)]
fn wsum_group<const G: usize, const FMA: bool>(e: &[f32], es: usize, k0: usize, rows: &[f32], w: usize, out: &mut [f32]) {
    let ns = rows.len() / w;
    let full = w / LANES * LANES;
    let eg: [&[f32]; G] = std::array::from_fn(|g| &e[(k0 + g) * es..(k0 + g) * es + ns]);
    for j0 in (0..full).step_by(LANES) {
        let mut acc = [[0.0f32; LANES]; G];
        for (i, row) in rows.chunks_exact(w).enumerate() {
            let x = lanes(&row[j0..]);
            for g in 0..G {
                fma_lanes::<FMA>(&mut acc[g], &[eg[g][i]; LANES], x);
            }
        }
        for g in 0..G {
            out[g * w + j0..g * w + j0 + LANES].copy_from_slice(&acc[g]);
        }
    }
    for j in full..w {
        for g in 0..G {
            let mut s = 0.0f32;
            for (i, row) in rows.chunks_exact(w).enumerate() {
                s = madd::<FMA>(eg[g][i], row[j], s);
            }
            out[g * w + j] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// Asserts every value within the f32 summation bound of its f64 value: a sum of `terms`
    /// f32 products is off by at most about `terms * eps * sum |products|`.
    fn assert_close(what: &str, got: &[f32], want: &[(f64, f64)], terms: usize) {
        for (g, (w, abs)) in got.iter().zip(want) {
            let bound = terms as f64 * f64::from(f32::EPSILON) * abs;
            assert!((f64::from(*g) - w).abs() <= bound, "{what}: {g} vs {w} (bound {bound:e})");
        }
    }

    /// Both kernels against plain f64 loops, on the dispatched path (AVX-512 or AVX2 where the CPU
    /// has it) and on the baseline body, for shapes that exercise every group size (m 1..=9) and
    /// column tails (lengths not multiples of LANES).
    #[test]
    fn kernels_match_f64_loops() {
        let mut rng = Rng::new(11);
        for &(m, n, c) in &[(1, 3, 5), (4, 7, 64), (5, 2, 33), (9, 4, 100), (4, 1, 2048), (3, 65, 31)] {
            let vecs = rng.vec_f32(m * c, 1.0);
            let rows = rng.vec_f32(n * c, 1.0);
            let want: Vec<(f64, f64)> = (0..m * n)
                .map(|ki| {
                    let (k, i) = (ki / n, ki % n);
                    let t = (0..c).map(|j| 0.5 * f64::from(vecs[k * c + j]) * f64::from(rows[i * c + j]));
                    (t.clone().sum(), t.map(f64::abs).sum())
                })
                .collect();
            let mut got = vec![f32::NAN; m * n];
            dot_rows(&vecs, m, &rows, c, 0.5, &mut got);
            assert_close(&format!("dot_rows {m}x{n}x{c}"), &got, &want, c);
            dot_rows_body::<false>(&vecs, m, &rows, c, 0.5, &mut got);
            assert_close(&format!("dot_rows baseline {m}x{n}x{c}"), &got, &want, c);

            // weighted_sum with a weight row stride larger than the slice, as the pooling passes it.
            let es = n + 3;
            let e = rng.vec_f32(m * es, 1.0);
            let want: Vec<(f64, f64)> = (0..m * c)
                .map(|kj| {
                    let (k, j) = (kj / c, kj % c);
                    let t = (0..n).map(|i| f64::from(e[k * es + i]) * f64::from(rows[i * c + j]));
                    (t.clone().sum(), t.map(f64::abs).sum())
                })
                .collect();
            let mut got = vec![f32::NAN; m * c];
            weighted_sum(&e, es, m, &rows, c, &mut got);
            assert_close(&format!("weighted_sum {m}x{n}x{c}"), &got, &want, n);
            weighted_sum_body::<false>(&e, es, m, &rows, c, &mut got);
            assert_close(&format!("weighted_sum baseline {m}x{n}x{c}"), &got, &want, n);
        }
    }
}
