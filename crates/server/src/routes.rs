//! The router: `/health` (open); the inference routes `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (behind the API key when one is set; the admin key works too); the admin
//! routes `/v1/adapters` (POST), `/v1/adapters/{name}` (DELETE) and `/metrics` (behind the admin key
//! when one is set; with an API key but no admin key they are off, so an inference key can never
//! unload another tenant's adapter or read every tenant's figures). Unknown routes and methods
//! answer OpenAI error objects.
//!
//! Before any route, [`guard`] checks what every request must be: on a server without keys, a
//! `Host` header naming this server (loopback names, the bound host, `--allowed-host`), so a web page
//! a local user visits cannot drive it through DNS rebinding; a `POST` body of type
//! `application/json` (415 otherwise, so no HTML form or `text/plain` cross-site request is
//! accepted); and the whole body within the size cap and the body timeout (413, 408). No CORS
//! header is ever sent, so browsers refuse cross-origin reads.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::{blocking, AppState};
use crate::{adapters, chat, completions, tokens};

/// The application for `state`: bodies capped at `body_limit` bytes and read within `body_timeout`.
pub(crate) fn router(state: Arc<AppState>, body_limit: usize, body_timeout: Duration) -> Router {
    let inference = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth_inference));
    let admin = Router::new()
        .route("/v1/adapters", post(adapters::load))
        .route("/v1/adapters/{name}", delete(adapters::unload))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth_admin));
    let limits = BodyLimits { bytes: body_limit, timeout: body_timeout };
    Router::new()
        .route("/health", get(health))
        .merge(inference)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state((state.clone(), limits), guard))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// The body cap and timeout [`guard`] applies.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    bytes: usize,
    timeout: Duration,
}

/// The `Host` header's name (port and IPv6 brackets removed), lowercase.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let name =
        if let Some(rest) = h.strip_prefix('[') { rest.split(']').next().unwrap_or("") } else { h.rsplit_once(':').map_or(h, |(n, _)| n) };
    name.to_ascii_lowercase()
}

/// Whether a `Content-Type` value is JSON (`application/json`, any parameters).
fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// What every request must be before it reaches a route (see the module documentation).
async fn guard(State((st, limits)): State<(Arc<AppState>, BodyLimits)>, req: Request, next: Next) -> Response {
    if st.api_key_hash.is_none() && st.admin_key_hash.is_none() {
        if let Some(host) = req.headers().get(header::HOST) {
            let name = host.to_str().map(host_name).unwrap_or_default();
            if !st.allowed_hosts.contains(&name) {
                let e = ApiError::status(StatusCode::FORBIDDEN, format!("Host {name:?} is not allowed on a server without an API key; start it with --allowed-host {name} or with --api-key"));
                return st.error(e.with_code("host_not_allowed"));
            }
        }
    }
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !is_json(ct) {
        let e = ApiError::status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the body must be JSON sent as Content-Type: application/json (got {ct:?})"),
        );
        return st.error(e);
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return st
                .error(ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {} bytes", limits.bytes)))
        }
        Err(_) => {
            let e = ApiError::status(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {} s", limits.timeout.as_secs_f64()),
            );
            return st.error(e);
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// The SHA-256 of a key (compared in constant time, so neither content nor length leaks).
pub(crate) fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `header` is `Bearer KEY` for the key hashed as `want`, in constant time.
pub(crate) fn authorized(want: &[u8; 32], header: Option<&str>) -> bool {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    bool::from(key_hash(given).ct_eq(want))
}

fn unauthorized() -> ApiError {
    ApiError::status(StatusCode::UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY").with_code("invalid_api_key")
}

/// The inference routes: the API key or the admin key, when either is set.
async fn auth_inference(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let keys: Vec<&[u8; 32]> = st.api_key_hash.iter().chain(&st.admin_key_hash).collect();
    if !keys.is_empty() && !keys.iter().any(|k| authorized(k, header)) {
        return st.error(unauthorized());
    }
    next.run(req).await
}

/// The admin routes: the admin key when one is set; off when only an API key is set; open on a
/// server without keys (which answers only the allowed hosts).
async fn auth_admin(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match (&st.admin_key_hash, &st.api_key_hash) {
        (Some(admin), _) if authorized(admin, header) => next.run(req).await,
        (Some(_), Some(api)) if authorized(api, header) => st.error(ApiError::status(
            StatusCode::FORBIDDEN,
            "this key may run inference only; managing adapters and reading metrics needs the admin key",
        )),
        (Some(_), _) => st.error(unauthorized()),
        (None, Some(_)) => st.error(ApiError::status(
            StatusCode::FORBIDDEN,
            "adapter management and metrics are off on a server with an API key and no admin key; start it with --admin-key",
        )),
        (None, None) => next.run(req).await,
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.ready.get() {
        Some(r) => match r.failure() {
            None => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
            // The engine stopped (a panic) or hangs: the server is about to exit for its supervisor.
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "failed", "error": why}))).into_response(),
        },
        None => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let ready = match st.ready() {
        Ok(r) => r,
        Err(e) => return st.error(e),
    };
    let resident = ready.adapter_names();
    let available = match available(&st).await {
        Ok(a) => a,
        Err(e) => return st.error(e),
    };
    let mut data = vec![model_object(&st, &st.model_id, true)];
    data.extend(resident.iter().map(|n| model_object(&st, n, true)));
    data.extend(available.iter().filter(|n| !resident.contains(n)).map(|n| model_object(&st, n, false)));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// An OpenAI model object; adapters name the base as `parent` and say whether they are resident
/// (an adapter of the adapter directory is loaded on its first request).
fn model_object(st: &AppState, id: &str, resident: bool) -> serde_json::Value {
    let mut m = json!({"id": id, "object": "model", "created": st.created, "owned_by": "iapt"});
    if id != st.model_id {
        m["parent"] = json!(st.model_id);
        m["root"] = json!(st.model_id);
        m["resident"] = json!(resident);
    }
    m
}

/// The adapter names the adapter directory's files serve (none without one), at most
/// [`crate::ondemand::MAX_LISTED`], sorted.
async fn available(st: &Arc<AppState>) -> Result<Vec<String>, ApiError> {
    let Some(dir) = st.adapter_dir.clone() else { return Ok(Vec::new()) };
    blocking(move || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| e.file_name().to_str().and_then(crate::ondemand::name_of).map(str::to_owned))
                    .take(crate::ondemand::MAX_LISTED)
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    })
    .await
}

