//! The CLI robustness suite (issue 17, "nothing lost, nothing hangs"), one test per class, each over
//! every command that reads or writes files. Broken inputs are made here by the tests themselves;
//! the valid model and adapter are the committed tiny fixtures (copied, so that a regression can
//! only destroy a copy).
//!
//! - class 1: an output that is the same file as an input (same path, `x/../`, hard link, symbolic
//!   link) is refused before any work, and the input is unchanged;
//! - class 2: a closed stdout ends the program quietly (exit 0, no panic);
//! - class 3: files declaring 200k tensors are refused quickly (E004, the limit named);
//! - class 4: SIGTERM/SIGINT remove the temporary in flight and leave the existing output as it was;
//!   the next write removes stale temporaries of ours and nothing else;
//! - class 5: missing / directory / unreadable input -> 2, invalid input -> 1, for every input of
//!   every command; output paths checked up front; each misleading message of the issue;
//! - class 6: `validate --model` on a truncated base model is unreadable (exit 2, E304).

// `args!` builds the argument `Vec` that some lines extend; a line used once is borrowed as is.
#![allow(clippy::useless_vec)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use iapt_format::raw::{write_gguf, write_safetensors, RawTensorOut};
use iapt_format::{Activation, Adapter, Container, DType, Role, Tensor, TensorName};

/// Builds an argument list from `&str`, `&Path`, `PathBuf`, `String`.
macro_rules! args {
    ($($x:expr),* $(,)?) => { vec![$(OsString::from(AsRef::<OsStr>::as_ref(&$x))),*] };
}

/// Far above what linear work takes in a debug build on a busy machine; far below the minutes the
/// quadratic readers took.
const GENEROUS: Duration = Duration::from_secs(30);

fn iapt(args: &[OsString]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).output().expect("run iapt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures")
}

