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
mod error;
mod generate;
mod metrics;
mod respond;
mod routes;
mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iapt_engine::{EngineHandle, EngineSpec};

pub use api::MAX_STOP;
pub use completions::DEFAULT_MAX_TOKENS;
pub use error::{ApiError, ServerError, RETRY_AFTER_S};
pub use metrics::Metrics;

use state::{AppState, Ready};

/// The default cap on request bodies: 1 MiB (a full context of token ids is far less).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// The default grace period after SIGINT/SIGTERM for in-flight requests to finish.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

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
    /// Require `Authorization: Bearer KEY` on every route but `/health`.
    pub api_key: Option<String>,
    /// Allow run-time adapter loading, confined to this directory.
    pub adapter_dir: Option<PathBuf>,
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
            adapter_dir: None,
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
    let state = Arc::new(AppState::new(config.model_id.clone(), config.api_key.as_deref().map(routes::key_hash), adapter_dir));
    let app = routes::router(state.clone(), config.body_limit);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let loaded = tokio::select! {
        r = load(config.engine) => r,
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
    let adapters = ready.adapter_names();
    let _ = state.ready.set(ready);
    on_ready(&ReadyInfo { addr, model_id: config.model_id, adapters });
    shutdown.await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(config.grace, server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(ServerError::Io(std::io::Error::other(e))),
        Err(_) => {} // Grace period over: the caller drops the runtime, which cancels what is left.
    }
    Ok(())
}

/// Starts the engine thread and reads what the HTTP side needs (on the blocking pool).
async fn load(spec: EngineSpec) -> Result<Arc<Ready>, ServerError> {
    let seq_ctx = spec.config.seq_ctx;
    let joined = tokio::task::spawn_blocking(move || -> Result<Ready, ServerError> {
        let engine = EngineHandle::spawn(spec)?;
        let vocab = engine.with_model(|m| (0..m.n_vocab()).map(|t| m.token_bytes(t as i32)).collect())?;
        let adapters = engine.adapters()?.into_iter().map(|a| (a.name, a.n_soft_tokens)).collect::<BTreeMap<_, _>>();
        Ok(Ready { engine, vocab, seq_ctx, adapters: RwLock::new(adapters) })
    })
    .await;
    match joined {
        Ok(r) => r.map(Arc::new),
        Err(e) => Err(ServerError::Io(std::io::Error::other(e))),
    }
}
