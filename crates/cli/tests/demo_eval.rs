//! The embedded demo (issue 7) end to end on the committed assets (converters/python/demo/assets):
//! - `iapt eval` on a 100-example held-out slice with the committed 4-bit base: the adapter lifts
//!   exact match by at least 50 points and the base alone gets most answers wrong;
//! - `iapt demo` exits 0 and prints the base and base + IAPT columns, from the repository root and
//!   from an unrelated directory (the compiled-in fallback path);
//! - `iapt eval --answers` with the F16 base gives the PyTorch answers on the demo prompts, with
//!   and without the adapter;
//! - `iapt quantize` writes a model llama.cpp loads, atomically (no temporary left, a failure
//!   leaves no output);
//! - the whole chain from the real `torch.save` checkpoint: `iapt convert` reproduces the committed
//!   adapter byte for byte, `iapt validate --model` accepts it against the 4-bit base, and that
//!   converted adapter lifts the 4-bit base on a held-out slice;
//! - bad inputs: a malformed data line exits 1 naming file and line, a missing file exits 2, prompt
//!   ids that the model's tokenizer does not reproduce exit 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    repo().join("converters/python/demo/assets")
}

fn iapt_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).current_dir(dir).args(args).output().expect("run iapt")
}

fn iapt(args: &[&str]) -> Output {
    iapt_in(&repo(), args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_lift_on_a_held_out_slice_with_the_4bit_base() {
    let a = assets();
    let (model, adapter, data) = (a.join("base-q4_k_m.gguf"), a.join("adapter.iapt.gguf"), a.join("held_out.jsonl"));
    let o = iapt(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
        "--limit",
        "100",
        "--no-adapter-too",
        "--json",
        "--threads",
        "1",
        "--ctx-size",
        "128",
    ]);
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let with = &v["with_adapter"];
    let without = &v["without_adapter"];
    assert_eq!(with["n"], 100);
    assert_eq!(without["n"], 100);
    let (acc_with, acc_without) = (with["accuracy"].as_f64().unwrap(), without["accuracy"].as_f64().unwrap());
    let lift = v["lift"].as_f64().unwrap();
    assert!((lift - (acc_with - acc_without)).abs() < 1e-9, "{v}");
    assert!(lift >= 50.0, "lift {lift} < 50 points: {v}");
    assert!(acc_without < 50.0, "the base alone should get most answers wrong: {v}");
    assert!(acc_with >= 90.0, "with the adapter: {v}");
}

fn check_demo_output(o: &Output) {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), text(&o.stderr));
    let out = text(&o.stdout);
    let header = out.lines().find(|l| l.starts_with("instruction")).unwrap_or_else(|| panic!("no table header:\n{out}"));
    assert!(header.contains("base (no adapter)") && header.contains("base + IAPT"), "{header}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("write the list backwards:")).collect();
    assert_eq!(rows.len(), 5, "{out}");
    let col = |r: &str, k: usize| r.split(" | ").nth(k).unwrap_or_else(|| panic!("row without 4 columns: {r}")).trim().to_owned();
    let base_ok = rows.iter().filter(|r| col(r, 2).starts_with("ok ")).count();
    let tuned_ok = rows.iter().filter(|r| col(r, 3).starts_with("ok ")).count();
    assert!(tuned_ok >= 4 && base_ok <= 2, "base {base_ok}/5, tuned {tuned_ok}/5:\n{out}");
    for r in &rows {
        assert!(col(r, 3).len() > 3, "empty adapter answer: {r}");
    }
}

#[test]
fn demo_prints_both_columns_from_the_repo_root() {
    check_demo_output(&iapt(&["demo", "--threads", "1", "--ctx-size", "128"]));
}

#[test]
fn demo_finds_the_assets_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    check_demo_output(&iapt_in(dir.path(), &["demo", "--threads", "1", "--ctx-size", "128"]));
}

