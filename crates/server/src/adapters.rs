//! Run-time adapters: `POST /v1/adapters {"name", "path"}` loads one, `DELETE /v1/adapters/NAME`
//! unloads one. Both are off unless the server was started with an adapter directory: as vLLM says
//! of its own switch, loading files on a client's word is risky in production.
//!
//! [`confine`] keeps a client inside that directory: the path (relative to the directory, or
//! absolute) is resolved with symlinks and `..` followed, and must name a regular file under the
//! directory's own resolved path. A path that does not exist and one outside get the same answer,
//! so a client cannot probe for files elsewhere. A bad adapter is refused with the spec's codes and
//! changes nothing; unloading one in use takes its name away at once and frees it when its last
//! request ends (the engine's deferred unload).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use iapt_engine::Unloaded;
use serde::Deserialize;
use serde_json::json;

use crate::error::{body_bytes, ApiError};
use crate::state::{blocking, AppState};

#[derive(Debug, Deserialize)]
struct LoadBody {
    name: Option<String>,
    path: Option<String>,
}

/// The file `given` names inside `dir` (already canonical), or 403.
pub(crate) fn confine(dir: &Path, given: &str) -> Result<PathBuf, ApiError> {
    let refused = || {
        ApiError::status(StatusCode::FORBIDDEN, format!("path {given:?} is not an adapter file inside the adapter directory"))
            .with_param("path")
    };
    let p = Path::new(given);
    let joined = if p.is_absolute() { p.to_owned() } else { dir.join(p) };
    let real = joined.canonicalize().map_err(|_| refused())?;
    if !real.starts_with(dir) || !real.is_file() {
        return Err(refused());
    }
    Ok(real)
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
    let file = confine(&dir, &path)?;
    let ready = st.ready()?;
    let r = ready.clone();
    let n = name.clone();
    let info = blocking(move || r.engine.load_adapter(&n, file)).await?.map_err(|e| ApiError::from_engine(e, "path", "logprobs"))?;
    if let Ok(mut a) = ready.adapters.write() {
        a.insert(info.name.clone(), info.n_soft_tokens);
    }
    let body = json!({"id": info.name, "object": "model", "created": st.created, "owned_by": "iapt", "parent": st.model_id, "root": st.model_id, "n_soft_tokens": info.n_soft_tokens});
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
    Ok(axum::Json(json!({"id": name, "object": "model", "deleted": true, "requests_still_running": users})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_directory_are_refused_after_resolving_links_and_dots() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapters");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.gguf"), b"x").unwrap();
        std::fs::write(root.path().join("secret.gguf"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.gguf"), dir.join("link.gguf")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let dir = dir.canonicalize().unwrap();
        assert_eq!(confine(&dir, "a.gguf").unwrap(), dir.join("a.gguf"));
        assert_eq!(confine(&dir, "sub/../a.gguf").unwrap(), dir.join("a.gguf"));
        assert_eq!(confine(&dir, dir.join("a.gguf").to_str().unwrap()).unwrap(), dir.join("a.gguf"));
        let secret = root.path().join("secret.gguf");
        for bad in ["../secret.gguf", "link.gguf", secret.to_str().unwrap(), "missing.gguf", "sub", "", "/etc/passwd"] {
            let e = confine(&dir, bad).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::FORBIDDEN, Some("path")), "{bad}");
        }
    }
}
