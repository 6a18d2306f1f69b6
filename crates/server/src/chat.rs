//! `POST /v1/chat/completions`: the messages are rendered with the base model's chat template, the
//! generation prompt added, and the rendered text is the instruction (the adapter's soft tokens
//! follow it). `max_tokens` defaults to the context the sequence has left.
//!
//! The template is applied by llama.cpp's own `llama_chat_apply_template`
//! ([`iapt_llama::Model::apply_chat_messages`]), not by a Jinja engine such as `minijinja`:
//! - it is the function `iapt run --chat` and `iapt batch --chat` already use, so a chat request
//!   gives exactly the tokens, and so the text, of `iapt run --chat` with the same adapter;
//! - it is llama.cpp's tested rendering of the templates it knows (it recognises the GGUF's
//!   `tokenizer.chat_template` among its built-in formats: Llama 2/3, ChatML, Gemma, Phi, ...),
//!   with no second implementation of Jinja semantics to drift from it, and no new dependency.
//!
//! The cost: a template llama.cpp does not recognise is refused (400 naming `messages`) where a Jinja
//! engine might have rendered it; `/v1/completions` with a pre-rendered prompt still works then.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use crate::api;
use crate::error::{body_bytes, ApiError};
use crate::generate::{self, Fields, Input, Job};
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
    };
    let (stream, usage) = (common.stream, common.include_usage);
    let fields = Fields { prompt: "messages", logprobs: "top_logprobs" };
    let job = Job { model: common.model.clone(), adapter, prompt, common, default_max: None, fields };
    let started = crate::ondemand::start(st, &ready, job).await?;
    respond(started, shape, ready, stream, usage).await
}
