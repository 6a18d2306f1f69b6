//! An OpenAI-compatible HTTP server for IAPT adapters, on the multi-tenant engine
//! (`iapt-engine`): any OpenAI client (the `openai` Python package, curl, LangChain) runs IAPT
//! adapters with no code of ours. As in vLLM, a request's `model` picks the adapter: the base
//! model's id runs it alone, an adapter's name runs it with that adapter, anything else is 404
//! `model_not_found`.
//!
//! Routes: `GET /health` (open; 200 when ready, 503 while loading), `GET /v1/models` (the base and
//! every adapter, with `"parent"` = the base id), `POST /v1/completions`, `POST /v1/chat/completions`
//! (the GGUF's chat template, see the `chat` module), streaming as server-sent events ending in
//! `data: [DONE]`, `POST /v1/adapters` and `DELETE /v1/adapters/{name}` (only with an adapter
//! directory, confined to it), `GET /metrics` (Prometheus text). With an API key every route but
//! `/health` needs `Authorization: Bearer KEY` (compared in constant time).
//!
//! Threads: the engine owns the model on its own thread ([`iapt_engine::EngineHandle`]); handlers
//! reach it from tokio's blocking pool and get events over unbounded channels, so the engine never
//! waits on a socket and a slow client only slows itself. A client that disconnects drops its
//! receiver, which cancels its sequence and frees its KV cells at the next step.
//!
//! Bad input is a 4xx with OpenAI's error object naming the field; a full queue is 503 with
//! `Retry-After`; bodies are capped ([`ServerConfig::body_limit`]).
//!
//! ```no_run
//! use iapt_server::{serve, ServerConfig};
//! let engine = iapt_engine::EngineSpec {
//!     model: "base.gguf".into(),
//!     model_params: Default::default(),
//!     config: Default::default(),
//!     adapters: vec![("sorter".to_owned(), "sorter.iapt.gguf".into())],
//! };
//! let config = ServerConfig::new(engine, "base");
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(serve(config, async { let _ = tokio::signal::ctrl_c().await; }, |r| println!("listening on {}", r.addr)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod adapters;
mod api;
mod chat;
mod completions;
mod conn;
mod error;
mod generate;
mod metrics;
mod ondemand;
mod respond;
mod routes;
mod state;
mod tokens;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iapt_engine::{ChatTemplate, EngineHandle, EngineSpec};

pub use api::{MAX_STOP, MAX_STOP_BYTES};
pub use completions::DEFAULT_MAX_TOKENS;
pub use conn::Limits;
pub use error::{ApiError, ServerError, RETRY_AFTER_S};
pub use metrics::Metrics;

use state::{AppState, Ready};

/// The default cap on request bodies: 1 MiB (a full context of token ids is far less).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// The default grace period after SIGINT/SIGTERM for in-flight requests to finish.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The default cap on connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The default time a client has to send a request's head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time a request body may take to arrive.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The default longest engine step: far beyond one decode of `--batch-tokens` rows of a large model
/// on a slow CPU.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a server whose engine failed keeps answering (`/health` 503) before it stops.
const FAILED_DRAIN: Duration = Duration::from_secs(1);

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Host or address to bind (default `127.0.0.1`).
    pub host: String,
    /// Port (0: any free one; the bound address is in [`ReadyInfo`]).
    pub port: u16,
    /// The engine: base model, settings, adapters loaded at start.
    pub engine: EngineSpec,
    /// The base model's id in `model` fields.
    pub model_id: String,
    /// Require `Authorization: Bearer KEY` on the inference routes (the admin key works there too).
    pub api_key: Option<String>,
    /// The key of the admin routes (adapters, metrics). With an API key and no admin key they are off.
    pub admin_key: Option<String>,
    /// `Host` names a server without keys answers besides the loopback names and the bound host.
    pub allowed_hosts: Vec<String>,
    /// Connections at once and the time a request's head may take.
    pub limits: Limits,
    /// The time a request body may take to arrive (408 after it).
    pub body_timeout: Duration,
    /// The longest one engine step (one decode) may take before the server reports the engine as
    /// hung (`/health` 503) and stops, for a supervisor to restart it: a hung RPC worker never
    /// answers, and ggml's RPC client has no timeout.
    pub step_timeout: Duration,
    /// Allow run-time adapter loading, confined to this directory: by `POST /v1/adapters`, and by
    /// name on a request's first use (the engine's [`iapt_engine::AdapterCache`] bounds how many
    /// stay resident).
    pub adapter_dir: Option<PathBuf>,
    /// Adapters pinned at start (never evicted): resident ones, or ones of the adapter directory,
    /// loaded then.
    pub pins: Vec<String>,
    /// The chat template of `/v1/chat/completions`: a llama.cpp built-in name or a Jinja file
    /// (`None`: the model's own; a model without one answers chat requests with 400).
    pub chat_template: Option<String>,
    /// Request bodies larger than this are refused with 413.
    pub body_limit: usize,
    /// After the shutdown signal: how long in-flight requests may take to finish.
    pub grace: Duration,
}

impl ServerConfig {
    /// Defaults around `engine`, the base model called `model_id`.
    pub fn new(engine: EngineSpec, model_id: impl Into<String>) -> ServerConfig {
        ServerConfig {
            host: "127.0.0.1".to_owned(),
            port: 8080,
            engine,
            model_id: model_id.into(),
            api_key: None,
            admin_key: None,
            allowed_hosts: Vec::new(),
            limits: Limits { max_connections: DEFAULT_MAX_CONNECTIONS, header_timeout: DEFAULT_HEADER_TIMEOUT },
            body_timeout: DEFAULT_BODY_TIMEOUT,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            adapter_dir: None,
            pins: Vec::new(),
            chat_template: None,
            body_limit: DEFAULT_BODY_LIMIT,
            grace: DEFAULT_GRACE,
        }
    }
}

/// What [`serve`] reports once the model is loaded.
#[derive(Debug, Clone)]
pub struct ReadyInfo {
    /// The bound address.
    pub addr: SocketAddr,
    /// The base model's id.
    pub model_id: String,
    /// The resident adapters.
    pub adapters: Vec<String>,
    /// The chat template's origin, or why chat requests are refused.
    pub chat: Result<String, String>,
}

/// Binds, loads the engine (answering `/health` with 503 meanwhile), calls `on_ready`, and
/// serves until `shutdown` completes; then stops accepting and gives in-flight requests
/// [`ServerConfig::grace`] to finish before returning (the rest are cancelled when the runtime drops them).
pub async fn serve(config: ServerConfig, shutdown: impl Future<Output = ()>, on_ready: impl FnOnce(&ReadyInfo)) -> Result<(), ServerError> {
    if config.engine.adapters.iter().any(|(n, _)| *n == config.model_id) {
        return Err(ServerError::Config(format!(
            "an adapter is named {:?}, the base model's id; rename it or use --alias",
            config.model_id
        )));
    }
    let adapter_dir = match &config.adapter_dir {
        Some(d) => Some(d.canonicalize().map_err(|e| ServerError::Config(format!("--adapter-dir {}: {e}", d.display())))?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|source| ServerError::Bind { addr: format!("{}:{}", config.host, config.port), source })?;
    let addr = listener.local_addr()?;
    let keys =
        state::Keys { api: config.api_key.as_deref().map(routes::key_hash), admin: config.admin_key.as_deref().map(routes::key_hash) };
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|h| (*h).to_owned()).collect();
    if !matches!(config.host.as_str(), "0.0.0.0" | "::" | "[::]") {
        hosts.push(config.host.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase());
    }
    hosts.extend(config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
    let state = Arc::new(AppState::new(config.model_id.clone(), keys, hosts, adapter_dir));
    let app = routes::router(state.clone(), config.body_limit, config.body_timeout);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(conn::serve(listener, app, config.limits, stop_rx));
    let mut shutdown = std::pin::pin!(shutdown);
    let loaded = tokio::select! {
        r = load(config.engine, config.chat_template) => r,
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            return Ok(());
        }
    };
    let ready = match loaded {
        Ok(r) => r,
        Err(e) => {
            let _ = stop_tx.send(true);
            return Err(e);
        }
    };
    for name in &config.pins {
        if let Err(e) = ondemand::pin(&state, &ready, name).await {
            let _ = stop_tx.send(true);
            return Err(ServerError::Config(format!("--pin {name}: {}", e.message)));
        }
    }
    let adapters = ready.adapter_names();
    let chat = ready.chat.as_ref().map(|t| t.origin().to_owned()).map_err(Clone::clone);
    let watched = ready.clone();
    let _ = state.ready.set(ready);
    on_ready(&ReadyInfo { addr, model_id: config.model_id, adapters, chat });
    // Until the shutdown signal, or until the engine stops on its own (a panic: its requests have
    // failed and /health says so); then the server stops and reports it, for a supervisor to restart it.
    let failed = tokio::select! {
        () = &mut shutdown => None,
        why = engine_failure(&watched, config.step_timeout) => Some(why),
    };
    if failed.is_some() {
        // Keep answering for a moment: /health says 503 and why, new requests get 503, so a load
        // balancer polling /health sees the failure before the port closes.
        tokio::time::sleep(FAILED_DRAIN).await;
    }
    let _ = stop_tx.send(true);
    if let Some(why) = failed {
        let _ = tokio::time::timeout(config.grace, server).await;
        return Err(ServerError::EngineFailed(why));
    }
    match tokio::time::timeout(config.grace, server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(ServerError::Io(std::io::Error::other(e))),
        Err(_) => {} // Grace period over: the caller drops the runtime, which cancels what is left.
    }
    Ok(())
}

/// Resolves once the engine thread has stopped on its own, or has been in one step longer than
/// `step_timeout`, with why (checked every 100 ms).
async fn engine_failure(ready: &Ready, step_timeout: Duration) -> String {
    loop {
        if let Some(why) = ready.engine.failure() {
            return why;
        }
        if let Some(t) = ready.engine.step_running_for().filter(|t| *t > step_timeout) {
            let why = format!(
                "one engine step has run for {:.0} s (--step-timeout {:.0} s): a backend hangs (an RPC worker that stopped answering?)",
                t.as_secs_f64(),
                step_timeout.as_secs_f64()
            );
            ready.hung.set(why.clone()).ok();
            return why;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the engine thread and reads what the HTTP side needs (on the blocking pool).
async fn load(spec: EngineSpec, chat_template: Option<String>) -> Result<Arc<Ready>, ServerError> {
    let seq_ctx = spec.config.seq_ctx;
    let joined = tokio::task::spawn_blocking(move || -> Result<Ready, ServerError> {
        let engine = EngineHandle::spawn(spec)?;
        let vocab = engine.with_model(|m| (0..m.n_vocab()).map(|t| m.token_bytes(t as i32)).collect())?;
        let adapters = engine.adapters()?.into_iter().map(|a| (a.name, a.n_soft_tokens)).collect::<BTreeMap<_, _>>();
        // A template given on the command line must work; the model's own may be missing or
        // unreadable, and then only chat requests are refused (with why).
        let given = chat_template.is_some();
        let chat = match engine.with_model(move |m| ChatTemplate::resolve(chat_template.as_deref(), m))? {
            Ok(t) => Ok(Arc::new(t)),
            Err(e) if given => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        };
        Ok(Ready { engine, vocab, seq_ctx, adapters: RwLock::new(adapters), hung: std::sync::OnceLock::new(), chat })
    })
    .await;
    match joined {
        Ok(r) => r.map(Arc::new),
        Err(e) => Err(ServerError::Io(std::io::Error::other(e))),
    }
}
