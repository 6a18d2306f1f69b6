//! The GPU generator against the f64 reference. Every test body runs twice: on the CPU emulator of
//! the kernels (always; `emulation` is on for this crate's tests) and on CUDA device 0, which
//! prints `skipped: <reason>` to stderr and returns when no CUDA device is usable, or fails when
//! `IAPT_REQUIRE_CUDA=1` (the GPU machine's scripts set it). A CUDA-only stress test covers what the
//! emulator cannot see: many blocks racing on the pooling's atomics. Inputs are random with a fresh
//! seed per run, printed on failure; replay with `IAPT_TEST_SEED=<seed>`.

use std::sync::{Arc, OnceLock};

use iapt_format::{Activation, Adapter, DType, RationalConfig, RationalVariant, Role};
use iapt_generator::reference;
use iapt_generator::testing::{all_activations, fresh_seed, random_adapter, rel_err, AdapterSpec, Rng};
use iapt_generator_cuda::testing::{cuda_for_test, cuda_required};
use iapt_generator_cuda::{compile_kernels_ptx, gpu_generator_bench, nvrtc_unavailable_reason, GpuBenchConfig, GpuError, GpuRuntime};

/// The tolerance of the brief: 1e-5 for F32 weights, 1e-3 for F16/BF16 (converted exactly, so the
/// errors are in fact as small as for F32).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-3,
    }
}

fn rational_b() -> Activation {
    Activation::Rational(RationalConfig { variant: RationalVariant::B, numerator_degree: 6, denominator_degree: 5, groups: 1 })
}

fn adapter(spec: &AdapterSpec, rng: &mut Rng) -> Adapter {
    random_adapter(spec, rng).expect("random adapter")
}

fn reference_out(a: &Adapter, layer: usize, rows: &[f32]) -> Vec<f64> {
    let rows: Vec<f64> = rows.iter().map(|&v| f64::from(v)).collect();
    reference::generate(a, layer, &rows).expect("reference")
}

/// Feeds `rows` to `layer` in the given chunk sizes (host path) and returns the soft tokens.
fn run_chunks(rt: &GpuRuntime, a: &Adapter, layer: usize, rows: &[f32], chunks: &[usize]) -> Result<Vec<f32>, GpuError> {
    let ga = rt.upload(a)?;
    let mut st = rt.new_state(&ga)?;
    let d = ga.n_embd();
    let mut at = 0;
    for &c in chunks {
        rt.feed_host(&ga, &mut st, layer, &rows[at * d..(at + c) * d])?;
        at += c;
    }
    assert_eq!(at * d, rows.len(), "chunks must cover the rows");
    let mut out = vec![0.0f32; ga.n_soft_tokens() * d];
    rt.finish_host(&ga, &mut st, layer, &mut out)?;
    Ok(out)
}

