//! `POST /v1/completions`: each prompt (text, or token ids fed as given) is a whole instruction;
//! the adapter `model` names adds its soft tokens after it. A `prompt` array is a batch: one
//! engine request per prompt, all running together, each with `n` choices that share its prefill;
//! choice `j` of prompt `i` has index `i * n + j`, as in OpenAI's API. `max_tokens` defaults to
//! 16, as OpenAI's does.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use crate::api::{self, Prompt};
use crate::error::{body_bytes, ApiError};
use crate::generate::{self, Fields, Input, Job, Started};
use crate::respond::{respond, Shape};
use crate::state::AppState;

/// OpenAI's default `max_tokens` for completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// The handler.
pub(crate) async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match run(&st, body).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

async fn run(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = api::parse(&body_bytes(body)?)?;
    let (common, prompts) = api::completion(&b)?;
    let ready = st.ready()?;
    let adapter = crate::ondemand::ensure(st, &ready, &common.model).await?;
    let mut tokenized = Vec::with_capacity(prompts.len());
    for p in prompts {
        tokenized.push(match p {
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => generate::tokenize(&ready, Input::Text(text)).await?,
        });
    }
    let shape = Shape {
        chat: false,
        id: format!("cmpl-{}", st.next_id()),
        created: st.created,
        model: common.model.clone(),
        logprobs: common.logprobs.is_some(),
        n: common.n,
    };
    let (stream, usage) = (common.stream, common.include_usage);
    let mut started = Started::new(&st.metrics, &common.model);
    for (i, prompt) in tokenized.into_iter().enumerate() {
        let job = Job {
            model: common.model.clone(),
            adapter: adapter.clone(),
            prompt,
            common: common.clone(),
            default_max: Some(DEFAULT_MAX_TOKENS),
            fields: Fields { prompt: "prompt", logprobs: "logprobs" },
        };
        crate::ondemand::start(st, &ready, &mut started, job, i).await?;
    }
    respond(started.sealed(), shape, ready, stream, usage).await
}
