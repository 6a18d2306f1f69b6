//! Files that declare many tensors (issue 17, class 3): every reader is linear in the tensor
//! count, a file over `MAX_TENSORS` is refused with E004 before any per-tensor work, and the cap
//! admits every valid adapter. Base models (issue 17, class 6): a truncated one is unreadable.

use std::time::{Duration, Instant};

use iapt_format::raw::{write_gguf, write_safetensors, RawTensorOut};
use iapt_format::{validate_bytes, BaseModelError, BaseModelInfo, Code, MetaValue, Role, MAX_N_LAYER, MAX_TENSORS};

/// Far above the time linear parsing takes even in a debug build on a busy machine, far below what
/// the quadratic readers took (over a minute for 200k tensors in a release build).
const GENEROUS: Duration = Duration::from_secs(20);

fn zero_size_tensors(n: usize) -> Vec<RawTensorOut> {
    (0..n)
        .map(|i| RawTensorOut { name: format!("t.{i}"), shape: vec![0], ggml_type: 0, st_dtype: "F32".into(), data: Vec::new() })
        .collect()
}

#[test]
fn the_tensor_cap_admits_every_valid_adapter() {
    let most = Role::ALL.len() as u64 * (u64::from(MAX_N_LAYER) + 1);
    assert!(most <= MAX_TENSORS, "a valid adapter can hold {most} tensors, over MAX_TENSORS = {MAX_TENSORS}");
}

#[test]
fn two_hundred_thousand_tensors_are_refused_quickly_in_both_containers() {
    let tensors = zero_size_tensors(200_000);
    for (label, bytes) in [("safetensors", write_safetensors(&[], &tensors)), ("gguf", write_gguf(&[], &tensors))] {
        let t0 = Instant::now();
        let v = validate_bytes(&bytes);
        let took = t0.elapsed();
        assert!(v.report.has(Code::MalformedHeader), "{label}: {}", v.report);
        assert!(v.report.to_string().contains(&MAX_TENSORS.to_string()), "{label}: the limit is named: {}", v.report);
        assert!(took < GENEROUS, "{label}: {took:?}");
    }
}

/// The fastest of three runs of `f` (load spikes on a shared machine only ever slow a run down).
fn fastest<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = None;
    let mut out = None;
    for _ in 0..3 {
        let t0 = Instant::now();
        let v = f();
        let took = t0.elapsed();
        best = Some(best.map_or(took, |b: Duration| b.min(took)));
        out = Some(v);
    }
    (best.expect("three runs"), out.expect("three runs"))
}

#[test]
fn a_file_at_the_cap_is_read_in_linear_time() {
    // Every name distinct and invalid: the worst case for a duplicate scan, one finding per tensor.
    // The yardstick is linear work on the same tensors in the same process: making both files.
    // Measured in a debug build: reading takes 0.2x-0.6x of it; the quadratic duplicate scans of
    // issue 17 took 16x-20x. A bound of 5x leaves a wide margin on both sides, under any load.
    let n = MAX_TENSORS as usize;
    let (make, (st, gg)) = fastest(|| {
        let tensors = zero_size_tensors(n);
        (write_safetensors(&[], &tensors), write_gguf(&[], &tensors))
    });
    for (label, bytes) in [("safetensors", st), ("gguf", gg)] {
        let (read, v) = fastest(|| validate_bytes(&bytes));
        assert!(!v.report.has(Code::MalformedHeader), "{label}: {}", v.report.findings[0]);
        assert_eq!(v.report.findings.iter().filter(|f| f.code == Code::UnexpectedTensor).count(), n, "{label}");
        let ratio = read.as_secs_f64() / make.as_secs_f64();
        assert!(ratio < 5.0, "{label}: reading {n} tensors took {read:?}, {ratio:.1}x the {make:?} of making the files");
    }
}

fn base_gguf(tensor_bytes: usize) -> Vec<u8> {
    let meta = vec![
        ("general.architecture".to_owned(), MetaValue::Str("llama".into())),
        ("llama.block_count".to_owned(), MetaValue::U32(2)),
        ("llama.embedding_length".to_owned(), MetaValue::U32(8)),
    ];
    let t = RawTensorOut {
        name: "token_embd.weight".into(),
        shape: vec![(tensor_bytes / 4) as u64],
        ggml_type: 0,
        st_dtype: "F32".into(),
        data: vec![0; tensor_bytes],
    };
    write_gguf(&meta, &[t])
}

#[test]
fn a_truncated_base_model_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    let whole = base_gguf(4096);
    std::fs::write(&path, &whole).unwrap();
    let info = BaseModelInfo::read(&path).unwrap();
    assert_eq!((info.arch.as_str(), info.n_layer, info.n_embd), ("llama", 2, 8));
    for cut in [whole.len() - 1, whole.len() - 4000, 200, 20] {
        std::fs::write(&path, &whole[..cut]).unwrap();
        let err = BaseModelInfo::read(&path).unwrap_err();
        assert!(err.is_unreadable(), "cut at {cut}: {err}");
        assert!(err.to_string().contains("truncated"), "cut at {cut}: {err}");
    }
    // Readable content that is not a base model is not "unreadable".
    std::fs::write(&path, b"not a gguf").unwrap();
    let err = BaseModelInfo::read(&path).unwrap_err();
    assert!(matches!(err, BaseModelError::NotGguf { .. }) && !err.is_unreadable(), "{err}");
    let err = BaseModelInfo::read(dir.path()).unwrap_err();
    assert!(err.is_unreadable() && err.to_string().contains("directory"), "{err}");
}
