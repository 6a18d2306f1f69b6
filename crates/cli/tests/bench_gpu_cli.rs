//! `iapt bench-gpu` at a tiny shape. What each device must do is decided by what the binary says
//! of itself (`iapt devices --json`, "generator"): on CUDA it must run (exit 0) where device 0 is
//! usable and exit 2 with the reason otherwise, and with `IAPT_REQUIRE_CUDA=1` (the GPU machine's
//! scripts) a missing device fails the test; `--device emulated` must run where the emulator is
//! compiled in and exit 2 saying so otherwise; a bad dtype exits 2.

use std::process::{Command, Output};

use iapt_generator_cuda::testing::cuda_required;

const TINY: [&str; 12] =
    ["--layers", "2", "--n-embd", "64", "--bottleneck", "16", "--rows", "8", "--reps", "2", "--json", "--soft-tokens=4"];

fn iapt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

/// The binary's own account of where the generator can run.
fn generator() -> serde_json::Value {
    let o = iapt(&["devices", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("devices JSON");
    v["generator"].clone()
}

fn bench(device: &str) -> Output {
    let mut args = vec!["bench-gpu", "--device", device];
    args.extend(TINY);
    iapt(&args)
}

fn assert_ran(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    assert_eq!(v["n_embd"], 64);
    assert!(v["down_gbps"].as_f64().unwrap() > 0.0);
}

fn assert_refused(o: &Output, why: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(why), "{err}");
}

#[test]
fn bench_gpu_on_cuda_runs_where_a_device_is_usable_and_says_why_not_elsewhere() {
    let g = generator();
    let o = bench("cuda");
    match g["cuda"].as_str() {
        Some(_) => assert_ran(&o),
        None if cuda_required() => panic!("IAPT_REQUIRE_CUDA=1 but the binary has no usable CUDA device: {}", g["cuda_unavailable"]),
        None => {
            let why = g["cuda_unavailable"].as_str().expect("a reason");
            assert_refused(&o, if g["cuda_compiled"] == true { "no usable CUDA device" } else { "no CUDA generator" });
            eprintln!("bench-gpu on CUDA refused as expected here: {why}");
        }
    }
}

#[test]
fn bench_gpu_emulated_runs_exactly_where_the_emulator_is_compiled_in() {
    let o = bench("emulated");
    if generator()["emulation_compiled"] == true {
        assert_ran(&o);
    } else {
        assert_refused(&o, "not compiled into this build");
    }
}

#[test]
fn bench_gpu_rejects_a_bad_dtype() {
    let o = iapt(&["bench-gpu", "--dtype", "f8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dtype must be f32, f16 or bf16"));
}