/// Random chunk sizes summing to n.
fn random_chunks(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let c = 1 + rng.below(left.min(9));
        out.push(c);
        left -= c;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Test bodies (one runtime each)
// ---------------------------------------------------------------------------------------------

/// Every activation, each dtype in turn, biases on and off, every layer: equals the reference.
fn all_activations_match_reference(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for (i, act) in all_activations(16).into_iter().enumerate() {
        let dtype = DType::FLOATS[i % 3];
        let mut spec = AdapterSpec::small(2, 64, 4, 16, act);
        spec.dtype = dtype;
        spec.biases = i % 2 == 0;
        spec.pool_scale = 0.5 + rng.unit() as f32;
        let a = adapter(&spec, &mut rng);
        let n = 1 + rng.below(12);
        let rows = rng.vec_f32(n * 64, 1.0);
        for layer in 0..2 {
            let got = run_chunks(rt, &a, layer, &rows, &[n]).unwrap_or_else(|e| panic!("seed {seed}, {act:?}: {e}"));
            let err = rel_err(&got, &reference_out(&a, layer, &rows));
            assert!(err <= tol(dtype), "seed {seed}: {act:?} {dtype:?} biases {} layer {layer}: rel err {err:e}", spec.biases);
        }
    }
}

/// Shared tensors (stored once for all layers), no biases, m = 1 and m = 8 (the kernels' limit).
fn shared_tensors_and_soft_token_counts(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for (m, shared) in
        [(1u32, vec![Role::DownWeight, Role::PoolQuery]), (8, vec![Role::UpWeight, Role::ActNum, Role::ActDen]), (3, Vec::new())]
    {
        let mut spec = AdapterSpec::small(3, 48, m, 20, rational_b());
        spec.shared = shared.clone();
        spec.biases = shared.is_empty();
        let a = adapter(&spec, &mut rng);
        let ga = rt.upload(&a).unwrap();
        let mut unshared_spec = spec.clone();
        unshared_spec.shared.clear();
        let unshared = rt.upload(&adapter(&unshared_spec, &mut rng)).unwrap();
        if !shared.is_empty() {
            assert!(ga.device_bytes() < unshared.device_bytes(), "shared tensors must be uploaded once");
        }
        let rows = rng.vec_f32(7 * 48, 1.0);
        for layer in 0..3 {
            let got = run_chunks(rt, &a, layer, &rows, &[3, 4]).unwrap();
            let err = rel_err(&got, &reference_out(&a, layer, &rows));
            assert!(err <= 1e-5, "seed {seed}: m {m} shared {shared:?} layer {layer}: rel err {err:e}");
        }
    }
}

/// One instruction row.
fn single_row(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let a = adapter(&AdapterSpec::small(1, 80, 4, 24, Activation::Gelu), &mut rng);
    let rows = rng.vec_f32(80, 1.0);
    let got = run_chunks(rt, &a, 0, &rows, &[1]).unwrap();
    let err = rel_err(&got, &reference_out(&a, 0, &rows));
    assert!(err <= 1e-5, "seed {seed}: rel err {err:e}");
}

/// Any chunking gives the one-shot result (and the reference).
fn chunkings_equal_one_shot(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let a = adapter(&AdapterSpec::small(2, 96, 4, 32, rational_b()), &mut rng);
    let n = 20 + rng.below(30);
    let rows = rng.vec_f32(n * 96, 1.5);
    let one = run_chunks(rt, &a, 1, &rows, &[n]).unwrap();
    let want = reference_out(&a, 1, &rows);
    assert!(rel_err(&one, &want) <= 1e-5, "seed {seed}: one shot vs reference");
    let one64: Vec<f64> = one.iter().map(|&v| f64::from(v)).collect();
    for _ in 0..4 {
        let chunks = random_chunks(n, &mut rng);
        let got = run_chunks(rt, &a, 1, &rows, &chunks).unwrap();
        let err = rel_err(&got, &one64);
        assert!(err <= 1e-6, "seed {seed}: chunks {chunks:?} vs one shot: rel err {err:e}");
    }
    let ones = vec![1; n];
    assert!(rel_err(&run_chunks(rt, &a, 1, &rows, &ones).unwrap(), &want) <= 1e-5, "seed {seed}: row by row");
}

/// A state saved to the host after some rows and loaded into a new state goes on exactly like the
/// original (the prefix cache's GPU snapshots); a copy loads only into a state of its own adapter.
fn saved_state_goes_on_like_the_original(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let a = adapter(&AdapterSpec::small(2, 96, 4, 32, rational_b()), &mut rng);
    let (n, k) = (30 + rng.below(20), 1 + rng.below(25));
    let rows = rng.vec_f32(n * 96, 1.5);
    let ga = rt.upload(&a).unwrap();
    let mut st = rt.new_state(&ga).unwrap();
    rt.feed_host(&ga, &mut st, 1, &rows[..k * 96]).unwrap();
    let copy = rt.save_state(&st).unwrap();
    assert_eq!((copy.rows_seen(1), copy.rows_seen(0), copy.adapter_id()), (k, 0, ga.id()));
    drop(st);
    let mut loaded = rt.load_state(&ga, &copy).unwrap();
    assert_eq!(loaded.rows_seen(1), k);
    rt.feed_host(&ga, &mut loaded, 1, &rows[k * 96..]).unwrap();
    let mut out = vec![0.0f32; ga.n_soft_tokens() * 96];
    rt.finish_host(&ga, &mut loaded, 1, &mut out).unwrap();
    let want = run_chunks(rt, &a, 1, &rows, &[k, n - k]).unwrap();
    assert_eq!(out, want, "seed {seed}: saved after {k} of {n} rows, loaded, fed the rest");
    let other = rt.upload(&a).unwrap();
    assert!(matches!(rt.load_state(&other, &copy), Err(GpuError::ForeignState)), "another upload's copy");
}

/// Scores in the hundreds (exp would overflow without the running max), rising between chunks
/// so that the rescaling path runs. The bound is looser: the f32 K^T's rounding (relative 6e-8)
/// times |score| ~ 300 perturbs the softmax weights by ~2e-5 in any f32 implementation.
fn large_scores_are_stable(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut spec = AdapterSpec::small(1, 64, 4, 16, Activation::Silu);
    spec.pool_scale = 40.0;
    let a = adapter(&spec, &mut rng);
    let mut rows = rng.vec_f32(24 * 64, 1.0);
    // The second half 3x larger: its scores exceed the first chunk's max.
    rows[12 * 64..].iter_mut().for_each(|v| *v *= 3.0);
    let want = reference_out(&a, 0, &rows);
    for chunks in [vec![24], vec![12, 12], vec![5, 7, 1, 11]] {
        let got = run_chunks(rt, &a, 0, &rows, &chunks).unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "seed {seed}: non-finite output");
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "seed {seed}: chunks {chunks:?}: rel err {err:e}");
    }
}

