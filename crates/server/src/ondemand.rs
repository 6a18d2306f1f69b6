//! Adapters on demand: with `--adapter-dir DIR`, a request whose `model` names an adapter file in
//! DIR that is not resident loads it first (vLLM and LoRAX fetch adapters on first use the same
//! way); the engine keeps a bounded resident set and evicts the least recently used adapter that
//! no prefill uses ([`iapt_engine::AdapterCache`]).
//!
//! - **Names.** `model` = `NAME` serves `DIR/NAME.iapt.gguf`, `DIR/NAME.iapt.safetensors`,
//!   `DIR/NAME.gguf` or `DIR/NAME.safetensors`; a name that matches two files is a 409 (which one
//!   is meant is not guessed), a name outside `A-Za-z0-9._-` or starting with `.` is a 404 like any
//!   unknown model. Files are opened with [`crate::adapters::open_confined`] (no links, no `..`,
//!   regular files only).
//! - **Once.** Concurrent first requests for one adapter load it once: each name has its own lock,
//!   and whoever gets it second finds the adapter resident.
//! - **Off the engine's thread.** Reading, validating and building the generator run on the
//!   blocking pool; the engine only takes the ready generator between two steps.
//! - **Never mixed.** Each request checks the file's identity (device, inode, size, modification
//!   time); a changed file is read again and, if its SHA-256 differs, replaces the resident adapter.
//!   Requests already running keep the generator they started with.
//! - **Full.** When the cap is reached and every resident adapter is pinned or in a prefill, the
//!   request is refused with 503 and `Retry-After` (never queued without bound).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use iapt_engine::{EngineError, InsertOptions, Inserted};
use iapt_format::fingerprint::{sha256_file as sha256, FileStamp as Stamp};

use crate::adapters::{open_confined, MAX_ADAPTER_BYTES};
use crate::error::ApiError;
use crate::generate::{Job, Started};
use crate::state::{blocking, AppState, Ready};

/// File names that serve `model` = NAME, in this order.
const SUFFIXES: [&str; 4] = [".iapt.gguf", ".iapt.safetensors", ".gguf", ".safetensors"];

/// The largest number of files `GET /v1/models` lists from the directory.
pub(crate) const MAX_LISTED: usize = 10_000;

/// The on-demand state shared by the handlers.
pub(crate) struct OnDemand {
    /// One lock per adapter name being loaded (entries are dropped when idle).
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The stamp and SHA-256 of each resident on-demand adapter's file.
    files: Mutex<HashMap<String, (Stamp, [u8; 32])>>,
    /// Loads running at once ([`LOADS_AT_ONCE`]): each holds a generator beyond the resident
    /// set's cap until it is inserted, and they compete with decoding for the CPU.
    loads: tokio::sync::Semaphore,
}

/// Adapter loads that run at once; more wait.
const LOADS_AT_ONCE: usize = 2;

impl Default for OnDemand {
    fn default() -> Self {
        OnDemand { loading: Mutex::default(), files: Mutex::default(), loads: tokio::sync::Semaphore::new(LOADS_AT_ONCE) }
    }
}

impl OnDemand {
    /// Forgets evicted or unloaded adapters.
    pub(crate) fn forget(&self, names: &[String]) {
        if let Ok(mut f) = self.files.lock() {
            for n in names {
                f.remove(n);
            }
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|_, m| Arc::strong_count(m) > 1);
        l.entry(name.to_owned()).or_default().clone()
    }
}