/// Every input a command can be given, valid, in one temporary directory.
struct Env {
    dir: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
    hidden: PathBuf,
    requests: PathBuf,
    data: PathBuf,
    ckpt: PathBuf,
    config: PathBuf,
    assets: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let (model, adapter) = (p("m.gguf"), p("a.safetensors"));
        std::fs::copy(fixtures().join("models/llama-tiny-f32.gguf"), &model).unwrap();
        std::fs::copy(fixtures().join("models/llama-tiny.iapt.safetensors"), &adapter).unwrap();
        let hidden = p("h.npy");
        let mut f = std::fs::File::create(&hidden).unwrap();
        iapt_npy::write_f32(&mut f, &[3, 2, 64], &[0.5; 3 * 2 * 64]).unwrap();
        let requests = p("r.jsonl");
        std::fs::write(&requests, "{\"prompt_tokens\": [1, 2]}\n").unwrap();
        let data = p("d.jsonl");
        std::fs::write(&data, "{\"instruction\": \"x\", \"response\": \"y\"}\n").unwrap();
        std::fs::write(p("prompt_format.json"), "{\"slot_id\": 3, \"n_soft_tokens\": 4}").unwrap();
        let (ckpt, config) = (p("ck.pt"), p("ck.json"));
        std::fs::copy(fixtures().join("ref_f32.pt"), &ckpt).unwrap();
        std::fs::copy(fixtures().join("ref_config.json"), &config).unwrap();
        let assets = p("assets");
        std::fs::create_dir(&assets).unwrap();
        std::fs::write(assets.join("demo_prompts.jsonl"), "{\"instruction\": \"x\", \"response\": \"y\"}\n").unwrap();
        std::fs::write(assets.join("prompt_format.json"), "{\"slot_id\": 3, \"n_soft_tokens\": 4}").unwrap();
        Env { dir, model, adapter, hidden, requests, data, ckpt, config, assets }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The arguments of `command` with input `slot` replaced by `path` (other inputs valid,
    /// outputs fresh paths in the directory).
    fn command(&self, command: &str, slot: &str, path: &Path) -> Vec<OsString> {
        let pick = |name: &str, valid: &Path| if slot == name { path.to_owned() } else { valid.to_owned() };
        let (m, a) = (pick("model", &self.model), pick("adapter", &self.adapter));
        let t1 = ["--threads", "1"];
        let mut v = match command {
            "inspect" => args!["inspect", a],
            "validate" if slot == "model" => args!["validate", self.adapter, "--model", path],
            "validate" => args!["validate", a],
            "pack" => args!["pack", a, "-o", self.path("out.gguf")],
            "convert" => {
                let mut v = args!["convert", pick("checkpoint", &self.ckpt), "--config", pick("config", &self.config)];
                if slot == "model" {
                    v.extend(args!["--base", path]);
                }
                v.extend(args!["-o", self.path("out.gguf")]);
                v
            }
            "generate" => args!["generate", "--adapter", a, "--hidden", pick("hidden", &self.hidden), "-o", self.path("p.npy")],
            "run" => args!["run", "--model", m, "--adapter", a, "--prompt-tokens", "1,2", "--n-predict", "2"],
            "batch" => args!["batch", "--model", m, "--adapter", a, "--requests", pick("requests", &self.requests), "--n-predict", "2"],
            "bench" => args!["bench", "--model", m, "--adapter", a, "--prompt-len", "8", "--gen", "2", "--reps", "1"],
            "quantize" => args!["quantize", m, "-o", self.path("q.gguf"), "--type", "f16"],
            "eval" => args!["eval", "--model", m, "--adapter", a, "--data", pick("data", &self.data)],
            "demo" => args!["demo", "--assets", self.assets, "--model", m, "--adapter", a],
            other => panic!("no such command {other}"),
        };
        if ["run", "batch", "bench", "quantize", "eval", "demo"].contains(&command) {
            v.extend(args![t1[0], t1[1]]);
        }
        v
    }
}

/// Every (command, input slot) pair: each input of each command that reads files.
const INPUTS: [(&str, &str); 20] = [
    ("inspect", "adapter"),
    ("validate", "adapter"),
    ("validate", "model"),
    ("pack", "adapter"),
    ("convert", "checkpoint"),
    ("convert", "config"),
    ("convert", "model"),
    ("generate", "adapter"),
    ("generate", "hidden"),
    ("run", "model"),
    ("run", "adapter"),
    ("batch", "model"),
    ("batch", "adapter"),
    ("batch", "requests"),
    ("bench", "model"),
    ("bench", "adapter"),
    ("quantize", "model"),
    ("eval", "model"),
    ("eval", "adapter"),
    ("eval", "data"),
];

/// A path this process cannot open for reading: a file with mode 000, or, where that does not stop
/// us (root reads any file), a write-only kernel attribute, which nobody can open for reading.
fn unreadable_path(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("unreadable.gguf");
    std::fs::write(&p, b"GGUF").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&p).is_err() {
        return p;
    }
    let buses = std::fs::read_dir("/sys/bus").expect("running as root: /sys/bus is needed for an unreadable file");
    for bus in buses.flatten() {
        let uevent = bus.path().join("uevent");
        if uevent.is_file() && std::fs::File::open(&uevent).is_err() {
            return uevent;
        }
    }
    panic!("running as root and no write-only /sys/bus/*/uevent: cannot make an unreadable file here");
}

/// Bytes that are no adapter, model, checkpoint, NumPy file or JSON.
const GARBAGE: &[u8] = b"this is not a valid file of any kind\n";

