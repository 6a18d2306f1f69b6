//! The one place this crate calls the `gemm` crate's `unsafe fn gemm`: strided matrix views whose
//! bounds are checked when they are built, and a safe [`matmul`] that checks the shapes and makes
//! the single unsafe call.
#![allow(unsafe_code)]

/// Element types `gemm` supports and this crate uses (sealed: `gemm::gemm` panics for other types).
pub(crate) trait Scalar: Copy + 'static + sealed::Sealed {
    /// Zero.
    const ZERO: Self;
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The smallest slice length that holds every element of a `rows x cols` view with these strides,
/// or `None` on overflow (or when an index would not fit `isize`).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    let last = (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)?;
    isize::try_from(rs).ok()?;
    isize::try_from(cs).ok()?;
    isize::try_from(last).ok()?;
    last.checked_add(1)
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Scalar> MatRef<'a, T> {
    /// A view with explicit strides. Panics (an internal bug, not a user error) if `data` is too
    /// short for the view.
    pub(crate) fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let need = span(rows, cols, rs, cs).expect("matrix view size overflows");
        assert!(data.len() >= need, "matrix view {rows}x{cols} (strides {rs}, {cs}) needs {need} elements, slice has {}", data.len());
        MatRef { data, rows, cols, rs, cs }
    }

    /// A row-major `rows x cols` view of `data[..rows * cols]`.
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// A mutable strided matrix view whose elements do not overlap: either row-major-like
/// (`cs == 1`, `rs >= cols`) or column-major-like (`rs == 1`, `cs >= rows`).
pub(crate) struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Scalar> MatMut<'a, T> {
    /// A row-major `rows x cols` view of `data[..rows * cols]`. Panics if `data` is too short.
    pub(crate) fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        let need = span(rows, cols, cols, 1).expect("matrix view size overflows");
        assert!(data.len() >= need, "matrix view {rows}x{cols} needs {need} elements, slice has {}", data.len());
        MatMut { data, rows, cols, rs: cols, cs: 1 }
    }
}

/// `dst := keep * dst + scale * lhs * rhs` when `keep` is `Some`, else `dst := scale * lhs * rhs`
/// (the old contents of `dst` are then never read, so they may be anything). Single-threaded.
///
/// Panics if the shapes do not agree (an internal bug).
pub(crate) fn matmul<T: Scalar>(dst: MatMut<'_, T>, keep: Option<T>, lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, scale: T) {
    assert_eq!(dst.rows, lhs.rows, "matmul: dst rows != lhs rows");
    assert_eq!(dst.cols, rhs.cols, "matmul: dst cols != rhs cols");
    assert_eq!(lhs.cols, rhs.rows, "matmul: lhs cols != rhs rows");
    // The views' constructors checked that every index is inside its slice; check dst's
    // non-overlap rule again here, next to the call that relies on it.
    assert!(dst.cs == 1 && dst.rs >= dst.cols || dst.rs == 1 && dst.cs >= dst.rows);
    let spans = [
        (span(dst.rows, dst.cols, dst.rs, dst.cs), dst.data.len()),
        (span(lhs.rows, lhs.cols, lhs.rs, lhs.cs), lhs.data.len()),
        (span(rhs.rows, rhs.cols, rhs.rs, rhs.cs), rhs.data.len()),
    ];
    assert!(spans.iter().all(|&(need, len)| need.is_some_and(|n| n <= len)), "matmul: a view exceeds its slice");
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    let (read_dst, alpha) = match keep {
        Some(k) => (true, k),
        None => (false, T::ZERO),
    };
    // `span` proved every stride fits isize.
    let s = |x: usize| x as isize;
    // SAFETY: `gemm::gemm` reads `lhs` (m x k) and `rhs` (k x n) and writes `dst` (m x n) through
    // raw pointers and strides, and requires every addressed element to be in bounds, `dst` not to
    // alias `lhs`/`rhs`, and distinct `dst` indices to address distinct elements. In bounds: the
    // `spans` assertion just above shows that the largest index of each view, (rows-1)*rs +
    // (cols-1)*cs, is below its slice's length (all strides are non-negative). No aliasing: `dst`
    // comes from a `&mut [T]` while `lhs` and `rhs` come from `&[T]`, which the borrow checker
    // keeps disjoint for the duration of this call. Distinct elements: the non-overlap assertion
    // (unit column stride and row stride >= cols, or the transpose). The shapes m, n, k agree by
    // the three `assert_eq!`s; `T` is f32 or f64 (the sealed `Scalar` trait), which gemm supports;
    // the conj flags are ignored for real types; `Parallelism::None` runs on this thread only.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            s(dst.cs),
            s(dst.rs),
            read_dst,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            alpha,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.71).cos()).collect(); // stored n x k, used transposed
        let mut c = vec![1.0f64; m * n];
        matmul(MatMut::row_major(&mut c, m, n), Some(2.0), MatRef::row_major(&a, m, k), MatRef::row_major(&b, n, k).t(), 0.5);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
                assert!((c[i * n + j] - (2.0 + 0.5 * dot)).abs() < 1e-12);
            }
        }
        let mut c32 = vec![f32::NAN; m * n];
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
        matmul(MatMut::row_major(&mut c32, m, n), None, MatRef::row_major(&a32, m, k), MatRef::row_major(&b32, n, k).t(), 1.0);
        assert!(c32.iter().all(|v| v.is_finite()), "overwrite mode must not read dst");
    }

    #[test]
    #[should_panic(expected = "needs")]
    fn short_slice_is_refused() {
        let a = [0.0f32; 5];
        let _ = MatRef::row_major(&a, 2, 3);
    }
}