/// Whether `name` may name a file (no path, no hidden file).
fn plausible(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The adapter name a file in the directory serves, if any.
pub(crate) fn name_of(file: &str) -> Option<&str> {
    SUFFIXES.iter().find_map(|s| file.strip_suffix(s)).filter(|n| plausible(n))
}

/// Opens the one file that serves `name` in `dir`: `None` when there is none, 409 when two do.
fn open_for(dir: &Path, name: &str) -> Result<Option<(std::fs::File, String)>, ApiError> {
    if !plausible(name) {
        return Ok(None);
    }
    let mut found: Vec<(std::fs::File, String)> =
        SUFFIXES.iter().map(|s| format!("{name}{s}")).filter_map(|f| open_confined(dir, &f).ok().map(|h| (h, f))).collect();
    if found.len() > 1 {
        let files = found.iter().map(|(_, f)| f.as_str()).collect::<Vec<_>>().join(", ");
        return Err(ApiError::status(StatusCode::CONFLICT, format!("model {name:?} matches several adapter files ({files}); keep one"))
            .with_param("model"));
    }
    Ok(found.pop())
}

/// The adapter `model` selects, loading it from the adapter directory first when it is not
/// resident (or its file changed): `None` for the base model's id, else the adapter's name; 404
/// `model_not_found` when neither resident nor a file.
pub(crate) async fn ensure(st: &Arc<AppState>, ready: &Arc<Ready>, model: &str) -> Result<Option<String>, ApiError> {
    if model == st.model_id {
        return Ok(None);
    }
    let resident = ready.adapters.read().is_ok_and(|a| a.contains_key(model));
    let Some(dir) = st.adapter_dir.clone() else {
        return if resident { Ok(Some(model.to_owned())) } else { Err(ApiError::model_not_found(model)) };
    };
    let tracked = st.ondemand.files.lock().ok().and_then(|f| f.get(model).cloned());
    if resident && tracked.is_none() {
        return Ok(Some(model.to_owned())); // Loaded at start or by POST: not a file this tracks.
    }
    if let (true, Some((stamp, _))) = (resident, &tracked) {
        // The common case, without waiting for anyone: resident, and its file unchanged.
        let (d, n, stamp) = (dir.clone(), model.to_owned(), *stamp);
        if blocking(move || current_stamp(&d, &n).is_some_and(|s| s == stamp)).await? {
            return Ok(Some(model.to_owned()));
        }
    }
    let lock = st.ondemand.lock_for(model);
    let _one = lock.lock().await;
    // Whoever held the lock before may have loaded it.
    let resident = ready.adapters.read().is_ok_and(|a| a.contains_key(model));
    let tracked = st.ondemand.files.lock().ok().and_then(|f| f.get(model).cloned());
    let (st2, ready2, name) = (st.clone(), ready.clone(), model.to_owned());
    let _slot = st.ondemand.loads.acquire().await.map_err(|_| ApiError::unavailable("the server is stopping"))?;
    let loaded = blocking(move || load(&st2, &ready2, &dir, &name, resident, tracked, false)).await??;
    match loaded {
        Some(Loaded { inserted, seconds }) => record(st, ready, model, &inserted, seconds),
        None if resident => {}
        None => return Err(ApiError::model_not_found(model)),
    }
    Ok(Some(model.to_owned()))
}

/// Attempts of [`start`] to submit a job whose adapter another load keeps evicting.
const SUBMIT_ATTEMPTS: usize = 4;

/// Submits `job` as prompt `index` of `started` ([`Started::submit`]). Its adapter may have been
/// evicted between [`ensure`] and the submission (another request's load made room, and the
/// server's list may not say so yet): then the list forgets it, it is made resident again and the
/// job submitted again.
pub(crate) async fn start(st: &Arc<AppState>, ready: &Arc<Ready>, started: &mut Started, job: Job, index: usize) -> Result<(), ApiError> {
    let mut attempt = 1;
    loop {
        match started.submit(ready, &st.metrics, job.clone(), index).await {
            Err(e) if e.code == Some("model_not_found") && st.adapter_dir.is_some() && job.adapter.is_some() => {
                if attempt == SUBMIT_ATTEMPTS {
                    return Err(ApiError::unavailable(format!(
                        "adapter {:?} was evicted {attempt} times before its request could start; the resident set is too small for the load",
                        job.model
                    ))
                    .with_param("model")
                    .with_code("adapter_cache_full"));
                }
                attempt += 1;
                if let Ok(mut a) = ready.adapters.write() {
                    a.remove(&job.model);
                }
                st.ondemand.forget(std::slice::from_ref(&job.model));
                ensure(st, ready, &job.model).await?;
            }
            r => return r,
        }
    }
}

/// Pins `name` for good (`--pin`): a resident adapter is pinned where it is; another is loaded
/// from the adapter directory, pinned.
pub(crate) async fn pin(st: &Arc<AppState>, ready: &Arc<Ready>, name: &str) -> Result<(), ApiError> {
    let resident = ready.adapters.read().is_ok_and(|a| a.contains_key(name));
    let (st2, ready2, n) = (st.clone(), ready.clone(), name.to_owned());
    if resident {
        blocking(move || ready2.engine.pin_adapter(&n, true)).await?.map_err(|e| ApiError::from_engine(e, "model", "logprobs"))?;
        return Ok(());
    }
    let Some(dir) = st.adapter_dir.clone() else {
        return Err(ApiError::model_not_found(name));
    };
    match blocking(move || load(&st2, &ready2, &dir, &n, false, None, true)).await?? {
        Some(Loaded { inserted, seconds }) => {
            record(st, ready, name, &inserted, seconds);
            Ok(())
        }
        None => Err(ApiError::model_not_found(name)),
    }
}

/// What a load did.
struct Loaded {
    inserted: Inserted,
    seconds: f64,
}

/// On the blocking pool: finds `name`'s file; when it is not resident, or its stamp changed and
/// its bytes too, reads, validates and makes it resident. `None`: nothing to load (no file, or
/// the resident one is current).
fn load(
    st: &AppState,
    ready: &Ready,
    dir: &Path,
    name: &str,
    resident: bool,
    tracked: Option<(Stamp, [u8; 32])>,
    pinned: bool,
) -> Result<Option<Loaded>, ApiError> {
    let Some((file, given)) = open_for(dir, name)? else { return Ok(None) };
    let bad = |msg: String| ApiError::invalid("model", format!("adapter file {given:?} of model {name:?}: {msg}"));
    let meta = file.metadata().map_err(|e| bad(format!("cannot read: {e}")))?;
    let stamp = Stamp::of(&meta);
    if resident && tracked.as_ref().is_some_and(|(s, _)| *s == stamp) {
        return Ok(None);
    }
    if meta.len() > MAX_ADAPTER_BYTES {
        return Err(bad(format!("{} bytes is larger than the {MAX_ADAPTER_BYTES} bytes an adapter may have", meta.len())));
    }
    let t0 = Instant::now();
    // Hashed in blocks, validated and built from the open file (tensors read when used): a load
    // holds no copy of the file, only the generator it builds.
    let hash = sha256(&file).map_err(|e| bad(format!("cannot read: {e}")))?;
    if resident && tracked.as_ref().is_some_and(|(_, h)| *h == hash) {
        // Touched, not changed: the resident adapter is this file's.
        st.ondemand.files.lock().map_err(|_| bad("state poisoned".to_owned()))?.insert(name.to_owned(), (stamp, hash));
        return Ok(None);
    }
    let v = iapt_format::validate_opened(file, Path::new(&given), None);
    let adapter = v.adapter.ok_or_else(|| bad(format!("not a valid IAPT adapter:\n{}", v.report)))?;
    // Replace whatever the engine holds under the name: the server's list can lag behind the
    // engine's evictions for a moment, so "not resident here" may still be resident there.
    let opts = InsertOptions { pinned, replace: true };
    let inserted = ready.engine.load_adapter_parsed(name, &adapter, opts).map_err(|e| match e {
        EngineError::AdapterRejected { .. } | EngineError::AdapterFile { .. } => bad(e.to_string()),
        e => ApiError::from_engine(e, "model", "logprobs"),
    })?;
    st.ondemand.files.lock().map_err(|_| bad("state poisoned".to_owned()))?.insert(name.to_owned(), (stamp, hash));
    Ok(Some(Loaded { inserted, seconds: t0.elapsed().as_secs_f64() }))
}

/// The stamp of the file that serves `name` now, if exactly one does.
fn current_stamp(dir: &Path, name: &str) -> Option<Stamp> {
    let (file, _) = open_for(dir, name).ok()??;
    file.metadata().ok().map(|m| Stamp::of(&m))
}

/// Brings the server's list and metrics in step with a load that made `name` resident.
pub(crate) fn record(st: &AppState, ready: &Ready, name: &str, ins: &Inserted, seconds: f64) {
    if let Ok(mut a) = ready.adapters.write() {
        for e in &ins.evicted {
            a.remove(e);
        }
        a.insert(name.to_owned(), ins.info.n_soft_tokens);
    }
    st.ondemand.forget(&ins.evicted);
    for e in &ins.evicted {
        st.metrics.forget(e);
    }
    st.metrics.adapter_loaded(name, seconds, ins.info.bytes, ins.evicted.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_map_to_model_names() {
        assert_eq!(name_of("sorter.iapt.gguf"), Some("sorter"));
        assert_eq!(name_of("sorter.iapt.safetensors"), Some("sorter"));
        assert_eq!(name_of("tenant-07.gguf"), Some("tenant-07"));
        assert_eq!(name_of("v1.2.safetensors"), Some("v1.2"));
        assert_eq!(name_of(".hidden.gguf"), None);
        assert_eq!(name_of("notes.txt"), None);
        assert_eq!(name_of(".gguf"), None);
        assert!(!plausible("a/b") && !plausible("..") && !plausible(""));
    }
}
