//! Device listing and layer placement (`devices`, `supports_gpu_offload`, `ModelParams`).
//!
//! On a CPU-only build (CI) the list is the CPU alone and every `--n-gpu-layers` value loads and
//! runs on the CPU with bit-identical logits. Where llama.cpp has a GPU backend (a binary linked
//! against a CUDA-enabled libggml, scripts/gpu/device-run), the same tests check that the GPU is
//! listed, that the default puts every layer there, and that CPU and GPU placements agree.

use std::path::PathBuf;

use iapt_engine::{Engine, EngineConfig, Request};
use iapt_format::Adapter;
use iapt_llama::{devices, supports_gpu_offload, DeviceKind, KvType, Model, ModelParams};

/// As in parity.rs: the run-time `CARGO_MANIFEST_DIR` when set, else the compile-time one.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("../../converters/python/fixtures/models").join(name)
}

#[test]
fn exactly_one_cpu_device_and_offload_matches_the_list() {
    let list = devices();
    for d in &list {
        eprintln!("device {d}: {:?}, {} of {} bytes free", d.kind, d.memory_free, d.memory_total);
        assert!(!d.name.is_empty(), "a device without a name: {d:?}");
    }
    assert_eq!(list.iter().filter(|d| d.kind == DeviceKind::Cpu).count(), 1, "{list:?}");
    let has_gpu = list.iter().any(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu));
    assert_eq!(supports_gpu_offload(), has_gpu, "{list:?}");
    let cpu = list.iter().find(|d| d.kind == DeviceKind::Cpu).unwrap();
    assert_eq!(cpu.to_string(), cpu.name, "the CPU prints as its name alone");
}

#[test]
fn model_params_map_to_llama_cpp_values() {
    let all_or_none = if supports_gpu_offload() { -1 } else { 0 };
    assert_eq!(ModelParams::default().llama_n_gpu_layers(), all_or_none);
    assert_eq!(ModelParams { n_gpu_layers: Some(0) }.llama_n_gpu_layers(), 0);
    assert_eq!(ModelParams { n_gpu_layers: Some(7) }.llama_n_gpu_layers(), 7);
    assert_eq!(ModelParams { n_gpu_layers: Some(u32::MAX) }.llama_n_gpu_layers(), i32::MAX);
}

fn greedy(model: &Model, adapter: Option<&Adapter>) -> (Vec<i32>, Vec<Vec<f32>>) {
    let cfg = EngineConfig {
        parallel: 1,
        seq_ctx: 128,
        batch_tokens: 128,
        n_ubatch: 128,
        n_threads: 1,
        flash_attn: Some(false),
        kv_type: KvType::F32,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(model, cfg).expect("engine");
    let mut req = Request::new(vec![1, 309, 201, 71, 203, 17, 42], 6);
    if let Some(a) = adapter {
        e.load_adapter("a", a).expect("adapter");
        req = req.with_adapter("a");
    }
    req.stop_at_eog = false;
    req.logits = true;
    let done = e.complete(req, &mut |_| {}).expect("generate");
    done.tokens.into_iter().map(|t| (t.token, t.logits.unwrap())).unzip()
}

/// Every placement (none, some, all, more than the model has) loads and gives the same greedy
/// run, with and without the adapter: bit-identical on the CPU, within 1e-3 relative where layers
/// sit on a GPU (its kernels round differently).
#[test]
fn every_layer_count_loads_and_agrees_with_the_cpu() {
    let path = fixture("llama-tiny-f32.gguf");
    let adapter = Adapter::open(fixture("llama-tiny.iapt.safetensors")).expect("adapter");
    let cpu = Model::load_with(&path, &ModelParams { n_gpu_layers: Some(0) }).expect("cpu model");
    for with_adapter in [false, true] {
        let a = with_adapter.then_some(&adapter);
        let (ref_tokens, ref_logits) = greedy(&cpu, a);
        for n in [None, Some(1), Some(u32::MAX)] {
            let model = Model::load_with(&path, &ModelParams { n_gpu_layers: n }).expect("model");
            let (tokens, logits) = greedy(&model, a);
            let mut worst = 0.0f64;
            for (got, want) in logits.iter().zip(&ref_logits) {
                let num = got.iter().zip(want).map(|(g, w)| f64::from((g - w).abs())).fold(0.0, f64::max);
                let den = want.iter().map(|w| f64::from(w.abs())).fold(0.0, f64::max);
                worst = worst.max(num / den);
            }
            eprintln!("n_gpu_layers {n:?}, adapter {with_adapter}: worst rel err vs CPU {worst:.2e}");
            if supports_gpu_offload() {
                assert!(worst <= 1e-3, "n_gpu_layers {n:?}: rel err {worst:.3e} vs the CPU");
            } else {
                assert_eq!(logits, ref_logits, "n_gpu_layers {n:?} must be ignored without a GPU backend");
            }
            assert_eq!(tokens, ref_tokens, "n_gpu_layers {n:?}, adapter {with_adapter}: greedy tokens");
        }
    }
}
