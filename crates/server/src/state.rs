//! What every handler shares: the server's settings, its metrics and, once the model is loaded,
//! the engine ([`Ready`]). Handlers never block a runtime thread: every call into the engine goes
//! through [`blocking`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use iapt_engine::{ChatTemplate, EngineHandle};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// The engine and what the HTTP side needs to know about the model.
pub(crate) struct Ready {
    pub engine: EngineHandle,
    /// Every token's bytes (for log-probability token strings), fetched once at start.
    pub vocab: Vec<Vec<u8>>,
    /// Tokens one sequence may hold (prompt + soft tokens + generated).
    pub seq_ctx: usize,
    /// The resident adapters and their soft-token counts, kept in step with the engine: only this
    /// server loads and unloads them.
    pub adapters: RwLock<BTreeMap<String, usize>>,
    /// Set when the engine's step ran past the step timeout (the server then stops).
    pub hung: OnceLock<String>,
    /// The chat template (`--chat-template`, else the model's), or why chat requests are refused.
    pub chat: Result<Arc<ChatTemplate>, String>,
}

impl Ready {
    /// The adapter names, comma-separated, for messages.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.read().map(|a| a.keys().cloned().collect()).unwrap_or_default()
    }

    /// Soft tokens of `adapter` (0 for the base model).
    pub fn n_soft(&self, adapter: Option<&str>) -> usize {
        adapter.and_then(|a| self.adapters.read().ok()?.get(a).copied()).unwrap_or(0)
    }

    /// Why the engine can take no more work (it panicked, or one step ran past the step timeout).
    pub fn failure(&self) -> Option<String> {
        self.engine.failure().or_else(|| self.hung.get().cloned())
    }

    /// A token's text (lossy UTF-8).
    pub fn piece(&self, token: i32) -> String {
        usize::try_from(token).ok().and_then(|t| self.vocab.get(t)).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
    }
}

/// The hashes of the keys a server requires.
pub(crate) struct Keys {
    pub api: Option<[u8; 32]>,
    pub admin: Option<[u8; 32]>,
}

/// The state behind every route.
pub(crate) struct AppState {
    /// The base model's id (`--alias` or the file stem).
    pub model_id: String,
    /// SHA-256 of the API key, when one is required.
    pub api_key_hash: Option<[u8; 32]>,
    /// SHA-256 of the admin key, when one is set.
    pub admin_key_hash: Option<[u8; 32]>,
    /// The `Host` names a server without keys answers (lowercase, no port).
    pub allowed_hosts: Vec<String>,
    /// Serializes adapter loads and unloads, so the engine and `Ready::adapters` change together.
    pub admin: tokio::sync::Mutex<()>,
    /// The canonical adapter directory, when run-time loading is on.
    pub adapter_dir: Option<PathBuf>,
    pub metrics: Metrics,
    pub ready: OnceLock<Arc<Ready>>,
    /// Adapters loaded on demand from `adapter_dir`.
    pub ondemand: crate::ondemand::OnDemand,
    /// Unix time the server started (`created` of every model).
    pub created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(model_id: String, keys: Keys, allowed_hosts: Vec<String>, adapter_dir: Option<PathBuf>) -> AppState {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        AppState {
            model_id,
            api_key_hash: keys.api,
            admin_key_hash: keys.admin,
            allowed_hosts,
            admin: tokio::sync::Mutex::new(()),
            adapter_dir,
            metrics: Metrics::new(),
            ready: OnceLock::new(),
            ondemand: Default::default(),
            created,
            next_id: AtomicU64::new(0),
        }
    }

    /// The engine, or 503 while the model loads.
    pub fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        let ready = self.ready.get().cloned().ok_or_else(|| ApiError::unavailable("the model is loading; retry shortly"))?;
        match ready.failure() {
            Some(why) => Err(ApiError::unavailable(format!("the engine has stopped and the server is exiting: {why}"))),
            None => Ok(ready),
        }
    }

    /// The adapter `model` selects among those resident: `None` for the base id, the adapter's
    /// name for a resident adapter, else 404 `model_not_found` (requests use
    /// [`crate::ondemand::ensure`], which also loads from the adapter directory).
    pub fn resolve(&self, ready: &Ready, model: &str) -> Result<Option<String>, ApiError> {
        if model == self.model_id {
            return Ok(None);
        }
        if ready.adapters.read().is_ok_and(|a| a.contains_key(model)) {
            return Ok(Some(model.to_owned()));
        }
        Err(ApiError::model_not_found(model))
    }

    /// A fresh response id number.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Answers `e`, counting it by status.
    pub fn error(&self, e: ApiError) -> Response {
        self.metrics.http_errors.with_label_values(&[e.status.as_str()]).inc();
        e.into_response()
    }
}

/// Runs `f` on tokio's blocking pool (engine calls wait for a step boundary; a runtime thread must not).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}")))
}
