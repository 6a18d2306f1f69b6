//! Run-time adapters: `POST /v1/adapters {"name", "path", "pin"?}` loads one (evicting least
//! recently used ones where the resident set is capped; `pin`: never evicted),
//! `DELETE /v1/adapters/NAME` unloads one. Requests also load adapters from the directory by
//! name on first use (`crate::ondemand`). Both are off unless the server was started with an adapter directory: as vLLM says
//! of its own switch, loading files on a client's word is risky in production.
//!
//! [`open_confined`] keeps a client inside that directory: the path (relative to the directory, or
//! absolute under it) is opened component by component relative to the directory's handle,
//! following no symbolic link and no `..`, without blocking (a FIFO cannot hang the server), and
//! must be a regular file; there is no window between a check and the open. A path that does not
//! exist and one outside get the same answer, so a client cannot probe for files elsewhere. The file
//! is read and validated on the blocking pool and its generator built there too, never on the
//! engine's thread, so a slow disk or a large adapter never stalls decoding. A bad adapter is
//! refused with the spec's codes and changes nothing; error messages name the request's own path,
//! never the server's. Loads and unloads are serialized, so a `DELETE` racing a `POST` of the same
//! name leaves the engine and the server's list in step. Unloading one in use takes its name away at
//! once and frees it when its last request ends (the engine's deferred unload); its metric series
//! go with it.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Component, Path};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use iapt_engine::Unloaded;
use rustix::fs::{FileType, Mode, OFlags};
use serde::Deserialize;
use serde_json::json;

use crate::error::{body_bytes, ApiError};
use crate::state::{blocking, AppState};

/// The largest adapter file a server reads (a LLaMA-2-7B-shape adapter in F32 is ~340 MB).
pub const MAX_ADAPTER_BYTES: u64 = 4 << 30;

#[derive(Debug, Deserialize)]
struct LoadBody {
    name: Option<String>,
    path: Option<String>,
    /// Never evicted to make room for another (default false).
    #[serde(default)]
    pin: bool,
}

/// Opens the regular file `given` names inside `dir` (see the module documentation), or 403.
pub(crate) fn open_confined(dir: &Path, given: &str) -> Result<std::fs::File, ApiError> {
    let refused = || {
        ApiError::status(StatusCode::FORBIDDEN, format!("path {given:?} is not an adapter file inside the adapter directory"))
            .with_param("path")
    };
    let p = Path::new(given);
    let rel = if p.is_absolute() { p.strip_prefix(dir).map_err(|_| refused())? } else { p };
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::CurDir => {}
            _ => return Err(refused()),
        }
    }
    if parts.is_empty() {
        return Err(refused());
    }
    let mut fd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|_| refused())?;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let kind = if last { OFlags::NONBLOCK } else { OFlags::DIRECTORY };
        fd = rustix::fs::openat(&fd, *part, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | kind, Mode::empty())
            .map_err(|_| refused())?;
    }
    let st = rustix::fs::fstat(&fd).map_err(|_| refused())?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(refused());
    }
    Ok(std::fs::File::from(fd))
}

