//! The generator's thin products, by hand: every product with m (the soft tokens, 4 in the paper)
//! on one side. Written here rather than through `gemm` because `gemm` packs its operands before
//! multiplying, and for an m-row product the packing costs more than the arithmetic: profiling one
//! prefill at the TinyLlama shape (`examples/prefill_profile.rs`, `perf record`) put 44% of the
//! generator's time in `gemm_common::pack_operands::pack_lhs` and most of the rest in two small
//! microkernels. These loops read each large operand (hidden rows, W_down, W_up) once, in place,
//! and keep the m accumulators in registers.
//!
//! - [`dot_rows`]: `out[k][i] = scale * <vecs[k], rows[i]>` (scores H K, pooled W_down^T, u W_up^T),
//!   with the rows in f32, or in F16 or BF16 as an adapter stores W_down and W_up: each chunk of a
//!   row is widened to f32 in registers (`vcvtph2ps` for F16, a shift for BF16) right before its
//!   multiply-adds, so a matrix is read at its stored size and the products are those of the
//!   widened f32 values (widening is exact);
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

/// Which copy of a body runs: the instructions its row widening may use.
const BASELINE: u8 = 0;
#[cfg(target_arch = "x86_64")]
const AVX2: u8 = 1;
#[cfg(target_arch = "x86_64")]
const AVX512: u8 = 2;

/// An element type a row of [`dot_rows`] may have: f32, or F16/BF16 widened to f32 in registers.
pub(crate) trait RowElem: Copy + Sync {
    /// 16 values widened to f32, exactly, with the instructions copy `ISA` may use.
    fn widen16<const ISA: u8>(s: &[Self; 16]) -> [f32; 16];
    /// One value widened to f32.
    fn widen(self) -> f32;
}

