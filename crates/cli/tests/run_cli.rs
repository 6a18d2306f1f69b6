//! `iapt run` end to end on the tiny fixture models (converters/python/fixtures/models):
//! - greedy generation with `--prompt-tokens` and `--dump-logits` reproduces the float64 reference
//!   of Hugging Face transformers with the IAPT injection (F32 KV cache, flash attention off);
//! - a Q8_0 model quantized by llama.cpp runs with the adapter and a text prompt, with and without
//!   `--chat`;
//! - bad inputs exit 1 with a clear message and no crash: wrong base model, corrupt adapter,
//!   over-long prompt, token id outside the vocabulary; clap usage errors exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models")
}

fn iapt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn manifest_case(name: &str) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    m["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn run_reproduces_the_reference_and_dumps_logits() {
    let c = manifest_case("llama-short-iapt");
    let ids: Vec<String> = c["instruction"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.npy");
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let o = iapt(&[
        "run",
        "--model",
        path(&model),
        "--adapter",
        path(&adapter),
        "--prompt-tokens",
        &ids.join(","),
        "--n-predict",
        "16",
        "--temp",
        "0",
        "--kv-type",
        "f32",
        "--flash-attn",
        "off",
        "--threads",
        "1",
        "--ctx-size",
        "256",
        "--dump-logits",
        path(&dump),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = iapt_npy::read_f32_file(&dump).unwrap();
    let want = iapt_npy::read_f64_file(fixtures().join(c["logits"].as_str().unwrap())).unwrap();
    assert_eq!(got.shape, want.shape, "[steps, n_vocab]");
    let n_vocab = want.shape[1];
    for (step, (g, w)) in got.data.chunks(n_vocab).zip(want.data.chunks(n_vocab)).enumerate() {
        let err = g.iter().zip(w).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        let scale = w.iter().map(|b| b.abs()).fold(0.0, f64::max);
        assert!(err / scale <= 1e-4, "step {step}: rel err {}", err / scale);
        let argmax = g.iter().enumerate().fold(0, |best, (i, v)| if *v > g[best] { i } else { best });
        assert_eq!(argmax as i64, c["tokens"][step].as_i64().unwrap(), "step {step}");
    }
}

#[test]
fn run_works_with_a_quantized_model_and_text_prompts() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let q8 = dir.path().join(format!("{arch}-q8_0.gguf"));
        iapt_llama::quantize(&fixtures().join(format!("{arch}-tiny-f32.gguf")), &q8, iapt_llama::Quant::Q8_0, 1).unwrap();
        let adapter = fixtures().join(format!("{arch}-tiny.iapt.safetensors"));
        for chat in [false, true] {
            let mut args =
                vec!["run", "--model", path(&q8), "--adapter", path(&adapter), "--prompt", "write the list backwards: cake owl sun"];
            args.extend(["--n-predict", "8", "--seed", "3", "--threads", "1", "--ctx-size", "256"]);
            if chat {
                args.push("--chat");
            }
            let o = iapt(&args);
            assert!(o.status.success(), "{arch} chat={chat}: {}", stderr(&o));
            assert!(stderr(&o).contains("+ 4 soft tokens"), "{}", stderr(&o));
        }
        let o = iapt(&["run", "--model", path(&q8), "--no-adapter", "--prompt", "the cat", "--n-predict", "4", "--threads", "1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("+ 0 soft tokens"), "{}", stderr(&o));
    }
}

#[test]
fn bad_inputs_exit_1_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let llama = fixtures().join("llama-tiny-f32.gguf");
    let qwen = fixtures().join("qwen2-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let run = |model: &Path, adapter: &Path, extra: &[&str]| {
        let mut args = vec!["run", "--model", path(model), "--adapter", path(adapter), "--threads", "1"];
        args.extend(extra);
        iapt(&args)
    };
    let check = |o: &Output, needle: &str| {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
        assert!(stderr(o).contains(needle), "expected {needle:?} in: {}", stderr(o));
    };

    // Wrong base model.
    check(&run(&qwen, &adapter, &["--prompt", "hi"]), "wrong base model");

    // Corrupt adapter: truncated, and not an adapter at all.
    let bytes = std::fs::read(&adapter).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    check(&run(&llama, &cut, &["--prompt", "hi"]), "cannot use adapter");
    check(&run(&llama, &llama, &["--prompt", "hi"]), "cannot use adapter");

    // Over-long prompt: 13 tokens + 4 soft tokens > 16.
    check(&run(&llama, &adapter, &["--prompt-tokens", "1,5,6,7,8,9,10,11,12,13,14,15,16", "--ctx-size", "16"]), "does not fit the context");

    // Token outside the vocabulary.
    check(&run(&llama, &adapter, &["--prompt-tokens", "1,100000"]), "outside the vocabulary");

    // A model that is not GGUF.
    let o = iapt(&["run", "--model", path(&adapter), "--no-adapter", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    // Usage errors: neither --adapter nor --no-adapter; no prompt.
    assert_eq!(iapt(&["run", "--model", path(&llama), "--prompt", "hi"]).status.code(), Some(2));
    assert_eq!(iapt(&["run", "--model", path(&llama), "--no-adapter"]).status.code(), Some(2));

    // A chat template that is no built-in name and no file: unreadable input (2), naming it; a
    // Jinja file that does not compile: invalid input (1), with minijinja's line.
    let o = iapt(&["run", "--model", path(&llama), "--no-adapter", "--prompt", "hi", "--chat-template", "no-such.jinja"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no-such.jinja") && stderr(&o).contains("chatml"), "{}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}").unwrap();
    let o = iapt(&["run", "--model", path(&llama), "--no-adapter", "--prompt", "hi", "--chat-template", path(&bad)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("bad.jinja") && stderr(&o).contains("line 1"), "{}", stderr(&o));
}

/// `iapt devices` lists the CPU (text and JSON) and says whether layers can go to a GPU; `iapt run
/// --n-gpu-layers N --verbose` states the devices and where the layers go, and runs (on the CPU in
/// a CPU-only build, where any N is accepted); a negative N is a usage error.
#[test]
fn devices_and_n_gpu_layers() {
    let o = iapt(&["devices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("devices: ") && text.contains("CPU") && text.contains("GPU offload: "), "{text}");

    let o = iapt(&["devices", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("devices --json is JSON");
    let list = v["devices"].as_array().expect("a devices list");
    assert_eq!(list.iter().filter(|d| d["type"] == "cpu").count(), 1, "{v}");
    let gpu = v["gpu_offload"].as_bool().expect("gpu_offload is a bool");

    let model = fixtures().join("llama-tiny-f32.gguf");
    for n in ["0", "3", "4000000000"] {
        let o = iapt(
            &["run", "--model", path(&model), "--no-adapter", "--prompt-tokens", "1,5,9", "--n-predict", "2", "--temp", "0"]
                .into_iter()
                .chain(["--threads", "1", "--n-gpu-layers", n, "--verbose"])
                .collect::<Vec<_>>(),
        );
        let err = stderr(&o);
        assert!(o.status.success(), "--n-gpu-layers {n}: {err}");
        assert!(err.lines().any(|l| l.starts_with("devices: ")), "{err}");
        let offload = err.lines().find(|l| l.starts_with("offload: ")).unwrap_or_else(|| panic!("no offload line: {err}"));
        if n == "0" {
            assert!(offload.contains("none (--n-gpu-layers 0)"), "{offload}");
        } else if !gpu {
            assert!(offload.contains("has no effect"), "{offload}");
        }
    }
    let o = iapt(&["run", "--model", path(&model), "--no-adapter", "--prompt-tokens", "1", "--n-gpu-layers", "-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn generator_device_cuda_without_a_usable_device_fails_clearly() {
    if iapt_llama_cuda_usable() {
        eprintln!("skipped: a CUDA device is usable here; this test checks the message where none is");
        return;
    }
    let c = manifest_case("llama-short-iapt");
    let ids: Vec<String> = c["instruction"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let model = fixtures().join("llama-tiny-f32.gguf");
    let adapter = fixtures().join("llama-tiny.iapt.safetensors");
    let o = iapt(&[
        "run",
        "--model",
        path(&model),
        "--adapter",
        path(&adapter),
        "--prompt-tokens",
        &ids.join(","),
        "--n-predict",
        "2",
        "--generator-device",
        "cuda",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--generator-device cuda") && stderr(&o).contains("CUDA"), "{}", stderr(&o));
    // `auto` on a CPU-only llama.cpp runs the generators on the CPU.
    assert!(!iapt_llama::supports_gpu_offload());
    let o = iapt(&[
        "run",
        "--model",
        path(&model),
        "--adapter",
        path(&adapter),
        "--prompt-tokens",
        &ids.join(","),
        "--n-predict",
        "2",
        "--verbose",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("generator: CPU"), "{}", stderr(&o));
}

/// Whether a CUDA device is usable here (then the failure above cannot be provoked).
fn iapt_llama_cuda_usable() -> bool {
    iapt_llama::GpuRuntime::cuda_unavailable_reason().is_none()
}
