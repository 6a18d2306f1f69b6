//! Shared by the `iapt serve` tests: a server child process on an ephemeral loopback port that is
//! always stopped (killed on drop), a plain blocking HTTP client with bounded waits, `iapt run`
//! for the expected outputs, and the fixtures.
#![allow(dead_code)] // Each test binary uses a different part.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest wait for the server to be ready, or for one HTTP answer.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo().join("converters/python/fixtures/models")
}

pub fn iapt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_iapt")
}

/// Exact mode for the tiny F32 fixtures.
pub const EXACT: [&str; 6] = ["--kv-type", "f32", "--flash-attn", "off", "--threads", "1"];

/// A manifest case's instruction token ids.
pub fn instruction(name: &str) -> Vec<i64> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    let c = m["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    c["instruction"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

/// A running `iapt serve`; killed on drop if not stopped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The ready line.
    pub ready_line: String,
    stderr: tempfile::NamedTempFile,
}

impl Server {
    /// Starts `iapt serve --port 0 ARGS` and waits (bounded) for its ready line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// As [`Server::start`], with environment variables set for the server.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(iapt_bin())
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("start iapt serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {} // Keep the pipe drained.
        });
        let mut server = Server { child: Some(child), base: String::new(), ready_line: String::new(), stderr };
        let line = rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no ready line; stderr: {}", server.stderr_text()));
        let at = line.find("http://").unwrap_or_else(|| panic!("no address in {line:?}"));
        server.base = line[at..].split_whitespace().next().unwrap().to_owned();
        server.ready_line = line;
        server
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The exit status: at once if the process has exited on its own, else after SIGTERM.
    pub fn stop_or_wait(mut self) -> ExitStatus {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            self.child.take();
            return st;
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child.take();
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop()
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let t0 = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> Resp {
        send(agent().get(&self.url(path)).call())
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        send(agent().post(&self.url(path)).header("content-type", "application/json").send(body))
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Resp {
        self.post(path, &body.to_string())
    }

    /// POSTs a streaming request and returns the open response's body reader.
    pub fn open_stream(&self, path: &str, body: &serde_json::Value) -> SseReader {
        let r = agent().post(&self.url(path)).header("content-type", "application/json").send(body.to_string()).expect("stream request");
        assert_eq!(r.status().as_u16(), 200);
        SseReader { lines: BufReader::new(Box::new(r.into_body().into_reader())) }
    }

    /// A text metric's value (the sum over lines that start with `prefix`), 0 when absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// Waits (bounded) until `cond` holds.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut(&Server) -> bool) {
        let t0 = Instant::now();
        while !cond(self) {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI error object with `status`, naming `param`.
    pub fn assert_error(&self, status: u16, param: Option<&str>) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.body);
        let e = self.json()["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.body);
        assert!(e["type"].is_string(), "{}", self.body);
        assert_eq!(e["param"].as_str(), param, "{}", self.body);
        e
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into()
}

fn send(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
    let mut r = r.expect("HTTP request");
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = String::new();
    r.body_mut().as_reader().read_to_string(&mut body).expect("read body");
    Resp { status: r.status().as_u16(), retry_after, body }
}

/// Reads server-sent events.
pub struct SseReader {
    lines: BufReader<Box<dyn Read>>,
}

impl SseReader {
    /// The next `data:` payload, or `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line).expect("read SSE") == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_owned());
            }
        }
    }

    /// Every remaining chunk, parsed, until `[DONE]` (which must come).
    pub fn chunks(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let d = self.next_data().expect("the stream ended without data: [DONE]");
            if d == "[DONE]" {
                assert!(self.next_data().is_none(), "nothing follows [DONE]");
                return out;
            }
            out.push(serde_json::from_str(&d).unwrap());
        }
    }
}

/// Concatenated `choices[0].text` (completions) or `choices[0].delta.content` (chat) of chunks.
pub fn stream_text(chunks: &[serde_json::Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            let ch = c["choices"].get(0)?;
            ch["text"].as_str().or_else(|| ch["delta"]["content"].as_str()).map(str::to_owned)
        })
        .collect()
}

/// `iapt run`, greedy, alone: the generated text (lossy UTF-8, trailing newline removed).
/// `prompt` is text, or token ids when `ids` is set; `--chat` with `chat`.
pub fn run_alone(model: &Path, adapter: Option<&Path>, prompt: &str, ids: bool, chat: bool, n: usize, extra: &[&str]) -> String {
    let n = n.to_string();
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--temp", "0", "--n-predict", &n, "--ctx-size", "512"];
    args.extend([if ids { "--prompt-tokens" } else { "--prompt" }, prompt]);
    if chat {
        args.push("--chat");
    }
    match adapter {
        Some(a) => args.extend(["--adapter", a.to_str().unwrap()]),
        None => args.push("--no-adapter"),
    }
    args.extend(extra);
    let o = Command::new(iapt_bin()).args(&args).output().expect("run iapt");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.strip_suffix('\n').unwrap_or(&s).to_owned()
}