/// Reads and validates an adapter from an open file; errors name `given`, the request's path.
fn parse(file: std::fs::File, given: &str) -> Result<iapt_format::Adapter, ApiError> {
    let bad = |msg: String| ApiError::invalid("path", format!("{given:?}: {msg}"));
    let len = file.metadata().map_err(|e| bad(format!("cannot read: {e}")))?.len();
    if len > MAX_ADAPTER_BYTES {
        return Err(bad(format!("{len} bytes is larger than the {MAX_ADAPTER_BYTES} bytes an adapter may have")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_ADAPTER_BYTES).read_to_end(&mut bytes).map_err(|e| bad(format!("cannot read: {e}")))?;
    let v = iapt_format::validate_bytes(&bytes);
    v.adapter.ok_or_else(|| bad(format!("not a valid IAPT adapter:\n{}", v.report)))
}

fn dir(st: &AppState) -> Result<&Path, ApiError> {
    st.adapter_dir.as_deref().ok_or_else(|| {
        ApiError::status(StatusCode::FORBIDDEN, "run-time adapter loading is off; start the server with --adapter-dir DIR to allow it")
    })
}

/// `POST /v1/adapters`.
pub(crate) async fn load(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match load_inner(&st, body).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

async fn load_inner(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let dir = dir(st)?.to_owned();
    let bytes = body_bytes(body)?;
    let b: LoadBody = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes)).map_err(|e| {
        let path = e.path().to_string();
        match e.inner().classify() {
            serde_json::error::Category::Data if path != "." => ApiError::invalid(path.clone(), format!("{path}: {}", e.inner())),
            _ => ApiError::bad_request(format!("the body must be a JSON object {{\"name\", \"path\"}}: {}", e.inner())),
        }
    })?;
    let name = b.name.ok_or_else(|| ApiError::invalid("name", "name is required"))?;
    let path = b.path.ok_or_else(|| ApiError::invalid("path", "path is required"))?;
    if name == st.model_id {
        return Err(
            ApiError::status(StatusCode::CONFLICT, format!("{name:?} is the base model's id; pick another name")).with_param("name")
        );
    }
    let ready = st.ready()?;
    let _serial = st.admin.lock().await;
    let r = ready.clone();
    let n = name.clone();
    let pin = b.pin;
    let t0 = std::time::Instant::now();
    let ins = blocking(move || -> Result<_, ApiError> {
        let adapter = parse(open_confined(&dir, &path)?, &path)?;
        let opts = iapt_engine::InsertOptions { pinned: pin, replace: false };
        r.engine.load_adapter_parsed(&n, &adapter, opts).map_err(|e| ApiError::from_engine(e, "path", "logprobs"))
    })
    .await??;
    // Loaded by name and path, not tracked as the directory's file for on-demand reloads.
    st.ondemand.forget(std::slice::from_ref(&name));
    crate::ondemand::record(st, &ready, &name, &ins, t0.elapsed().as_secs_f64());
    let info = &ins.info;
    let body = json!({"id": info.name, "object": "model", "created": st.created, "owned_by": "iapt", "parent": st.model_id, "root": st.model_id,
        "n_soft_tokens": info.n_soft_tokens, "pinned": info.pinned, "evicted": ins.evicted});
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// `DELETE /v1/adapters/{name}`.
pub(crate) async fn unload(State(st): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> Response {
    match unload_inner(&st, name).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

async fn unload_inner(st: &Arc<AppState>, name: String) -> Result<Response, ApiError> {
    dir(st)?;
    let ready = st.ready()?;
    let _serial = st.admin.lock().await;
    let r = ready.clone();
    let n = name.clone();
    let done = blocking(move || r.engine.unload_adapter(&n)).await?;
    let users = match done {
        Ok(Unloaded::Freed) => 0,
        Ok(Unloaded::Deferred { users }) => users,
        Err(e) => return Err(ApiError::from_engine(e, "name", "logprobs")),
    };
    if let Ok(mut a) = ready.adapters.write() {
        a.remove(&name);
    }
    st.ondemand.forget(std::slice::from_ref(&name));
    st.metrics.forget(&name);
    Ok(axum::Json(json!({"id": name, "object": "model", "deleted": true, "requests_still_running": users})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_inside_the_directory_open_and_no_link_is_followed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapters");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.gguf"), b"x").unwrap();
        std::fs::write(root.path().join("secret.gguf"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.gguf"), dir.join("link.gguf")).unwrap();
        std::os::unix::fs::symlink(dir.join("a.gguf"), dir.join("inner-link.gguf")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.gguf"), b"y").unwrap();
        std::os::unix::fs::symlink(root.path(), dir.join("up")).unwrap();
        let fifo = dir.join("fifo.gguf");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
        let dir = dir.canonicalize().unwrap();
        let read = |f: std::fs::File| {
            let mut s = String::new();
            std::io::BufReader::new(f).read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read(open_confined(&dir, "a.gguf").unwrap()), "x");
        assert_eq!(read(open_confined(&dir, "./sub/b.gguf").unwrap()), "y");
        assert_eq!(read(open_confined(&dir, dir.join("a.gguf").to_str().unwrap()).unwrap()), "x");
        let secret = root.path().join("secret.gguf");
        // A FIFO is refused at once (opened without blocking, then not a regular file).
        let t0 = std::time::Instant::now();
        for bad in [
            "../secret.gguf",
            "sub/../a.gguf",
            "link.gguf",
            "inner-link.gguf",
            "up/secret.gguf",
            secret.to_str().unwrap(),
            "missing.gguf",
            "sub",
            "",
            "/etc/passwd",
            "fifo.gguf",
        ] {
            let e = open_confined(&dir, bad).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::FORBIDDEN, Some("path")), "{bad}");
            assert!(!e.message.contains(dir.to_str().unwrap()), "{bad}: the server's own path leaked: {}", e.message);
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    }
}