/// A NaN or infinite row is reported with its index, nothing is written, and reset recovers.
fn non_finite_rows_are_errors(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let a = adapter(&AdapterSpec::small(2, 32, 2, 8, Activation::Tanh), &mut rng);
    let ga = rt.upload(&a).unwrap();
    let mut st = rt.new_state(&ga).unwrap();
    let mut rows = rng.vec_f32(10 * 32, 1.0);
    for (bad_row, bad) in [(7usize, f32::NAN), (2, f32::INFINITY)] {
        rt.reset(&mut st).unwrap();
        let mut r = rows.clone();
        r[bad_row * 32 + 5] = bad;
        rt.feed_host(&ga, &mut st, 1, &r[..4 * 32]).unwrap();
        rt.feed_host(&ga, &mut st, 1, &r[4 * 32..]).unwrap();
        let mut dst = rt.alloc_rows(2, 32).unwrap();
        rt.write_rows(&mut dst, 0, &[7.5; 64]).unwrap();
        match rt.finish_device(&ga, &mut st, 1, dst.rows_mut(0, 2).unwrap()) {
            Err(GpuError::NonFiniteInput { layer: 1, row }) => assert_eq!(row, bad_row, "seed {seed}"),
            other => panic!("seed {seed}: expected NonFiniteInput, got {other:?}"),
        }
        let mut back = vec![0.0f32; 64];
        rt.read_rows(&dst, 0, &mut back).unwrap();
        assert!(back.iter().all(|&v| v == 7.5), "seed {seed}: a failed finish wrote the destination");
        let mut out = vec![0.0f32; 64];
        assert!(matches!(rt.finish_host(&ga, &mut st, 1, &mut out), Err(GpuError::NonFiniteInput { .. })));
    }
    // After a reset the same state works again.
    rt.reset(&mut st).unwrap();
    rows.truncate(6 * 32);
    rt.feed_host(&ga, &mut st, 1, &rows).unwrap();
    let mut out = vec![0.0f32; 64];
    rt.finish_host(&ga, &mut st, 1, &mut out).unwrap();
    assert!(rel_err(&out, &reference_out(&a, 1, &rows)) <= 1e-5, "seed {seed}: after reset");
}

