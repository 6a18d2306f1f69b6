//! The spec's test vectors (`spec/vectors`, made by `make_vectors.py`, an independent NumPy
//! float64 implementation): the reference must match to 1e-12 and the f32 path, in both
//! strategies, to the manifest's f32 tolerance and to this crate's 1e-5 max-norm bound, for every
//! vector and both containers.

use std::path::PathBuf;

use iapt_format::Adapter;
use iapt_generator::testing::rel_err;
use iapt_generator::{reference, Generator, Strategy};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../spec/vectors")
}

#[test]
fn every_spec_vector() {
    let dir = vectors_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("spec/vectors exists")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".hidden.npy").map(str::to_owned))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no vectors in {}", dir.display());
    for name in &names {
        let hidden = iapt_npy::read_f32_file(dir.join(format!("{name}.hidden.npy"))).unwrap();
        let expected = iapt_npy::read_f64_file(dir.join(format!("{name}.expected.npy"))).unwrap();
        let (n_layer, n, d) = (hidden.shape[0], hidden.shape[1], hidden.shape[2]);
        let m = expected.shape[1];
        for ext in ["safetensors", "gguf"] {
            let adapter = Adapter::open(dir.join(format!("{name}.{ext}"))).unwrap();
            for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
                let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
                for l in 0..n_layer {
                    let rows = &hidden.data[l * n * d..(l + 1) * n * d];
                    let want = &expected.data[l * m * d..(l + 1) * m * d];
                    let r64: Vec<f64> = rows.iter().map(|&v| f64::from(v)).collect();
                    let refv = reference::generate(&adapter, l, &r64).unwrap();
                    for (g, e) in refv.iter().zip(want) {
                        assert!((g - e).abs() <= 1e-12 * (1.0 + e.abs()), "{name}.{ext} layer {l}: reference {g} vs {e}");
                    }
                    let mut out = vec![0.0f32; m * d];
                    gen.generate(l, rows, &mut out).unwrap();
                    for (g, e) in out.iter().zip(want) {
                        let g = f64::from(*g);
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{name}.{ext} {strategy:?} layer {l}: {g} vs {e}");
                    }
                    let err = rel_err(&out, want);
                    assert!(err <= 1e-5, "{name}.{ext} {strategy:?} layer {l}: rel err {err:e}");
                }
            }
        }
    }
}
