//! `POST /v1/chat/completions`: the messages are rendered with the server's chat template
//! (`--chat-template NAME|FILE`, else the GGUF's; [`iapt_engine::ChatTemplate`]: llama.cpp's own
//! rendering for its built-in formats, Jinja otherwise), the generation prompt added, and the
//! rendered text is the instruction (the adapter's soft tokens follow it). So a chat request gives
//! exactly the tokens of `/v1/completions` on the rendered text, and of `iapt run --chat` with the
//! same template and adapter. `max_tokens` defaults to the context the sequence has left.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use crate::api;
use crate::error::{body_bytes, ApiError};
use crate::generate::{self, Fields, Input, Job, Started};
use crate::respond::{respond, Shape};
use crate::state::AppState;

/// The handler.
pub(crate) async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match run(&st, body).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

async fn run(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = api::parse(&body_bytes(body)?)?;
    let (common, messages) = api::chat(&b)?;
    let ready = st.ready()?;
    let adapter = crate::ondemand::ensure(st, &ready, &common.model).await?;
    let prompt = generate::tokenize(&ready, Input::Chat(messages)).await?;
    let shape = Shape {
        chat: true,
        id: format!("chatcmpl-{}", st.next_id()),
        created: st.created,
        model: common.model.clone(),
        logprobs: common.logprobs.is_some(),
        n: common.n,
    };
    let (stream, usage) = (common.stream, common.include_usage);
    let fields = Fields { prompt: "messages", logprobs: "top_logprobs" };
    let mut started = Started::new(&st.metrics, &common.model);
    let job = Job { model: common.model.clone(), adapter, prompt, common, default_max: None, fields };
    crate::ondemand::start(st, &ready, &mut started, job, 0).await?;
    respond(started.sealed(), shape, ready, stream, usage).await
}
