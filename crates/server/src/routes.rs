//! The router: `/health` (open), and behind the API key when one is set: `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions`, `/v1/adapters` (POST) and `/v1/adapters/{name}`
//! (DELETE), `/metrics`. Bodies are capped; unknown routes and methods answer OpenAI error objects.

use std::sync::Arc;

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
use crate::{adapters, chat, completions};

/// The application for `state`, with bodies capped at `body_limit` bytes.
pub(crate) fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/adapters", post(adapters::load))
        .route("/v1/adapters/{name}", delete(adapters::unload))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
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

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(want) = &st.api_key_hash {
        let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !authorized(want, header) {
            let e = ApiError::status(StatusCode::UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY")
                .with_code("invalid_api_key");
            return st.error(e);
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.ready.get() {
        Some(_) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let ready = match st.ready() {
        Ok(r) => r,
        Err(e) => return st.error(e),
    };
    let model = |id: &str| json!({"id": id, "object": "model", "created": st.created, "owned_by": "iapt"});
    let mut data = vec![model(&st.model_id)];
    for name in ready.adapter_names() {
        let mut m = model(&name);
        m["parent"] = json!(st.model_id);
        m["root"] = json!(st.model_id);
        data.push(m);
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    if let Some(ready) = st.ready.get().cloned() {
        if let Ok(Ok(s)) = blocking(move || ready.engine.status()).await {
            st.metrics.running.set(s.running as i64);
            st.metrics.queued.set(s.queued as i64);
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
    fn only_the_exact_bearer_key_is_authorized() {
        let want = key_hash("s3cret");
        assert!(authorized(&want, Some("Bearer s3cret")));
        for bad in [None, Some(""), Some("Bearer "), Some("Bearer s3cre"), Some("Bearer s3cret "), Some("bearer s3cret"), Some("s3cret")] {
            assert!(!authorized(&want, bad), "{bad:?}");
        }
    }
}
