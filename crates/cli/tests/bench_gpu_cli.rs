//! `iapt bench-gpu` at a tiny shape: on CUDA it runs (exit 0) where a device is usable and exits 2
//! with the reason otherwise; `--device emulated` runs where the build has the emulator (it does
//! when cargo unifies iapt-llama's test features into this build) and exits 2 saying so otherwise;
//! a bad dtype exits 2.

use std::process::{Command, Output};

const TINY: [&str; 12] =
    ["--layers", "2", "--n-embd", "64", "--bottleneck", "16", "--rows", "8", "--reps", "2", "--json", "--soft-tokens=4"];

fn iapt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn check(o: &Output, unavailable: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(0) => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
            assert_eq!(v["n_embd"], 64);
            assert!(v["down_gbps"].as_f64().unwrap() > 0.0);
        }
        Some(2) => {
            assert!(err.contains(unavailable), "{err}");
            eprintln!("skipped: {}", err.trim());
        }
        other => panic!("exit {other:?}: {err}"),
    }
}

#[test]
fn bench_gpu_on_cuda_runs_or_says_why_not() {
    let mut args = vec!["bench-gpu", "--device", "cuda"];
    args.extend(TINY);
    check(&iapt(&args), "no usable CUDA device");
}

#[test]
fn bench_gpu_emulated_runs_or_says_why_not() {
    let mut args = vec!["bench-gpu", "--device", "emulated"];
    args.extend(TINY);
    check(&iapt(&args), "not compiled into this build");
}

#[test]
fn bench_gpu_rejects_a_bad_dtype() {
    let o = iapt(&["bench-gpu", "--dtype", "f8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dtype must be f32, f16 or bf16"));
}