impl RowElem for f32 {
    #[inline(always)]
    fn widen16<const ISA: u8>(s: &[f32; 16]) -> [f32; 16] {
        *s
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl RowElem for half::bf16 {
    #[inline(always)]
    fn widen16<const ISA: u8>(s: &[half::bf16; 16]) -> [f32; 16] {
        // bf16 is the upper half of an f32: a shift, which every copy vectorizes.
        std::array::from_fn(|i| f32::from_bits(u32::from(s[i].to_bits()) << 16))
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl RowElem for half::f16 {
    #[inline(always)]
    fn widen16<const ISA: u8>(s: &[half::f16; 16]) -> [f32; 16] {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if ISA == AVX2 || ISA == AVX512 {
                // SAFETY: copies AVX2 and AVX512 are only compiled into functions with
                // `#[target_feature(enable = "avx2,fma,f16c")]` or `(enable = "avx512f,f16c")`,
                // which `dot_rows` calls after detecting those features, so F16C is there; each
                // load reads 8 of the 16 f16 values (16 bytes, unaligned), each store writes 8 f32
                // into the local 16-value array. (The 512-bit conversion's intrinsic needs a newer
                // Rust than the workspace's 1.85; the two 256-bit ones are the same work.)
                return unsafe {
                    let lo = _mm_loadu_si128(s.as_ptr().cast());
                    let hi = _mm_loadu_si128(s.as_ptr().add(8).cast());
                    let mut out = [0.0f32; 16];
                    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(lo));
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), _mm256_cvtph_ps(hi));
                    out
                };
            }
        }
        std::array::from_fn(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `out[k * n + i] = scale * dot(vecs[k * c..][..c], rows[i * c..][..c])` for `k < m`, `i < n`,
/// where `n = rows.len() / c`, with the rows widened to f32. Panics (an internal bug) if a slice
/// has the wrong length.
pub(crate) fn dot_rows<E: RowElem>(vecs: &[f32], m: usize, rows: &[E], c: usize, scale: f32, out: &mut [f32]) {
    assert!(c > 0 && rows.len() % c == 0, "dot_rows: rows not a multiple of {c}");
    let n = rows.len() / c;
    assert_eq!(vecs.len(), m * c, "dot_rows: vecs");
    assert_eq!(out.len(), m * n, "dot_rows: out");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: `dot_rows_avx512` is `#[target_feature(enable = "avx512f,f16c")]`; calling it
            // is sound exactly when the running CPU supports both, which the runtime check on the
            // line above established. Its body is the same code as the fallback below, with F16C's
            // conversion.
            return unsafe { x86::dot_rows_avx512(vecs, m, rows, c, scale, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above, for `#[target_feature(enable = "avx2,fma,f16c")]`: all three
            // features were detected on the running CPU by the condition of this `if`.
            return unsafe { x86::dot_rows_avx2(vecs, m, rows, c, scale, out) };
        }
    }
    dot_rows_body::<E, false, BASELINE>(vecs, m, rows, c, scale, out);
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
    use super::{RowElem, AVX2, AVX512};

    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn dot_rows_avx512<E: RowElem>(vecs: &[f32], m: usize, rows: &[E], c: usize, scale: f32, out: &mut [f32]) {
        super::dot_rows_body::<E, true, AVX512>(vecs, m, rows, c, scale, out);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_rows_avx2<E: RowElem>(vecs: &[f32], m: usize, rows: &[E], c: usize, scale: f32, out: &mut [f32]) {
        super::dot_rows_body::<E, true, AVX2>(vecs, m, rows, c, scale, out);
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
fn dot_rows_body<E: RowElem, const FMA: bool, const ISA: u8>(vecs: &[f32], m: usize, rows: &[E], c: usize, scale: f32, out: &mut [f32]) {
    let n = rows.len() / c;
    let mut k0 = 0;
    while k0 < m {
        let g = (m - k0).min(GROUP);
        let v = &vecs[k0 * c..(k0 + g) * c];
        let o = &mut out[k0 * n..(k0 + g) * n];
        match g {
            4 => dot_group::<E, 4, FMA, ISA>(v, rows, c, scale, o),
            3 => dot_group::<E, 3, FMA, ISA>(v, rows, c, scale, o),
            2 => dot_group::<E, 2, FMA, ISA>(v, rows, c, scale, o),
            _ => dot_group::<E, 1, FMA, ISA>(v, rows, c, scale, o),
        }
        k0 += g;
    }
}

/// [`dot_rows`] for `G` vectors: each row is read from memory once and dotted with all `G`; for
/// four vectors, in one pass that loads each chunk of the row once for the four products.
#[inline(always)]
fn dot_group<E: RowElem, const G: usize, const FMA: bool, const ISA: u8>(vecs: &[f32], rows: &[E], c: usize, scale: f32, out: &mut [f32]) {
    let n = rows.len() / c;
    for (i, row) in rows.chunks_exact(c).enumerate() {
        if G == 4 {
            let v: [&[f32]; 4] = std::array::from_fn(|g| &vecs[g * c..(g + 1) * c]);
            let d = dot4::<E, FMA, ISA>(v, row);
            for g in 0..4 {
                out[g * n + i] = scale * d[g];
            }
        } else {
            for (g, v) in vecs.chunks_exact(c).enumerate() {
                out[g * n + i] = scale * dot::<E, FMA, ISA>(v, row);
            }
        }
    }
}

/// Four dot products with one row, [`LANES`] / 2 partial sums each (four accumulators of one
/// AVX-512 register: the row chunk is loaded and widened once for four multiply-adds).
#[inline(always)]
fn dot4<'a, E: RowElem, const FMA: bool, const ISA: u8>(v: [&'a [f32]; 4], row: &'a [E]) -> [f32; 4] {
    const H: usize = LANES / 2;
    let c = row.len();
    let full = c / H * H;
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; H], [0.0f32; H], [0.0f32; H], [0.0f32; H]);
    let chunks = |s: &'a [f32]| s[..full].chunks_exact(H).map(|c| -> &'a [f32; H] { c.try_into().expect("H values") });
    let vs = chunks(v[0]).zip(chunks(v[1])).zip(chunks(v[2])).zip(chunks(v[3]));
    let xs = row[..full].chunks_exact(H).map(|c| -> &'a [E; H] { c.try_into().expect("H values") });
    for (x, (((v0, v1), v2), v3)) in xs.zip(vs) {
        let x = E::widen16::<ISA>(x);
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
            *sg = madd::<FMA>(v[g][j], row[j].widen(), *sg);
        }
    }
    s
}

/// `<a, b>` for slices of equal length, in [`LANES`] independent partial sums, `b` widened to f32.
#[inline(always)]
fn dot<E: RowElem, const FMA: bool, const ISA: u8>(a: &[f32], b: &[E]) -> f32 {
    const H: usize = LANES / 2;
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let (y0, y1): (&[E; H], &[E; H]) = (y[..H].try_into().expect("H values"), y[H..].try_into().expect("H values"));
        let (w0, w1) = (E::widen16::<ISA>(y0), E::widen16::<ISA>(y1));
        let mut wide = [0.0f32; LANES];
        wide[..H].copy_from_slice(&w0);
        wide[H..].copy_from_slice(&w1);
        fma_lanes::<FMA>(&mut acc, lanes(x), &wide);
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s = madd::<FMA>(*x, y.widen(), s);
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
    use half::{bf16, f16};

    /// F16 and BF16 rows give the bits of their exact f32 widening in every copy of the body this
    /// CPU can run (baseline, AVX2 + F16C, AVX-512), for every group size and row tails.
    #[test]
    fn half_rows_give_the_bits_of_their_f32_widening() {
        let mut rng = Rng::new(2029);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for &(m, n, c) in &[(4, 5, 64), (1, 3, 37), (3, 4, 100), (4, 2, 2048), (5, 3, 17), (2, 2, 15)] {
            let vecs = rng.vec_f32(m * c, 1.0);
            let raw = rng.vec_f32(n * c, 2.0);
            let h: Vec<f16> = raw.iter().map(|&v| f16::from_f32(v)).collect();
            let b: Vec<bf16> = raw.iter().map(|&v| bf16::from_f32(v)).collect();
            for (name, wide) in
                [("f16", h.iter().map(|v| v.to_f32()).collect::<Vec<_>>()), ("bf16", b.iter().map(|v| v.to_f32()).collect())]
            {
                let run = |copy: u8, rows_f32: bool| -> Vec<f32> {
                    let mut out = vec![f32::NAN; m * n];
                    macro_rules! body {
                        ($e:expr) => {
                            match copy {
                                0 => dot_rows_body::<_, false, BASELINE>(&vecs, m, $e, c, 0.5, &mut out),
                                #[cfg(target_arch = "x86_64")]
                                // SAFETY: copies 1 and 2 are only run below after their features
                                // were detected on this CPU.
                                1 => unsafe { x86::dot_rows_avx2(&vecs, m, $e, c, 0.5, &mut out) },
                                #[cfg(target_arch = "x86_64")]
                                // SAFETY: as above.
                                _ => unsafe { x86::dot_rows_avx512(&vecs, m, $e, c, 0.5, &mut out) },
                                #[cfg(not(target_arch = "x86_64"))]
                                _ => unreachable!(),
                            }
                        };
                    }
                    match (rows_f32, name) {
                        (true, _) => body!(&wide[..]),
                        (false, "f16") => body!(&h[..]),
                        (false, _) => body!(&b[..]),
                    }
                    out
                };
                let mut copies = vec![0u8];
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    if has!("avx2") && has!("fma") && has!("f16c") {
                        copies.push(1);
                    }
                    if has!("avx512f") && has!("f16c") {
                        copies.push(2);
                    }
                }
                for copy in copies {
                    assert_eq!(bits(&run(copy, false)), bits(&run(copy, true)), "{name} copy {copy} {m}x{n}x{c}");
                }
                let mut got = vec![f32::NAN; m * n];
                let mut want = vec![f32::NAN; m * n];
                dot_rows(&vecs, m, &wide, c, 0.5, &mut want);
                match name {
                    "f16" => dot_rows(&vecs, m, &h, c, 0.5, &mut got),
                    _ => dot_rows(&vecs, m, &b, c, 0.5, &mut got),
                }
                assert_eq!(bits(&got), bits(&want), "{name} dispatched {m}x{n}x{c}");
            }
        }
    }

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
            dot_rows_body::<f32, false, BASELINE>(&vecs, m, &rows, c, 0.5, &mut got);
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
