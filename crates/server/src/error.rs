//! Errors: [`ApiError`], what a client gets (OpenAI's error object with an HTTP status), and
//! [`ServerError`], what stops the server.
//!
//! OpenAI's error object is `{"error": {"message", "type", "param", "code"}}`: `param` names the
//! request field at fault (`temperature`, `messages[1].content`), `type` is
//! `invalid_request_error` for anything the client can fix, `code` a stable word where OpenAI has
//! one (`model_not_found`, `context_length_exceeded`, `invalid_api_key`). Bad input is always a 4xx;
//! a 5xx means the server or the engine failed, never the request.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use iapt_engine::EngineError;

/// Seconds a client is told to wait (`Retry-After`) when the queue is full or the model loads.
pub const RETRY_AFTER_S: u32 = 1;

/// An error answered to a client: an HTTP status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and how to fix it.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's `code`, where one applies.
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400 about field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).with_param(param)
    }

    /// 400 about the request as a whole (no one field).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404 `model_not_found` for `model`. The message names the request's own input only (no other
    /// tenant's adapter).
    pub fn model_not_found(model: &str) -> ApiError {
        let msg = format!("the model {model:?} does not exist; GET /v1/models lists the base model and the adapters");
        ApiError { code: Some("model_not_found"), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg) }.with_param("model")
    }

    /// Another status, with OpenAI's type for it.
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            422 => "invalid_request_error",
            503 => "service_unavailable",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        ApiError::new(status, kind, message)
    }

    /// 503 while the model loads or the engine has stopped.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::status(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// The same error naming `param`.
    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// The same error with OpenAI's `code`.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The error object as JSON (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// An engine error for a request; `prompt_field` names where the prompt came from (`prompt`
    /// or `messages`), `logprobs_field` where the log-probability count did.
    pub fn from_engine(e: EngineError, prompt_field: &str, logprobs_field: &str) -> ApiError {
        let msg = e.to_string();
        match e {
            EngineError::UnknownAdapter { name, .. } => ApiError::model_not_found(&name),
            EngineError::EmptyPrompt | EngineError::TokenOutOfVocab { .. } => ApiError::invalid(prompt_field, msg),
            EngineError::TooLong { .. } => ApiError::invalid(prompt_field, msg).with_code("context_length_exceeded"),
            EngineError::MaxTokensZero => ApiError::invalid("max_tokens", msg),
            EngineError::TooManyChoices { .. } => ApiError::invalid("n", msg),
            EngineError::BadSchema { .. } => ApiError::invalid("response_format", msg),
            // The document could not be continued: the schema admits no answer from here.
            EngineError::Constraint { .. } => ApiError::status(StatusCode::UNPROCESSABLE_ENTITY, msg).with_param("response_format"),
            EngineError::Sampling(s) => ApiError::invalid(s.field, msg),
            EngineError::TooManyLogprobs { .. } => ApiError::invalid(logprobs_field, msg),
            EngineError::EmptyStop => ApiError::invalid("stop", msg),
            EngineError::QueueFull { .. } => ApiError::unavailable(msg).with_code("queue_full"),
            EngineError::Stopped => ApiError::unavailable(msg),
            EngineError::BadAdapterName { .. } => ApiError::invalid("name", msg),
            EngineError::AdapterExists { .. } => ApiError::status(StatusCode::CONFLICT, msg).with_param("name"),
            EngineError::AdapterFile { .. } | EngineError::AdapterRejected { .. } => ApiError::invalid("path", msg),
            // The tenant's own adapter failed on this prompt: nothing the server did wrong, nothing
            // the request's other fields can fix; the others are unaffected.
            EngineError::AdapterFailed { .. } => {
                ApiError::status(StatusCode::UNPROCESSABLE_ENTITY, msg).with_param("model").with_code("adapter_failed")
            }
            EngineError::Panicked { .. } => ApiError::unavailable(msg).with_code("engine_failed"),
            // Every resident adapter is pinned or in a prefill: a moment later one will not be.
            EngineError::AdapterCacheFull { .. } => ApiError::unavailable(msg).with_param("model").with_code("adapter_cache_full"),
            _ => ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// What stops the server (the CLI prints it and exits 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A setting is wrong (host, adapter names, adapter directory).
    #[error("{0}")]
    Config(String),
    /// The engine could not start (model, context, an adapter given on the command line).
    #[error("the engine could not start: {0}")]
    Engine(#[from] EngineError),
    /// `--chat-template` cannot be used (not a built-in name nor a file, or a Jinja syntax error).
    #[error("{0}")]
    ChatTemplate(#[from] iapt_engine::ChatError),
    /// The HTTP server failed.
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The engine stopped while serving (it panicked: a bug); the requests in flight failed.
    #[error("the engine stopped: {0}; restart the server")]
    EngineFailed(String),
}

/// The body, or 413 past the cap (400 for another read failure).
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is too large: {}", e.body_text()))
        }
        s => ApiError::status(s, format!("cannot read the request body: {}", e.body_text())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_client_errors_naming_the_field() {
        let e = ApiError::from_engine(EngineError::MaxTokensZero, "prompt", "logprobs");
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("max_tokens")));
        let e = ApiError::from_engine(EngineError::QueueFull { capacity: 3 }, "prompt", "logprobs");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.into_response().headers().contains_key(header::RETRY_AFTER));
        let tl = EngineError::TooLong { n_prompt: 9, n_soft: 4, max_tokens: 9, seq_ctx: 8 };
        let e = ApiError::from_engine(tl, "messages", "top_logprobs");
        assert_eq!((e.param.as_deref(), e.code), (Some("messages"), Some("context_length_exceeded")));
        let e = ApiError::from_engine(EngineError::TooManyLogprobs { n: 30, max: 20 }, "messages", "top_logprobs");
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let body = ApiError::model_not_found("x").body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
    }
}