#[test]
fn class5_every_input_of_every_command_missing_directory_unreadable_invalid() {
    let env = Env::new();
    let unreadable = unreadable_path(env.dir.path());
    let directory = env.path("a-directory.gguf");
    std::fs::create_dir(&directory).unwrap();
    let mut failures = Vec::new();
    for (command, slot) in INPUTS {
        let ext = match slot {
            "hidden" => "npy",
            "requests" | "data" => "jsonl",
            "config" => "json",
            "checkpoint" => "pt",
            _ => "gguf",
        };
        let garbage = env.path(&format!("garbage-{command}-{slot}.{ext}"));
        std::fs::write(&garbage, GARBAGE).unwrap();
        let cases = [
            ("missing", env.path("none.gguf"), 2),
            ("directory", directory.clone(), 2),
            ("unreadable", unreadable.clone(), 2),
            ("invalid", garbage, 1),
        ];
        for (case, path, want) in cases {
            let o = iapt(&env.command(command, slot, &path));
            let err = text(&o.stderr);
            if o.status.code() != Some(want) || err.contains("panicked") {
                failures.push(format!("{command} ({slot} {case}): exit {:?}, want {want}: {err}{}", o.status.code(), text(&o.stdout)));
            }
        }
    }
    // demo: its model and adapter, relative to --assets.
    for slot in ["model", "adapter"] {
        std::fs::write(env.path("garbage-demo.gguf"), GARBAGE).unwrap();
        for (path, want) in
            [(env.path("none.gguf"), 2), (directory.clone(), 2), (unreadable.clone(), 2), (env.path("garbage-demo.gguf"), 1)]
        {
            let o = iapt(&env.command("demo", slot, &path));
            if o.status.code() != Some(want) {
                failures.push(format!("demo ({slot} {}): exit {:?}, want {want}: {}", path.display(), o.status.code(), text(&o.stderr)));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn class5_messages_name_the_problem_once() {
    let env = Env::new();
    // run --adapter /nonexistent: exit 2, the problem said once.
    let missing = env.path("none.gguf");
    let o = iapt(&env.command("run", "adapter", &missing));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).matches("none.gguf").count(), 1, "{}", text(&o.stderr));
    // A directory given as the model says so.
    let o = iapt(&env.command("run", "model", env.dir.path()));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("directory") && !text(&o.stderr).contains("no such file"), "{}", text(&o.stderr));
    // A file that is not a model: convert --base and run --model agree (1).
    let not_model = env.path("not-a-model.gguf");
    std::fs::write(&not_model, GARBAGE).unwrap();
    assert_eq!(iapt(&env.command("convert", "model", &not_model)).status.code(), Some(1));
    assert_eq!(iapt(&env.command("run", "model", &not_model)).status.code(), Some(1));
}

#[test]
fn class5_output_paths_are_checked_before_any_work() {
    let env = Env::new();
    let (m, a, h, r, d) = (&env.model, &env.adapter, &env.hidden, &env.requests, &env.data);
    let dir = env.dir.path();
    let nodir = env.path("no/such/dir");
    // (command, command line with OUT, the extension it needs)
    type Line<'a> = Box<dyn Fn(&Path) -> Vec<OsString> + 'a>;
    let lines: Vec<(&str, Line<'_>, &str)> = vec![
        ("pack", Box::new(|o| args!["pack", a, "-o", o]), "gguf"),
        ("convert", Box::new(|o| args!["convert", a, "-o", o]), "gguf"),
        ("generate", Box::new(|o| args!["generate", "--adapter", a, "--hidden", h, "-o", o]), "npy"),
        ("run", Box::new(|o| args!["run", "--model", m, "--no-adapter", "--prompt-tokens", "1", "--dump-logits", o]), "npy"),
        ("batch", Box::new(|o| args!["batch", "--model", m, "--requests", r, "--out", o]), "jsonl"),
        ("bench", Box::new(|o| args!["bench", "--model", m, "--adapter", a, "--json", o]), "json"),
        ("quantize", Box::new(|o| args!["quantize", m, "-o", o, "--type", "f16"]), "gguf"),
        ("eval", Box::new(|o| args!["eval", "--model", m, "--adapter", a, "--data", d, "--answers", o]), "jsonl"),
    ];
    for (command, line, ext) in &lines {
        let cases = [
            ("a directory", dir.to_owned(), "directory"),
            ("a missing directory", nodir.join(format!("out.{ext}")), "does not exist"),
            ("a wrong extension", env.path("out.txt"), &*format!(".{ext}")),
        ];
        for (case, out, needle) in cases {
            let t0 = Instant::now();
            let o = iapt(&line(&out));
            assert_eq!(o.status.code(), Some(2), "{command}, {case}: {}", text(&o.stderr));
            assert!(text(&o.stderr).contains(needle), "{command}, {case}: {}", text(&o.stderr));
            assert!(o.stdout.is_empty(), "{command}, {case}: refused before any work, yet printed {}", text(&o.stdout));
            assert!(t0.elapsed() < GENEROUS);
        }
    }
}

#[test]
fn class5_misleading_messages_are_fixed() {
    let env = Env::new();
    let (m, a) = (&env.model, &env.adapter);
    let run = |extra: &[&str]| {
        let mut v = args!["run", "--model", m, "--adapter", a, "--threads", "1"];
        v.extend(extra.iter().map(OsString::from));
        iapt(&v)
    };
    // 10 prompt tokens + 4 soft tokens in a context of 12: the message says 14 are needed.
    let o = run(&["--prompt-tokens", "1,2,3,4,5,6,7,8,9,10", "--ctx-size", "12"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("10 tokens plus 4 soft tokens needs 14 positions (15 with the first generated token)"),
        "{}",
        text(&o.stderr)
    );
    // --n-predict 0 prefills nothing: no absurd prefill speed.
    let o = run(&["--prompt-tokens", "1,2", "--n-predict", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("prefill n/a") && !text(&o.stderr).contains("e9"), "{}", text(&o.stderr));
    // --dump-logits DIR fails before generating anything, with the OS error at most once.
    let o = run(&["--prompt-tokens", "1,2", "--dump-logits", env.dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "nothing generated: {}", text(&o.stdout));
    assert!(text(&o.stderr).contains("directory"), "{}", text(&o.stderr));
    // --threads 0: refused alike by run and generate.
    assert_eq!(run(&["--prompt-tokens", "1", "--threads", "0"]).status.code(), Some(2));
    let o = iapt(&args!["generate", "--adapter", a, "--hidden", env.hidden, "-o", env.path("p.npy"), "--threads", "0"]);
    assert_eq!(o.status.code(), Some(2));
    // An empty adapter name.
    let o = iapt(&args!["batch", "--model", m, "--adapter", format!("={}", a.display()), "--requests", env.requests]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("name before '=' is empty"), "{}", text(&o.stderr));
    // A 3-layer adapter has layers 0 to 2.
    let one = env.path("one.npy");
    let mut f = std::fs::File::create(&one).unwrap();
    iapt_npy::write_f32(&mut f, &[2, 64], &[0.5; 128]).unwrap();
    let o = iapt(&args!["generate", "--adapter", a, "--hidden", one, "-o", env.path("p.npy"), "--layer", "3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("3 layers, 0 to 2"), "{}", text(&o.stderr));
    // Finite hidden states whose scores overflow are not called NaN or infinite.
    let mut f = std::fs::File::create(&one).unwrap();
    iapt_npy::write_f32(&mut f, &[2, 64], &[f32::MAX; 128]).unwrap();
    let o = iapt(&args!["generate", "--adapter", a, "--hidden", one, "-o", env.path("p.npy"), "--layer", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("finite but so large"), "{}", text(&o.stderr));
    // data_offsets [144, 16]: no 18446744073709551488-byte span.
    let adapter = Adapter::open(a).unwrap();
    let mut bytes = adapter.to_bytes(Container::Safetensors).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let first = header.find("\"data_offsets\":[").unwrap() + "\"data_offsets\":[".len();
    let end = first + header[first..].find(']').unwrap();
    let swapped = format!("{:<width$}", "144,16", width = end - first);
    bytes[8 + first..8 + end].copy_from_slice(swapped.as_bytes());
    let bad = env.path("bad-offsets.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let o = iapt(&args!["validate", bad]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stdout).contains("end before they begin") && !text(&o.stdout).contains("18446744073709551"), "{}", text(&o.stdout));
}

/// Copies of an input under other names that are the same file: a hard link, a symbolic link, and
/// the path spelled through `x/..`.
fn aliases(dir: &Path, input: &Path) -> Vec<PathBuf> {
    let name = input.file_name().unwrap().to_str().unwrap();
    let hard = dir.join(format!("hard-{name}"));
    let soft = dir.join(format!("soft-{name}"));
    let _ = std::fs::remove_file(&hard);
    let _ = std::fs::remove_file(&soft);
    std::fs::hard_link(input, &hard).unwrap();
    std::os::unix::fs::symlink(input, &soft).unwrap();
    let x = dir.join("x");
    let _ = std::fs::create_dir(&x);
    vec![input.to_owned(), hard, soft, x.join("..").join(name)]
}

#[test]
fn class1_an_output_that_names_an_input_is_refused_and_the_input_kept() {
    let env = Env::new();
    let dir = env.dir.path();
    // Inputs named with the extension the output needs, so that only identity can refuse them.
    let ck = env.path("ck.safetensors");
    std::fs::copy(&env.adapter, &ck).unwrap();
    let model_npy = env.path("model.npy");
    std::fs::copy(&env.model, &model_npy).unwrap();
    let adapter_json = env.path("adapter.json");
    std::fs::copy(&env.adapter, &adapter_json).unwrap();
    let (m, a, h, r, d) = (&env.model, &env.adapter, &env.hidden, &env.requests, &env.data);
    // (command, the input the output aliases, the command line with OUT)
    type Line<'a> = Box<dyn Fn(&Path) -> Vec<OsString> + 'a>;
    let lines: Vec<(&str, PathBuf, Line<'_>)> = vec![
        ("pack", a.clone(), Box::new(|o| args!["pack", a, "-o", o])),
        ("convert", ck.clone(), Box::new(|o| args!["convert", ck, "-o", o])),
        ("generate", h.clone(), Box::new(|o| args!["generate", "--adapter", a, "--hidden", h, "-o", o])),
        (
            "run",
            model_npy.clone(),
            Box::new(|o| args!["run", "--model", model_npy, "--no-adapter", "--prompt-tokens", "1", "--dump-logits", o]),
        ),
        ("batch", r.clone(), Box::new(|o| args!["batch", "--model", m, "--requests", r, "--out", o])),
        ("bench", adapter_json.clone(), Box::new(|o| args!["bench", "--model", m, "--adapter", adapter_json, "--json", o])),
        ("quantize", m.clone(), Box::new(|o| args!["quantize", m, "-o", o, "--type", "f16"])),
        ("eval", d.clone(), Box::new(|o| args!["eval", "--model", m, "--adapter", a, "--data", d, "--answers", o])),
    ];
    for (command, input, line) in &lines {
        let before = std::fs::read(input).unwrap();
        for out in aliases(dir, input) {
            let o = iapt(&line(&out));
            assert_eq!(o.status.code(), Some(2), "{command} -> {}: {}", out.display(), text(&o.stderr));
            assert!(text(&o.stderr).contains("same file"), "{command} -> {}: {}", out.display(), text(&o.stderr));
            assert_eq!(std::fs::read(input).unwrap(), before, "{command} -> {}: the input changed", out.display());
        }
    }
    // The issue's own examples, where the extension already refuses: the inputs stay as they were.
    let adapter_before = std::fs::read(a).unwrap();
    let model_before = std::fs::read(m).unwrap();
    for line in [
        args!["generate", "--adapter", a, "--hidden", h, "-o", a],
        args!["run", "--model", m, "--no-adapter", "--prompt-tokens", "1", "--dump-logits", m],
    ] {
        assert_eq!(iapt(&line).status.code(), Some(2));
    }
    assert_eq!(std::fs::read(a).unwrap(), adapter_before);
    assert_eq!(std::fs::read(m).unwrap(), model_before);
    // No temporary was left anywhere.
    let leftovers: Vec<_> =
        std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".iapt-tmp-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An adapter with many layers (a long `inspect` table) or many tensors.
fn many_layer_adapter(path: &Path, n_layer: u32) {
    let mut rng = iapt_generator::testing::Rng::new(1);
    let spec = iapt_generator::testing::AdapterSpec::small(n_layer, 4, 2, 2, Activation::Relu);
    iapt_generator::testing::random_adapter(&spec, &mut rng).unwrap().save(path, Container::Safetensors).unwrap();
}

/// Runs `iapt` with its stdout a pipe whose reading end is closed at once.
fn with_closed_stdout(args: &[OsString]) -> Output {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_iapt")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run iapt");
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn class2_a_closed_stdout_ends_quietly() {
    let env = Env::new();
    // Outputs far larger than a pipe's buffer, so that the writes must meet the closed end.
    let big = env.path("big.safetensors");
    many_layer_adapter(&big, 2000);
    let noisy = env.path("noisy.safetensors");
    std::fs::write(&noisy, write_safetensors(&[], &zero_size_tensors(5000))).unwrap();
    let lines = [
        args!["inspect", big],
        args!["inspect", big, "--json"],
        args!["validate", noisy],
        args!["validate", noisy, "--json"],
        args!["run", "--model", env.model, "--adapter", env.adapter, "--prompt-tokens", "1,2", "--n-predict", "8", "--threads", "1"],
    ];
    for line in lines {
        let o = with_closed_stdout(&line);
        let err = text(&o.stderr);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{line:?}: {err}");
        assert_eq!(o.status.code(), Some(0), "{line:?}: {err}");
    }
}

fn zero_size_tensors(n: usize) -> Vec<RawTensorOut> {
    (0..n)
        .map(|i| RawTensorOut { name: format!("t.{i}"), shape: vec![0], ggml_type: 0, st_dtype: "F32".into(), data: Vec::new() })
        .collect()
}

#[test]
fn class3_two_hundred_thousand_tensors_are_refused_quickly_by_every_reader() {
    let env = Env::new();
    let tensors = zero_size_tensors(200_000);
    let st = env.path("many.safetensors");
    std::fs::write(&st, write_safetensors(&[], &tensors)).unwrap();
    let gg = env.path("many.gguf");
    std::fs::write(&gg, write_gguf(&[], &tensors)).unwrap();
    for file in [&st, &gg] {
        for line in [args!["validate", file], args!["inspect", file], args!["pack", file, "-o", env.path("out.gguf")]] {
            let t0 = Instant::now();
            let o = iapt(&line);
            let took = t0.elapsed();
            assert_eq!(o.status.code(), Some(1), "{line:?}: {}", text(&o.stderr));
            let all = text(&o.stdout) + &text(&o.stderr);
            assert!(all.contains("E004") && all.contains(&iapt_format::MAX_TENSORS.to_string()), "{line:?}: {all}");
            assert!(took < GENEROUS, "{line:?} took {took:?}");
        }
    }
    // validate --model reads only a base model's header, with its own (larger) cap.
    let o = iapt(&args!["validate", env.adapter, "--model", gg]);
    assert_ne!(o.status.code(), Some(0));
}

/// A valid 256 MiB adapter of zeros: 2 layers of 4096 x 4096 f32 down and up projections.
fn large_adapter(path: &Path) {
    let spec = iapt_generator::testing::AdapterSpec::small(2, 4096, 4, 4096, Activation::Relu);
    let cfg = spec.config();
    let mut tensors = Vec::new();
    for l in 0..cfg.n_layer {
        for role in Role::ALL.into_iter().filter(|r| r.is_required(&cfg)) {
            let shape = role.expected_shape(&cfg);
            let n = shape.iter().product::<u64>() as usize;
            tensors.push(Tensor::from_bytes(TensorName::layer(l, role), DType::F32, shape, vec![0; 4 * n]).unwrap());
        }
    }
    let a = Adapter::from_parts(cfg, Vec::new(), tensors).unwrap();
    assert!(a.data_bytes() >= 256 << 20);
    a.save(path, Container::Safetensors).unwrap();
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".iapt-tmp-"))
        .map(|e| e.path())
        .collect()
}

#[test]
fn class4_an_interrupted_pack_removes_its_temporary_and_keeps_the_output() {
    let env = Env::new();
    let input = env.path("large.safetensors");
    large_adapter(&input);
    let out_dir = env.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("large.gguf");
    for signal in ["TERM", "INT"] {
        std::fs::write(&out, b"the existing output").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_iapt"))
            .args(args!["pack", input, "-o", out])
            .stderr(Stdio::piped())
            .spawn()
            .expect("run iapt");
        // Wait for the temporary to hold data (pack validates the input first; the empty probe of
        // the output check comes and goes before), then signal.
        let t0 = Instant::now();
        let writing = |dir: &Path| temporaries(dir).iter().any(|t| std::fs::metadata(t).is_ok_and(|m| m.len() > 0));
        while !writing(&out_dir) {
            assert!(child.try_wait().unwrap().is_none(), "pack finished before its temporary was seen");
            assert!(t0.elapsed() < GENEROUS, "no temporary appeared");
            std::thread::sleep(Duration::from_millis(1));
        }
        let kill = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let o = child.wait_with_output().unwrap();
        let want = if signal == "TERM" { 143 } else { 130 };
        assert_eq!(o.status.code(), Some(want), "SIG{signal}: {}", text(&o.stderr));
        assert_eq!(temporaries(&out_dir), Vec::<PathBuf>::new(), "SIG{signal}: the temporary is removed");
        assert_eq!(std::fs::read(&out).unwrap(), b"the existing output", "SIG{signal}: the existing output is untouched");
    }
}

#[test]
fn class4_the_next_write_removes_stale_temporaries_of_ours_and_nothing_else() {
    let env = Env::new();
    let old = SystemTime::now() - iapt_format::temp::STALE_AGE - Duration::from_secs(60);
    // A process id above the kernel's largest (2^22) is never running.
    let dead = 4_194_304 + 99;
    for (command, out_name) in [("pack", "out.gguf"), ("quantize", "q.gguf")] {
        let dir = env.path(&format!("stale-{command}"));
        std::fs::create_dir(&dir).unwrap();
        let make = |name: &str, aged: bool| {
            let p = dir.join(name);
            let f = std::fs::File::create(&p).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
            p
        };
        let stale = make(&format!(".iapt-tmp-{dead}-leftover"), true);
        let fresh = make(&format!(".iapt-tmp-{dead}-fresh"), false);
        let live = make(&format!(".iapt-tmp-{}-live", std::process::id()), true);
        let others = [make("notes.txt", true), make(".iapt-tmp-x-y", true), make("model.iapt-tmp-1-2", true)];
        let out = dir.join(out_name);
        let line = match command {
            "pack" => args!["pack", env.adapter, "-o", out],
            _ => args!["quantize", env.model, "-o", out, "--type", "f16", "--threads", "1"],
        };
        let o = iapt(&line);
        assert_eq!(o.status.code(), Some(0), "{command}: {}", text(&o.stderr));
        assert!(!stale.exists(), "{command}: a stale temporary of a dead process is removed");
        for kept in [fresh, live].iter().chain(&others) {
            assert!(kept.exists(), "{command}: {} must be kept", kept.display());
        }
    }
}

#[test]
fn class6_a_truncated_base_model_is_unreadable() {
    let env = Env::new();
    let whole = std::fs::read(&env.model).unwrap();
    let cut = env.path("cut.gguf");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let o = iapt(&args!["validate", env.adapter, "--model", cut, "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stdout));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e304 = doc["findings"].as_array().unwrap().iter().find(|f| f["code"] == "E304").expect("E304");
    assert!(e304.to_string().contains("truncated"), "{e304}");
    assert_eq!(iapt(&args!["validate", env.adapter, "--model", env.model]).status.code(), Some(0));
    // The commands that load the model agree.
    for line in [env.command("run", "model", &cut), env.command("quantize", "model", &cut)] {
        let o = iapt(&line);
        assert_eq!(o.status.code(), Some(2), "{line:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("truncated"), "{}", text(&o.stderr));
    }
}
