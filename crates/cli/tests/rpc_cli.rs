//! IAPT over llama.cpp's RPC backend, on the loopback: two `iapt rpc-server` workers on ephemeral
//! ports hold the base model's layers, the client runs the generators.
//! - `run --rpc` gives the tokens and (to 1e-5) the logits of the local run, llama and qwen2, with
//!   an adapter and without (F32 model, F32 KV cache, flash attention off);
//! - a worker killed mid-run ends the client with exit code 1 and a message naming the RPC worker,
//!   within a bounded time (no hang, no abort);
//! - an unreachable worker and a malformed `--rpc` are clear errors;
//! - `iapt serve` over workers (issue 27, finding 8): a hung worker (stopped with SIGSTOP: it never
//!   answers, and ggml's RPC client has no timeout) shows on `/health` (503) once a step runs past
//!   `--step-timeout`, and the server exits 1 for its supervisor; a dead worker ends it with exit 1
//!   and a message naming the RPC worker.
//!
//! Every worker is killed when its guard drops, on success and on failure alike.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models")
}

fn iapt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iapt"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn instruction(case: &str) -> String {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    let c = m["cases"].as_array().unwrap().iter().find(|c| c["name"] == case).unwrap();
    c["instruction"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

/// A port that was free a moment ago (bound, then released for the worker).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An `iapt rpc-server` on 127.0.0.1, killed on drop. Its stdout lines (llama.cpp's "Accepted
/// client connection" among them) arrive on `lines`.
struct Worker {
    child: Child,
    port: u16,
    lines: Receiver<String>,
}

impl Worker {
    fn start() -> Worker {
        let port = free_port();
        let mut child = iapt()
            .args(["rpc-server", "--host", "127.0.0.1", "--port", &port.to_string(), "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iapt rpc-server");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Worker { child, port, lines };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(w.child.try_wait().unwrap().is_none(), "rpc-server on port {port} exited before listening");
            assert!(Instant::now() < deadline, "rpc-server on port {port} did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        w.drain();
        w
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Forgets the lines printed so far.
    fn drain(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        while self.lines.try_recv().is_ok() {}
    }

    /// Waits (bounded) for the worker to accept a client connection.
    fn wait_for_client(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("Accepted client connection") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `iapt run` greedy with dumped logits; returns (stdout text, logits rows).
fn run(model: &str, adapter: Option<&str>, case: &str, rpc: Option<&str>) -> (String, Vec<Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.npy");
    let mut cmd = iapt();
    cmd.args(["run", "--model", fixtures().join(model).to_str().unwrap()]);
    match adapter {
        Some(a) => cmd.args(["--adapter", fixtures().join(a).to_str().unwrap()]),
        None => cmd.arg("--no-adapter"),
    };
    cmd.args(["--prompt-tokens", &instruction(case), "--n-predict", "8", "--temp", "0", "--kv-type", "f32", "--flash-attn", "off"]);
    cmd.args(["--threads", "1", "--ctx-size", "256", "--dump-logits", dump.to_str().unwrap()]);
    if let Some(r) = rpc {
        cmd.args(["--rpc", r, "--verbose"]);
    }
    let o = cmd.output().expect("run iapt");
    assert!(o.status.success(), "{case} (rpc {rpc:?}): {}", stderr(&o));
    if rpc.is_some() {
        let err = stderr(&o);
        assert!(err.contains("RPC0") && err.contains("RPC1"), "both workers' devices must be listed: {err}");
    }
    let arr = iapt_npy::read_f32_file(&dump).expect("logits");
    let n_vocab = arr.shape[1];
    (String::from_utf8_lossy(&o.stdout).into_owned(), arr.data.chunks(n_vocab).map(<[f32]>::to_vec).collect())
}

fn max_rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "steps");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let num = x.iter().zip(y).map(|(p, q)| f64::from((p - q).abs())).fold(0.0, f64::max);
            num / y.iter().map(|q| f64::from(q.abs())).fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

#[test]
fn run_over_two_rpc_workers_equals_the_local_run() {
    let (w1, w2) = (Worker::start(), Worker::start());
    let rpc = format!("{},{}", w1.endpoint(), w2.endpoint());
    for (model, adapter, case) in [
        ("llama-tiny-f32.gguf", Some("llama-tiny.iapt.safetensors"), "llama-short-iapt"),
        ("llama-tiny-f32.gguf", None, "llama-short-base"),
        ("qwen2-tiny-f32.gguf", Some("qwen2-tiny.iapt.safetensors"), "qwen2-short-iapt"),
        ("qwen2-tiny-f32.gguf", None, "qwen2-short-base"),
    ] {
        let (text_local, local) = run(model, adapter, case, None);
        let (text_rpc, remote) = run(model, adapter, case, Some(&rpc));
        assert_eq!(text_rpc, text_local, "{case}: tokens over RPC differ from the local run");
        let err = max_rel_err(&remote, &local);
        assert!(err <= 1e-5, "{case}: logits over RPC differ from the local run by {err:e}");
        eprintln!("{case}: identical tokens, max rel err {err:.1e} over RPC");
    }
}

#[test]
fn a_worker_killed_mid_run_ends_the_client_with_exit_1() {
    let (mut w1, w2) = (Worker::start(), Worker::start());
    let rpc = format!("{},{}", w1.endpoint(), w2.endpoint());
    // Far more work than the test waits for: the client is mid-run when the worker dies.
    let mut client = iapt()
        .args(["bench", "--model", fixtures().join("llama-tiny-f32.gguf").to_str().unwrap()])
        .args(["--adapter", fixtures().join("llama-tiny.iapt.safetensors").to_str().unwrap()])
        .args(["--prompt-len", "64", "--gen", "128", "--reps", "100000", "--threads", "1", "--ctx-size", "256", "--rpc", &rpc])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client");
    assert!(w1.wait_for_client(Duration::from_secs(60)), "the client never connected to the worker");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = w1.child.kill();
    let _ = w1.child.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = client.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            let _ = client.wait();
            panic!("the client hung for 60 s after its worker died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "exit status {status:?}: {err}");
    assert!(err.contains("RPC"), "the message must name the RPC worker: {err}");
    drop(w2);
}

/// Waits (bounded) for `child` to exit; its status.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `iapt serve --port 0` over the workers `rpc`; the child and its address.
fn serve_over(rpc: &str, extra: &[&str]) -> (Child, String) {
    let mut child = iapt()
        .args(["serve", "--port", "0", "--model", fixtures().join("llama-tiny-f32.gguf").to_str().unwrap(), "--threads", "1"])
        .args(["--ctx-size", "512", "--rpc", rpc])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start iapt serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("{line}")).to_owned();
    (child, addr)
}

/// A one-shot HTTP request on `addr`; the status (0 when the connection failed).
fn http(addr: &str, request: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut c) = TcpStream::connect(addr) else { return 0 };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if c.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn serve_reports_a_hung_worker_and_exits_1() {
    let w = Worker::start();
    let (mut server, addr) = serve_over(&w.endpoint(), &["--step-timeout", "2"]);
    let health = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    assert_eq!(http(&addr, &health), 200);
    // The worker stops answering; a request's first step then never ends.
    assert!(Command::new("kill").args(["-STOP", &w.child.id().to_string()]).status().unwrap().success());
    let a = addr.clone();
    let req = std::thread::spawn(move || {
        let body = r#"{"model": "llama-tiny-f32", "prompt": [1, 2, 3], "max_tokens": 4}"#;
        http(&a, &format!("POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()))
    });
    let t0 = Instant::now();
    let mut saw_503 = false;
    while t0.elapsed() < Duration::from_secs(10) && server.try_wait().unwrap().is_none() {
        saw_503 |= http(&addr, &health) == 503;
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = wait_exit(&mut server, Duration::from_secs(30));
    let _ = Command::new("kill").args(["-CONT", &w.child.id().to_string()]).status();
    let mut err = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("step-timeout") && err.contains("RPC worker"), "{err}");
    assert!(saw_503, "/health reported the hung engine (503) before the exit");
    let _ = req.join();
    drop(w);
}

#[test]
fn serve_exits_1_naming_a_dead_worker() {
    let mut w = Worker::start();
    let (mut server, addr) = serve_over(&w.endpoint(), &[]);
    let _ = w.child.kill();
    let _ = w.child.wait();
    let body = r#"{"model": "llama-tiny-f32", "prompt": [1, 2, 3], "max_tokens": 4}"#;
    let _ = http(&addr, &format!("POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    let status = wait_exit(&mut server, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("RPC"), "the message names the RPC worker: {err}");
}

#[test]
fn an_unreachable_worker_and_a_malformed_list_are_clear_errors() {
    let model = fixtures().join("llama-tiny-f32.gguf");
    let dead = format!("127.0.0.1:{}", free_port());
    let o = iapt()
        .args(["run", "--model", model.to_str().unwrap(), "--no-adapter", "--prompt-tokens", "1,2", "--rpc", &dead])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach the RPC worker at") && stderr(&o).contains(&dead), "{}", stderr(&o));
    let o = iapt()
        .args(["run", "--model", model.to_str().unwrap(), "--no-adapter", "--prompt-tokens", "1,2", "--rpc", "nohost"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("expected HOST:PORT"), "{}", stderr(&o));
}

#[test]
fn rpc_server_warns_when_asked_to_listen_beyond_the_loopback() {
    // 192.0.2.1 (TEST-NET-1) is not the loopback and not an address of this machine: the worker must
    // warn, then fail to bind and exit 1, so nothing is ever exposed by this test.
    let o = iapt().args(["rpc-server", "--host", "192.0.2.1", "--port", &free_port().to_string(), "--threads", "1"]).output().unwrap();
    let err = stderr(&o);
    assert!(err.contains("warning") && err.contains("no authentication"), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
}
