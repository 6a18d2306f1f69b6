//! Responses in OpenAI's shapes: a whole `text_completion` or `chat.completion`, or a stream of
//! server-sent events (`data: {chunk}` lines, `data: [DONE]` at the end; a failure mid-stream is
//! one `data: {"error": ...}` event before `[DONE]`).
//!
//! Several choices (`n`, a prompt array) share the response: each choice object and each chunk
//! carries its `index`; a stream ends after every choice has sent its `finish_reason` (then the
//! usage chunk, if asked for, and `[DONE]`); `usage` counts every prompt once and every choice's
//! tokens.
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
    /// Choices per prompt.
    pub n: usize,
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

    /// OpenAI's usage, with `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache
    /// gave instead of computing them.
    fn usage(n_prompt: usize, n_generated: usize, n_cached: usize) -> Value {
        json!({"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated,
            "prompt_tokens_details": {"cached_tokens": n_cached}})
    }

    /// The whole response: `outs` in choice order.
    pub fn full(&self, ready: &Ready, outs: &[Output], n_prompt: usize) -> Value {
        let choices: Vec<Value> = outs
            .iter()
            .enumerate()
            .map(|(index, out)| {
                let lp = self.logprobs.then(|| self.logprobs_of(ready, &out.tokens, 0));
                let reason = finish_reason(out.done.reason);
                if self.chat {
                    json!({"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": lp, "finish_reason": reason})
                } else {
                    json!({"index": index, "text": out.text, "logprobs": lp, "finish_reason": reason})
                }
            })
            .collect();
        let mut m = self.envelope(false, Value::Array(choices));
        // A prompt's choices share its prefill: its cached tokens count once.
        let cached = outs.iter().step_by(self.n.max(1)).map(|o| o.done.n_cached).sum();
        m.insert("usage".to_owned(), Shape::usage(n_prompt, outs.iter().map(|o| o.done.n_generated).sum(), cached));
        Value::Object(m)
    }

    /// One chunk of choice `index`: `text` (possibly empty) and the log-probabilities of `token`, if any.
    fn chunk(&self, ready: &Ready, index: usize, text: &str, token: Option<&TokenOut>, offset: usize, reason: Option<&str>) -> Value {
        let lp = match token {
            Some(t) if self.logprobs => self.logprobs_of(ready, std::slice::from_ref(t), offset),
            _ => Value::Null,
        };
        let choice = if self.chat {
            let delta = if text.is_empty() && reason.is_some() { json!({}) } else { json!({"content": text}) };
            json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason})
        } else {
            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": reason})
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
    /// Per choice: its text decoder and its text offset (legacy log-probabilities).
    choices: Vec<(Utf8Decoder, usize)>,
    /// Choices not yet finished, and the tokens generated by those that have.
    open: usize,
    n_generated: usize,
    n_cached: usize,
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
                let first = (0..self.choices.len()).map(|index| {
                    let role =
                        json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                    data(&Value::Object(self.shape.envelope(true, role)))
                });
                Some(first.collect())
            }
            Phase::Body => Some(self.body().await),
        }
    }

    async fn body(&mut self) -> Vec<SseEvent> {
        let Some(ev) = self.started.events.recv().await else {
            self.phase = Phase::End;
            return vec![data(&ApiError::unavailable("the engine stopped").body()), done()];
        };
        let Some(&index) = self.started.choices.get(&ev.id) else { return Vec::new() };
        let (decoder, offset) = &mut self.choices[index];
        match ev.kind {
            EventKind::Token(t) => {
                let text = decoder.push(&t.text);
                let chunk = self.shape.chunk(&self.ready, index, &text, Some(&t), *offset, None);
                *offset += self.ready.piece(t.token).len();
                vec![data(&chunk)]
            }
            EventKind::Done(d) => {
                let mut text = decoder.push(&d.text);
                text.push_str(&decoder.finish());
                let mut out = vec![data(&self.shape.chunk(&self.ready, index, &text, None, *offset, Some(finish_reason(d.reason))))];
                self.open -= 1;
                self.n_generated += d.n_generated;
                if index % self.shape.n.max(1) == 0 {
                    self.n_cached += d.n_cached;
                }
                if self.open > 0 {
                    return out;
                }
                self.phase = Phase::End;
                if self.include_usage {
                    let mut m = self.shape.envelope(true, json!([]));
                    m.insert("usage".to_owned(), Shape::usage(self.started.n_prompt, self.n_generated, self.n_cached));
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
        let outs = crate::generate::collect(started).await?;
        return Ok(axum::Json(shape.full(&ready, &outs, n_prompt)).into_response());
    }
    let n = started.n_choices();
    let choices = (0..n).map(|_| (Utf8Decoder::default(), 0)).collect();
    let st = StreamState { started, shape, ready, choices, open: n, n_generated: 0, n_cached: 0, include_usage, phase: Phase::Start };
    let events = stream::unfold(st, |mut st| async move { st.next().await.map(|v| (v, st)) })
        .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(events).into_response())
}