/// Device rows in and out: feed_device equals feed_host, and finish_device writes exactly the m
/// target rows (the poisoned rows around them stay as they were).
fn device_rows_in_and_out(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (d, m) = (72usize, 4usize);
    let a = adapter(&AdapterSpec::small(2, d as u32, m as u32, 12, Activation::Relu), &mut rng);
    let ga = rt.upload(&a).unwrap();
    let n = 9;
    let rows = rng.vec_f32(n * d, 1.0);
    let mut dev = rt.alloc_rows(n + 3, d).unwrap();
    rt.write_rows(&mut dev, 3, &rows).unwrap();
    let mut st = rt.new_state(&ga).unwrap();
    rt.feed_device(&ga, &mut st, 0, dev.rows(3, 4).unwrap()).unwrap();
    rt.feed_device(&ga, &mut st, 0, dev.rows(7, 5).unwrap()).unwrap();
    rt.feed_device(&ga, &mut st, 0, dev.rows(0, 0).unwrap()).unwrap();
    assert_eq!(st.rows_seen(0), n);
    let mut host = vec![0.0f32; m * d];
    rt.finish_host(&ga, &mut st, 0, &mut host).unwrap();
    assert!(rel_err(&host, &reference_out(&a, 0, &rows)) <= 1e-5, "seed {seed}: feed_device vs reference");

    let poison = -12345.678f32;
    let total = m + 5;
    let mut out = rt.alloc_rows(total, d).unwrap();
    rt.write_rows(&mut out, 0, &vec![poison; total * d]).unwrap();
    rt.finish_device(&ga, &mut st, 0, out.rows_mut(2, m).unwrap()).unwrap();
    rt.synchronize().unwrap();
    let mut back = vec![0.0f32; total * d];
    rt.read_rows(&out, 0, &mut back).unwrap();
    for (i, row) in back.chunks(d).enumerate() {
        if (2..2 + m).contains(&i) {
            assert_eq!(row, &host[(i - 2) * d..(i - 1) * d], "seed {seed}: target row {i} differs from finish_host");
            assert!(row.iter().all(|&v| v != poison), "seed {seed}: target row {i} not fully written");
        } else {
            assert!(row.iter().all(|&v| v == poison), "seed {seed}: row {i} outside the target was touched");
        }
    }
}

/// Bad arguments give typed errors, never a panic.
fn bad_arguments_are_typed_errors(rt: &GpuRuntime) {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let a = adapter(&AdapterSpec::small(2, 32, 4, 8, Activation::Gelu), &mut rng);
    let ga = rt.upload(&a).unwrap();
    let other = rt.upload(&a).unwrap();
    let mut st = rt.new_state(&ga).unwrap();
    let mut other_st = rt.new_state(&other).unwrap();
    let rows = rng.vec_f32(3 * 32, 1.0);
    let mut out = vec![0.0f32; 4 * 32];
    assert!(matches!(rt.feed_host(&ga, &mut st, 2, &rows), Err(GpuError::LayerOutOfRange { layer: 2, n_layer: 2 })));
    assert!(matches!(rt.feed_host(&ga, &mut st, 0, &rows[..33]), Err(GpuError::RowsNotMultiple { len: 33, n_embd: 32 })));
    assert!(matches!(rt.feed_host(&ga, &mut other_st, 0, &rows), Err(GpuError::ForeignState)));
    assert!(matches!(rt.finish_host(&ga, &mut st, 0, &mut out), Err(GpuError::NoRows { layer: 0 })));
    rt.feed_host(&ga, &mut st, 0, &rows).unwrap();
    assert!(matches!(rt.finish_host(&ga, &mut st, 0, &mut out[..100]), Err(GpuError::OutputSize { len: 100, expected: 128 })));
    assert!(matches!(rt.finish_host(&ga, &mut st, 5, &mut out), Err(GpuError::LayerOutOfRange { .. })));
    let wide = rt.alloc_rows(3, 48).unwrap();
    assert!(matches!(rt.feed_device(&ga, &mut st, 0, wide.rows(0, 3).unwrap()), Err(GpuError::RowWidth { got: 48, n_embd: 32 })));
    assert!(matches!(wide.rows(2, 2), Err(GpuError::RowRange { row0: 2, end: 4, n_rows: 3 })));
    let mut dst = rt.alloc_rows(5, 32).unwrap();
    assert!(matches!(
        rt.finish_device(&ga, &mut st, 0, dst.rows_mut(0, 5).unwrap()),
        Err(GpuError::OutputRows { n_rows: 5, n_embd: 32, m: 4, d: 32 })
    ));
    let mut rows_dst = rt.alloc_rows(1, 32).unwrap();
    assert!(matches!(rt.write_rows(&mut rows_dst, 0, &rows), Err(GpuError::RowRange { .. })));
    // Soft tokens beyond the kernels' limit.
    let too_many = adapter(&AdapterSpec::small(1, 16, 9, 8, Activation::Identity), &mut rng);
    assert!(matches!(rt.upload(&too_many), Err(GpuError::Unsupported { .. })));
    // Still usable after all that.
    rt.finish_host(&ga, &mut st, 0, &mut out).unwrap();
    assert!(rel_err(&out, &reference_out(&a, 0, &rows)) <= 1e-5, "seed {seed}");
}

