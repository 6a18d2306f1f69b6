//! Reads the `.npy` files NumPy wrote (`tests/data/make_fixtures.py`) and checks values, shapes and
//! the refusal of what this crate does not support.

use std::path::PathBuf;

use iapt_npy::{read_f32_file, read_f64_file, Dtype, NpyError};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn expected() -> Vec<f32> {
    (0..6).map(|i| (i as f32 - 2.5) / 4.0).collect()
}

#[test]
fn float32_in_every_version() {
    for name in ["f32_2x3_v1.npy", "f32_2x3_v2.npy", "f32_2x3_v3.npy"] {
        let a = read_f32_file(data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.shape, vec![2, 3], "{name}");
        assert_eq!(a.stored, Dtype::F32);
        assert_eq!(a.data, expected(), "{name}");
    }
}

#[test]
fn float16_converts_exactly() {
    let a = read_f32_file(data("f16_2x3.npy")).unwrap();
    assert_eq!(a.stored, Dtype::F16);
    assert_eq!(a.data, expected());
}

#[test]
fn float64_is_read_by_read_f64_and_refused_by_read_f32() {
    let a = read_f64_file(data("f64_2x3.npy")).unwrap();
    assert_eq!(a.data, expected().iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
    let e = read_f32_file(data("f64_2x3.npy")).unwrap_err();
    assert!(matches!(e, NpyError::UnsupportedDtype { .. }), "{e}");
    assert!(e.to_string().contains("astype(numpy.float32)"), "{e}");
}

#[test]
fn scalar_and_empty() {
    let s = read_f32_file(data("f32_scalar.npy")).unwrap();
    assert_eq!((s.shape.len(), s.data.as_slice()), (0, &[1.5f32][..]));
    let e = read_f32_file(data("f32_empty_0x4.npy")).unwrap();
    assert_eq!(e.shape, vec![0, 4]);
    assert!(e.data.is_empty());
}

#[test]
fn refusals() {
    assert!(matches!(read_f32_file(data("f32_fortran.npy")), Err(NpyError::FortranOrder)));
    assert!(matches!(read_f32_file(data("f32_bigendian.npy")), Err(NpyError::UnsupportedDtype { .. })));
    assert!(matches!(read_f32_file(data("i32_2x3.npy")), Err(NpyError::UnsupportedDtype { .. })));
}
