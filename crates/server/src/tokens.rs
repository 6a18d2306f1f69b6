//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes, for clients that count or
//! inspect tokens (issue 33). The tokenizer is the base model's: an adapter adds soft tokens after
//! the instruction but never changes how text becomes tokens.
//!
//! - `/tokenize {"content", "add_special"?: false, "parse_special"?: true, "with_pieces"?: false}`
//!   gives `{"tokens": [id, ...]}`, or with pieces `{"tokens": [{"id", "piece"}, ...]}`, the piece
//!   a string when its bytes are UTF-8 and otherwise the array of its bytes (as llama-server);
//! - `/detokenize {"tokens": [id, ...]}` gives `{"content"}`: the tokens' bytes in order, as
//!   UTF-8 (invalid sequences replaced). An id outside the vocabulary is a 400 naming `tokens`.
//!
//! The same defaults as llama-server: `add_special` false (no BOS unless asked), special-token
//! text parsed. `/v1/completions` tokenizes a text prompt with BOS, special-token text parsed, so
//! its prompt is `/tokenize` with `"add_special": true`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::api;
use crate::error::{body_bytes, ApiError};
use crate::state::{blocking, AppState};

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct TokenizeBody {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<i64>,
}

/// `POST /tokenize`.
pub(crate) async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match run_tokenize(&st, body).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

async fn run_tokenize(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b: TokenizeBody = api::parse(&body_bytes(body)?)?;
    let ready = st.ready()?;
    let r = ready.clone();
    let (content, add, parse) = (b.content, b.add_special, b.parse_special);
    let tokens = match blocking(move || r.engine.with_model(move |m| m.tokenize(&content, add, parse))).await? {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(ApiError::invalid("content", format!("cannot tokenize: {e}"))),
        Err(e) => return Err(ApiError::from_engine(e, "content", "content")),
    };
    if !b.with_pieces {
        return Ok(axum::Json(json!({ "tokens": tokens })).into_response());
    }
    let pieces: Vec<serde_json::Value> = tokens
        .iter()
        .map(|&t| {
            let bytes = usize::try_from(t).ok().and_then(|i| ready.vocab.get(i)).cloned().unwrap_or_default();
            let piece = match String::from_utf8(bytes) {
                Ok(s) => json!(s),
                Err(e) => json!(e.into_bytes()),
            };
            json!({ "id": t, "piece": piece })
        })
        .collect();
    Ok(axum::Json(json!({ "tokens": pieces })).into_response())
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match run_detokenize(&st, body) {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

fn run_detokenize(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b: DetokenizeBody = api::parse(&body_bytes(body)?)?;
    let ready = st.ready()?;
    let n = ready.vocab.len();
    let mut bytes = Vec::new();
    for (i, &t) in b.tokens.iter().enumerate() {
        let piece = usize::try_from(t).ok().and_then(|t| ready.vocab.get(t)).ok_or_else(|| {
            ApiError::invalid(
                format!("tokens[{i}]"),
                format!("tokens[{i}]: {t} is not a token id of this model (0 ..= {})", n.saturating_sub(1)),
            )
        })?;
        bytes.extend_from_slice(piece);
    }
    Ok(axum::Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response())
}