/// An adapter or state from another runtime is refused.
fn foreign_runtime_is_refused(rt: &GpuRuntime, other: &GpuRuntime) {
    let mut rng = Rng::new(fresh_seed());
    let a = adapter(&AdapterSpec::small(1, 16, 2, 8, Activation::Identity), &mut rng);
    let ga = other.upload(&a).unwrap();
    let mut st = other.new_state(&ga).unwrap();
    assert!(matches!(rt.new_state(&ga), Err(GpuError::ForeignAdapter)));
    assert!(matches!(rt.feed_host(&ga, &mut st, 0, &[0.5; 16]), Err(GpuError::ForeignAdapter)));
    assert!(matches!(rt.reset(&mut st), Err(GpuError::ForeignState)));
    let mut rows = other.alloc_rows(2, 16).unwrap();
    let ours = rt.upload(&a).unwrap();
    let mut our_st = rt.new_state(&ours).unwrap();
    assert!(matches!(rt.feed_device(&ours, &mut our_st, 0, rows.rows(0, 2).unwrap()), Err(GpuError::ForeignRows)));
    assert!(matches!(rt.write_rows(&mut rows, 0, &[0.0; 16]), Err(GpuError::ForeignRows)));
    assert!(matches!(rt.finish_device(&ours, &mut our_st, 0, rows.rows_mut(0, 2).unwrap()), Err(GpuError::ForeignRows)));
}

/// The benchmark runs end to end at a tiny shape.
fn bench_runs(rt: &GpuRuntime) {
    let cfg = GpuBenchConfig {
        n_layer: 2,
        n_embd: 64,
        bottleneck: 16,
        rows: 12,
        reps: 3,
        warmup: 1,
        copy_bytes: 1 << 16,
        ..GpuBenchConfig::default()
    };
    let r = gpu_generator_bench(rt, &cfg).unwrap();
    assert_eq!((r.n_layer, r.n_embd, r.bottleneck, r.n_soft_tokens, r.rows, r.dtype.as_str()), (2, 64, 16, 4, 12, "f16"));
    assert_eq!(r.down_bytes, 64 * 16 * 2);
    assert!(r.generator_ms_median > 0.0 && r.generator_ms_min <= r.generator_ms_median);
    assert!(r.down_us_median > 0.0 && r.down_gbps > 0.0 && r.copy_gbps > 0.0);
    let bad = GpuBenchConfig { reps: 0, ..cfg };
    assert!(matches!(gpu_generator_bench(rt, &bad), Err(GpuError::BenchConfig { .. })));
}

// ---------------------------------------------------------------------------------------------
// The two backends
// ---------------------------------------------------------------------------------------------

/// CUDA device 0 (opened once per test binary); a missing device fails every CUDA test (they run
/// only in builds with the `cuda` feature; the panic leaves the cell empty, so each fails on its own).
fn cuda() -> Arc<GpuRuntime> {
    static RT: OnceLock<Arc<GpuRuntime>> = OnceLock::new();
    RT.get_or_init(|| cuda_for_test("CUDA tests")).clone()
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod emulated {
            $(
                #[test]
                fn $name() {
                    super::$name(&iapt_generator_cuda::GpuRuntime::emulated());
                }
            )*
        }
        mod cuda {
            $(
                #[test]
                #[cfg_attr(not(feature = "cuda"), ignore = "built without the `cuda` feature: the CUDA variant runs on a GPU machine (scripts/gpu/)")]
                fn $name() {
                    super::$name(&super::cuda());
                }
            )*
        }
    };
}

on_every_backend!(
    all_activations_match_reference,
    shared_tensors_and_soft_token_counts,
    single_row,
    chunkings_equal_one_shot,
    saved_state_goes_on_like_the_original,
    large_scores_are_stable,
    non_finite_rows_are_errors,
    device_rows_in_and_out,
    bad_arguments_are_typed_errors,
    bench_runs,
);

