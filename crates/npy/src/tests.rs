//! Unit tests: one hand-made byte string per error variant, and a round-trip property.

use proptest::prelude::*;

use super::*;

fn file(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const D23: &str = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n";

fn err(bytes: &[u8]) -> NpyError {
    read_f32(&mut &bytes[..]).expect_err("must fail")
}

#[test]
fn reads_a_hand_made_file() {
    let bytes = file(1, D23, &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    let a = read_f32(&mut bytes.as_slice()).unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // Double quotes, no trailing comma, no newline, other key order: still the same dict.
    let d = "{\"shape\": (2, 3), \"fortran_order\": False, \"descr\": \"<f4\"}";
    assert_eq!(read_f32(&mut file(2, d, &f32s(&[0.0; 6])).as_slice()).unwrap().shape, vec![2, 3]);
}

#[test]
fn every_error_variant() {
    let six = f32s(&[0.0; 6]);
    assert!(matches!(err(b"\x93NUMPZ\x01\x00"), NpyError::BadMagic));
    assert!(matches!(err(b"\x93NUM"), NpyError::TruncatedHeader));
    assert!(matches!(err(b"\x93NUMPY\x04\x00\x00\x00"), NpyError::UnsupportedVersion { major: 4, minor: 0 }));
    assert!(matches!(err(b"\x93NUMPY\x01\x01\x00\x00"), NpyError::UnsupportedVersion { .. }));
    assert!(matches!(err(b"\x93NUMPY\x02\x00\xff\xff\xff\xff"), NpyError::HeaderTooLong { .. }));
    assert!(matches!(err(&file(1, D23, &[])[..20]), NpyError::TruncatedHeader));
    for d in [
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (6)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-6,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)",
        "{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
        "",
    ] {
        assert!(matches!(err(&file(1, d, &six)), NpyError::BadHeader { .. }), "{d}");
    }
    let non_ascii = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\u{e9}";
    assert!(matches!(err(&file(1, non_ascii, &six)), NpyError::BadHeader { .. }));
    assert!(read_f32(&mut file(3, D23, &six).as_slice()).is_ok(), "version 3.0");
    assert!(matches!(
        err(&file(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } \u{e9}", &six)),
        NpyError::BadHeader { .. }
    ));
    let d = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }";
    assert!(matches!(err(&file(1, d, &six)), NpyError::UnsupportedDtype { .. }));
    let d = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }";
    assert!(matches!(err(&file(1, d, &[0u8; 24])), NpyError::UnsupportedDtype { .. }));
    let d = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
    assert!(matches!(err(&file(1, d, &six)), NpyError::FortranOrder));
    let d = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }";
    assert!(matches!(err(&file(1, d, &six)), NpyError::ShapeOverflow { .. }));
    assert!(matches!(err(&file(1, D23, &six[..20])), NpyError::TruncatedData { expected: 24, got: 20 }));
    let mut long = six.clone();
    long.push(0);
    assert!(matches!(err(&file(1, D23, &long)), NpyError::TrailingBytes { extra: 1 }));
    // A huge claimed shape with no data fails on the data, without a huge allocation.
    let d = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }";
    assert!(matches!(err(&file(1, d, &six)), NpyError::TruncatedData { .. }));
    assert!(matches!(write_f32(&mut Vec::new(), &[2, 2], &[0.0; 3]), Err(NpyError::LengthMismatch { .. })));
}

#[test]
fn written_header_is_aligned_and_parses() {
    for shape in [vec![], vec![7], vec![2, 3], vec![32, 2048, 4096]] {
        let h = header_bytes(Dtype::F32, &shape);
        assert_eq!(h.len() % 64, 0, "{shape:?}");
        assert_eq!(*h.last().unwrap(), b'\n');
        let parsed = read_header(&mut h.as_slice()).unwrap();
        assert_eq!(parsed, Header { version: (1, 0), dtype: Dtype::F32, shape });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(shape in proptest::collection::vec(0usize..5, 0..4), seed in any::<u32>()) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (i as f32 + seed as f32).sin() * 1e3).collect();
        let mut buf = Vec::new();
        write_f32(&mut buf, &shape, &data).unwrap();
        let a = read_f32(&mut buf.as_slice()).unwrap();
        prop_assert_eq!(a.shape, shape);
        prop_assert_eq!(a.data, data);
    }

    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), cut in 0usize..200) {
        let _ = read_f32(&mut bytes.as_slice());
        let mut good = file(1, D23, &f32s(&[1.0; 6]));
        let at = cut.min(good.len() - 1);
        good[at] ^= bytes.first().copied().unwrap_or(1) | 1;
        let _ = read_f32(&mut good.as_slice());
        let _ = read_f64(&mut good.as_slice());
    }
}
