//! `iapt serve` with the official `openai` Python package (`crates/cli/tests/openai/openai_client.py`,
//! installed by `scripts/setup` into `.venv`, the version pinned in `tests/openai/requirements.txt`):
//! models with `parent`, completions and chat, streamed and not, select the adapter or the base by
//! `model` and give the greedy text of `iapt run`; an unknown model, `n` = 2 and a wrong API key
//! raise the client's own errors. A missing virtual environment fails this test (never a skip).

mod support;

use std::process::Command;

use serde_json::json;
use support::*;

#[test]
fn the_openai_python_client_selects_adapters_by_model() {
    let python = repo().join(".venv/bin/python");
    assert!(python.is_file(), "{}: missing; run `bash scripts/setup` (it installs the pinned openai package)", python.display());
    let (model, adapter) = (fixtures().join("llama-tiny-f32.gguf"), fixtures().join("llama-tiny.iapt.safetensors"));
    let a = format!("tiny={}", adapter.display());
    let mut args = vec!["--model", model.to_str().unwrap(), "--adapter", &a, "--api-key", "sk-test", "--ctx-size", "1024"];
    args.extend(EXACT);
    let s = Server::start(&args);
    let prompt = "write the list backwards: b a c";
    let mut expected = json!({"completion": {}, "chat": {}});
    for (id, ad) in [("tiny", Some(adapter.as_path())), ("llama-tiny-f32", None)] {
        expected["completion"][id] = json!(run_alone(&model, ad, prompt, false, false, 12, &EXACT));
        expected["chat"][id] = json!(run_alone(&model, ad, prompt, false, true, 12, &EXACT));
    }
    let cfg = json!({"base_url": s.url("/v1"), "api_key": "sk-test", "base": "llama-tiny-f32", "adapter": "tiny", "prompt": prompt, "expected": expected});
    let script = repo().join("crates/cli/tests/openai/openai_client.py");
    let o = Command::new(&python).arg(&script).arg(cfg.to_string()).output().expect("run python");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "openai client failed:\n{out}\n{err}\nserver stderr:\n{}", s.stderr_text());
    assert!(out.contains("all checks passed"), "{out}");
    assert!(s.stop().success());
}