#[test]
fn emulated_foreign_runtime_is_refused() {
    foreign_runtime_is_refused(&GpuRuntime::emulated(), &GpuRuntime::emulated());
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "built without the `cuda` feature: the CUDA variant runs on a GPU machine (scripts/gpu/)")]
fn cuda_foreign_runtime_is_refused() {
    foreign_runtime_is_refused(&cuda(), &GpuRuntime::emulated());
}

/// The real block size (256 threads, as on a device) once, through every kernel and barrier, with
/// partial blocks (d and r not multiples of the block or of its 8 groups) and a rescaling chunk.
#[test]
fn emulated_with_device_block_size() {
    let rt = GpuRuntime::emulated_with_block(256).unwrap();
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut spec = AdapterSpec::small(1, 76, 4, 20, rational_b());
    spec.dtype = DType::BF16;
    let a = adapter(&spec, &mut rng);
    let mut rows = rng.vec_f32(5 * 76, 1.0);
    rows[2 * 76..].iter_mut().for_each(|v| *v *= 2.0);
    let got = run_chunks(&rt, &a, 0, &rows, &[2, 3]).unwrap();
    assert!(rel_err(&got, &reference_out(&a, 0, &rows)) <= 1e-5, "seed {seed}");
    assert!(matches!(GpuRuntime::emulated_with_block(48), Err(GpuError::Unsupported { .. })));
}

/// `cuda_unavailable_reason` agrees with `cuda(0)` and never panics.
#[test]
fn cuda_availability_is_reported() {
    match GpuRuntime::cuda_unavailable_reason() {
        Some(reason) => {
            assert!(!cuda_required(), "IAPT_REQUIRE_CUDA=1 but CUDA device 0 is unusable: {reason}");
            eprintln!("skipped: {reason}");
            assert!(matches!(GpuRuntime::cuda(0), Err(GpuError::CudaUnavailable { .. } | GpuError::CudaNotCompiled)));
        }
        None => {
            let rt = GpuRuntime::cuda(0).expect("cuda(0) when available");
            assert!(rt.describe().starts_with("CUDA device 0"));
        }
    }
}

/// The kernel source compiles with NVRTC for sm_90 (no GPU needed, only libnvrtc).
#[test]
fn kernels_compile_with_nvrtc() {
    if let Some(reason) = nvrtc_unavailable_reason() {
        assert!(!cuda_required(), "IAPT_REQUIRE_CUDA=1 but NVRTC is unusable: {reason}");
        eprintln!("skipped: {reason}");
        return;
    }
    for arch in ["compute_90", "compute_80"] {
        let ptx = compile_kernels_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        for k in ["iapt_scores", "iapt_stats", "iapt_pool", "iapt_down_f16", "iapt_up_bf16"] {
            assert!(ptx.contains(&format!(".entry {k}")), "{arch}: PTX lacks {k}");
        }
        eprintln!("NVRTC {arch}: {} bytes of PTX", ptx.len());
    }
}

/// CUDA only: the pooling's cross-block atomics under load. Thousands of rows over many row splits
/// and column blocks (the grid is sized for about two blocks per multiprocessor), m at the kernels'
/// limit, fed in uneven chunks, repeated: every run must match the f64 reference. The emulator runs
/// one block at a time and cannot show these races, so it has no variant of this test.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "built without the `cuda` feature: the CUDA variant runs on a GPU machine (scripts/gpu/)")]
fn cuda_cross_block_atomics_stress() {
    let rt = cuda();
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (d, r, m, n) = (1536usize, 64u32, 8u32, 4099usize);
    let a = adapter(&AdapterSpec::small(1, d as u32, m, r, rational_b()), &mut rng);
    let rows = rng.vec_f32(n * d, 1.0);
    let want = reference_out(&a, 0, &rows);
    for rep in 0..4 {
        let chunks = if rep == 0 { vec![n] } else { random_chunks_large(n, &mut rng) };
        let got = run_chunks(&rt, &a, 0, &rows, &chunks).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let err = rel_err(&got, &want);
        assert!(err <= 1e-5, "seed {seed}, repetition {rep}, chunks {chunks:?}: rel err {err:e}");
    }
}

/// Chunk sizes summing to n, from 1 row to about n/2.
fn random_chunks_large(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let c = 1 + rng.below(left.min(n / 2 + 1));
        out.push(c);
        left -= c;
    }
    out
}
