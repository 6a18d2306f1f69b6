//! Responses in OpenAI's shapes: a whole `text_completion` or `chat.completion`, or a stream of
//! server-sent events (`data: {chunk}` lines, `data: [DONE]` at the end; a failure mid-stream is
//! one `data: {"error": ...}` event before `[DONE]`).
//!
//! Log-probabilities: completions use the legacy object (`tokens`, `token_logprobs`, `top_logprobs`
//! as `{token: logprob}` maps, `text_offset`); chat uses `{"content": [{token, logprob, bytes,
//! top_logprobs}]}`. Both are the log-softmax of the raw logits row, before any sampler stage.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use iapt_engine::{EventKind, TokenOut};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::generate::{finish_reason, Output, Started, Utf8Decoder};
use crate::state::Ready;

/// Which endpoint answers, and the fields every chunk repeats.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub chat: bool,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Log-probabilities were asked for.
    pub logprobs: bool,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Map<String, Value> {
        let v = json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices});
        match v {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    fn usage(n_prompt: usize, n_generated: usize) -> Value {
        json!({"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated})
    }

    /// The whole response.
    pub fn full(&self, ready: &Ready, out: &Output, n_prompt: usize) -> Value {
        let lp = self.logprobs.then(|| self.logprobs_of(ready, &out.tokens, 0));
        let reason = finish_reason(out.done.reason);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": lp, "finish_reason": reason})
        } else {
            json!({"index": 0, "text": out.text, "logprobs": lp, "finish_reason": reason})
        };
        let mut m = self.envelope(false, json!([choice]));
        m.insert("usage".to_owned(), Shape::usage(n_prompt, out.done.n_generated));
        Value::Object(m)
    }

    /// One chunk: `text` (possibly empty) and the log-probabilities of `token`, if any.
    fn chunk(&self, ready: &Ready, text: &str, token: Option<&TokenOut>, offset: usize, reason: Option<&str>) -> Value {
        let lp = match token {
            Some(t) if self.logprobs => self.logprobs_of(ready, std::slice::from_ref(t), offset),
            _ => Value::Null,
        };
        let choice = if self.chat {
            let delta = if text.is_empty() && reason.is_some() { json!({}) } else { json!({"content": text}) };
            json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason})
        } else {
            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": reason})
        };
        Value::Object(self.envelope(true, json!([choice])))
    }

    fn logprobs_of(&self, ready: &Ready, tokens: &[TokenOut], mut offset: usize) -> Value {
        if self.chat {
            let entry = |t: i32, lp: f32| {
                let piece = ready.piece(t);
                let bytes = ready.vocab.get(t as usize).cloned().unwrap_or_default();
                (piece, lp, bytes)
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let (token, logprob, bytes) = entry(t.token, t.logprob.unwrap_or(f32::NAN));
                    let top: Vec<Value> = t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| {
                            let (token, logprob, bytes) = entry(id, lp);
                            json!({"token": token, "logprob": logprob, "bytes": bytes})
                        })
                        .collect();
                    json!({"token": token, "logprob": logprob, "bytes": bytes, "top_logprobs": top})
                })
                .collect();
            return json!({ "content": content });
        }
        let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for t in tokens {
            let piece = ready.piece(t.token);
            offsets.push(offset);
            offset += piece.len();
            toks.push(piece);
            lps.push(t.logprob);
            let top: Map<String, Value> = t.top_logprobs.iter().map(|&(id, lp)| (ready.piece(id), json!(lp))).collect();
            tops.push(top);
        }
        json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }
}

/// What a stream is doing.
enum Phase {
    Start,
    Body,
    End,
}

struct StreamState {
    started: Started,
    shape: Shape,
    ready: Arc<Ready>,
    decoder: Utf8Decoder,
    offset: usize,
    include_usage: bool,
    phase: Phase,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn done() -> SseEvent {
    SseEvent::default().data("[DONE]")
}

impl StreamState {
    /// The next events, or `None` when the stream has ended.
    async fn next(&mut self) -> Option<Vec<SseEvent>> {
        match self.phase {
            Phase::End => None,
            Phase::Start => {
                self.phase = Phase::Body;
                if !self.shape.chat {
                    return Some(Vec::new());
                }
                let first = self.shape.envelope(
                    true,
                    json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                );
                Some(vec![data(&Value::Object(first))])
            }
            Phase::Body => Some(self.body().await),
        }
    }

    async fn body(&mut self) -> Vec<SseEvent> {
        let Some(ev) = self.started.events.recv().await else {
            self.phase = Phase::End;
            return vec![data(&ApiError::unavailable("the engine stopped").body()), done()];
        };
        match ev.kind {
            EventKind::Token(t) => {
                let text = self.decoder.push(&t.text);
                let chunk = self.shape.chunk(&self.ready, &text, Some(&t), self.offset, None);
                self.offset += self.ready.piece(t.token).len();
                vec![data(&chunk)]
            }
            EventKind::Done(d) => {
                self.phase = Phase::End;
                let mut text = self.decoder.push(&d.text);
                text.push_str(&self.decoder.finish());
                let mut out = vec![data(&self.shape.chunk(&self.ready, &text, None, self.offset, Some(finish_reason(d.reason))))];
                if self.include_usage {
                    let mut m = self.shape.envelope(true, json!([]));
                    m.insert("usage".to_owned(), Shape::usage(self.started.n_prompt, d.n_generated));
                    out.push(data(&Value::Object(m)));
                }
                out.push(done());
                out
            }
            EventKind::Failed(e) => {
                self.phase = Phase::End;
                vec![data(&ApiError::from_engine(e, "prompt", "logprobs").body()), done()]
            }
        }
    }
}

/// The response for `started`: streamed as SSE, or whole once generation ends.
pub(crate) async fn respond(
    started: Started,
    shape: Shape,
    ready: Arc<Ready>,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    if !stream {
        let n_prompt = started.n_prompt;
        let out = crate::generate::collect(started).await?;
        return Ok(axum::Json(shape.full(&ready, &out, n_prompt)).into_response());
    }
    let st = StreamState { started, shape, ready, decoder: Utf8Decoder::default(), offset: 0, include_usage, phase: Phase::Start };
    let events = stream::unfold(st, |mut st| async move { st.next().await.map(|v| (v, st)) })
        .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(events).into_response())
}