/// `GET /v1/models/{id}`: the base model, a resident adapter or one of the adapter directory, as
/// in the list; 404 otherwise.
async fn model(State(st): State<Arc<AppState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    let ready = match st.ready() {
        Ok(r) => r,
        Err(e) => return st.error(e),
    };
    let resident = st.resolve(&ready, &id).is_ok();
    let listed = match available(&st).await {
        Ok(a) => a.contains(&id),
        Err(e) => return st.error(e),
    };
    if !resident && !listed {
        return st.error(ApiError::model_not_found(&id));
    }
    axum::Json(model_object(&st, &id, resident)).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    if let Some(ready) = st.ready.get().cloned() {
        // The engine's own counts (the server's list of adapters may lag an eviction by a moment).
        if let Ok(Ok((s, resident))) = blocking(move || ready.engine.status().and_then(|s| Ok((s, ready.engine.adapters()?.len())))).await {
            st.metrics.running.set(s.running as i64);
            st.metrics.queued.set(s.queued as i64);
            st.metrics.set_engine(&s.stats);
            st.metrics.adapters_resident.set(resident as i64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render()).into_response()
}

async fn not_found(State(st): State<Arc<AppState>>, req: Request) -> Response {
    st.error(ApiError::status(StatusCode::NOT_FOUND, format!("no route {} {}", req.method(), req.uri().path())))
}

async fn method_not_allowed(State(st): State<Arc<AppState>>, req: Request) -> Response {
    st.error(ApiError::status(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", req.method(), req.uri().path())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_json_types() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("Evil.Example"), "evil.example");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert!(is_json("application/json") && is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain") && !is_json("application/x-www-form-urlencoded") && !is_json(""));
    }

    #[test]
    fn only_the_exact_bearer_key_is_authorized() {
        let want = key_hash("s3cret");
        assert!(authorized(&want, Some("Bearer s3cret")));
        for bad in [None, Some(""), Some("Bearer "), Some("Bearer s3cre"), Some("Bearer s3cret "), Some("bearer s3cret"), Some("s3cret")] {
            assert!(!authorized(&want, bad), "{bad:?}");
        }
    }
}