#[test]
fn demo_with_a_missing_assets_dir_exits_2() {
    let o = iapt(&["demo", "--assets", "/nonexistent/assets"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("/nonexistent/assets"), "{}", text(&o.stderr));
}

#[test]
fn quantize_writes_a_loadable_model_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let o = iapt(&["quantize", s(&assets().join("base-f16.gguf")), "-o", s(&out), "--type", "q8_0", "--threads", "1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["q8.gguf".to_owned()]);
    // The quantized model answers like the committed one.
    let a = assets();
    let o = iapt(&[
        "eval",
        "--model",
        s(&out),
        "--adapter",
        s(&a.join("adapter.iapt.gguf")),
        "--data",
        s(&a.join("held_out.jsonl")),
        "--limit",
        "10",
        "--json",
        "--threads",
        "1",
        "--ctx-size",
        "128",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["with_adapter"]["correct"].as_u64().unwrap() >= 8, "{v}");
}

#[test]
fn quantize_failure_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-model.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let out = dir.path().join("out.gguf");
    let o = iapt(&["quantize", s(&bad), "-o", s(&out), "--type", "q4_k_m"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["not-a-model.gguf".to_owned()]);
    let o = iapt(&["quantize", s(&dir.path().join("missing.gguf")), "-o", s(&out), "--type", "q8_0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = iapt(&["quantize", s(&assets().join("base-f16.gguf")), "-o", s(&dir.path().join("no/such/dir/out.gguf")), "--type", "q8_0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("does not exist"), "{}", text(&o.stderr));
}

fn eval_on(data: &Path) -> Output {
    let a = assets();
    iapt(&[
        "eval",
        "--model",
        s(&a.join("base-q8_0.gguf")),
        "--adapter",
        s(&a.join("adapter.iapt.gguf")),
        "--data",
        s(data),
        "--prompt-format",
        s(&a.join("prompt_format.json")),
        "--threads",
        "1",
        "--ctx-size",
        "128",
    ])
}

#[test]
fn eval_rejects_bad_data_with_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, "{\"instruction\": \"write the list backwards: sun owl\", \"response\": \"= owl sun\"}\n{\"instruction\": 3}\n")
        .unwrap();
    let o = eval_on(&data);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("data.jsonl:2:"), "{}", text(&o.stderr));

    let o = eval_on(&dir.path().join("missing.jsonl"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));

    std::fs::write(
        &data,
        "{\"instruction\": \"write the list backwards: sun owl\", \"response\": \"= owl sun\", \"prompt_ids\": [1, 2, 3]}\n",
    )
    .unwrap();
    let o = eval_on(&data);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("prompt ids"), "{}", text(&o.stderr));
}

#[test]
fn f16_answers_match_pytorch_on_the_demo_prompts() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.jsonl");
    let prompts = a.join("demo_prompts.jsonl");
    let o = iapt(&[
        "eval",
        "--model",
        s(&a.join("base-f16.gguf")),
        "--adapter",
        s(&a.join("adapter.iapt.gguf")),
        "--data",
        s(&prompts),
        "--no-adapter-too",
        "--answers",
        s(&answers),
        "--threads",
        "1",
        "--ctx-size",
        "128",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let read = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (got, want) = (read(&answers), read(&prompts));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["instruction"], w["instruction"]);
        assert_eq!(g["adapter"], w["pytorch_adapter"], "with the adapter: {g} vs {w}");
        assert_eq!(g["base"], w["pytorch_base"], "without the adapter: {g} vs {w}");
    }
}

#[test]
fn pytorch_checkpoint_to_quantized_llama_cpp_chain() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter.gguf");
    let o = iapt(&[
        "convert",
        s(&a.join("adapter_model.bin")),
        "--config",
        s(&a.join("adapter_config.json")),
        "--base",
        s(&a.join("base-f16.gguf")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "convert: {}", text(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(a.join("adapter.iapt.gguf")).unwrap(),
        "iapt convert no longer reproduces the committed adapter.iapt.gguf"
    );
    let o = iapt(&["validate", s(&out), "--model", s(&a.join("base-q4_k_m.gguf"))]);
    assert_eq!(o.status.code(), Some(0), "validate: {}", text(&o.stdout));
    let o = iapt(&[
        "eval",
        "--model",
        s(&a.join("base-q4_k_m.gguf")),
        "--adapter",
        s(&out),
        "--data",
        s(&a.join("held_out.jsonl")),
        "--limit",
        "40",
        "--no-adapter-too",
        "--json",
        "--threads",
        "1",
        "--ctx-size",
        "128",
    ]);
    assert!(o.status.success(), "eval: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["lift"].as_f64().unwrap() >= 50.0, "{v}");
}
