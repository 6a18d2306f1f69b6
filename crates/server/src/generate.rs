//! One generation, from prompt to events: tokenizing on the engine thread, submitting with a sink
//! that never blocks (an unbounded channel: the engine never waits on a client, and a dropped
//! receiver, a client gone, cancels the sequence and frees its KV cells), timing tokens for the
//! metrics, and turning token bytes into UTF-8 text (a character may span tokens).

use std::sync::Arc;
use std::time::Instant;

use iapt_engine::{Event, EventKind, EventSink, FinishReason, Finished, Request, TokenOut};
use iapt_llama::{LlamaError, Token};
use prometheus::{Histogram, IntCounter, IntCounterVec};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::Common;
use crate::error::ApiError;
use crate::metrics::{InFlight, Metrics};
use crate::state::{blocking, Ready};

/// What to tokenize.
pub(crate) enum Input {
    /// Completion text: the model's tokenizer, BOS as the model says, special-token text kept as text
    /// (as `iapt run --prompt`).
    Text(String),
    /// Chat messages: the model's chat template with the assistant prefix, then tokenized with its
    /// special tokens parsed (as `iapt run --chat`).
    Chat(Vec<(String, String)>),
}

/// Tokenizes `input` on the engine thread.
pub(crate) async fn tokenize(ready: &Arc<Ready>, input: Input) -> Result<Vec<Token>, ApiError> {
    let r = ready.clone();
    let res = blocking(move || {
        r.engine.with_model(move |m| match input {
            Input::Text(t) => m.tokenize(&t, true, false).map_err(|e| ("prompt", e)),
            Input::Chat(msgs) => {
                let pairs: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                let text = m.apply_chat_messages(&pairs).map_err(|e| ("messages", e))?;
                m.tokenize(&text, true, true).map_err(|e| ("messages", e))
            }
        })
    })
    .await?;
    match res {
        Ok(Ok(tokens)) => Ok(tokens),
        Ok(Err((field, LlamaError::ChatTemplate { detail }))) => {
            Err(ApiError::invalid(field, format!("cannot apply the chat template: {detail}; use /v1/completions with a prompt")))
        }
        Ok(Err((field, e))) => Err(ApiError::invalid(field, format!("cannot tokenize: {e}"))),
        Err(e) => Err(ApiError::from_engine(e, "prompt", "logprobs")),
    }
}

/// A submitted request: its events, and its place in the in-flight gauge until dropped.
pub(crate) struct Started {
    pub events: UnboundedReceiver<Event>,
    pub n_prompt: usize,
    _in_flight: InFlight,
}

/// Which fields the engine's errors are about, per endpoint.
#[derive(Clone, Copy)]
pub(crate) struct Fields {
    pub prompt: &'static str,
    pub logprobs: &'static str,
}

/// A request ready to submit.
#[derive(Clone)]
pub(crate) struct Job {
    /// The `model` asked for (its label in the metrics).
    pub model: String,
    /// The adapter it selects (`None`: the base model).
    pub adapter: Option<String>,
    pub prompt: Vec<Token>,
    pub common: Common,
    /// `max_tokens` when the request gives none; `None`: all the context the sequence has left.
    pub default_max: Option<usize>,
    pub fields: Fields,
}

/// Submits `job`; the engine's refusals become client errors naming the field.
pub(crate) async fn start(ready: &Arc<Ready>, metrics: &Metrics, job: Job) -> Result<Started, ApiError> {
    let room = ready.seq_ctx.saturating_sub(job.prompt.len() + ready.n_soft(job.adapter.as_deref())).max(1);
    let n_prompt = job.prompt.len();
    let c = &job.common;
    let req = Request {
        adapter: job.adapter,
        max_tokens: c.max_tokens.or(job.default_max).unwrap_or(room),
        sampling: c.sampling.clone(),
        stop: c.stop.clone(),
        logprobs: c.logprobs,
        stop_at_eog: !c.ignore_eos,
        ..Request::new(job.prompt, 1)
    };
    let (tx, events) = unbounded_channel();
    let sink = Box::new(TimedSink::new(metrics, &job.model, tx));
    let r = ready.clone();
    let fields = job.fields;
    blocking(move || r.engine.submit_to(req, sink)).await?.map_err(|e| ApiError::from_engine(e, fields.prompt, fields.logprobs))?;
    metrics.prompt_tokens.with_label_values(&[&job.model]).inc_by(n_prompt as u64);
    Ok(Started { events, n_prompt, _in_flight: InFlight::new(metrics, &job.model) })
}

/// A request's sink on the engine thread: forwards events to the handler over an unbounded channel
/// (never blocks) and times tokens for the metrics. Its handler gone (the client disconnected),
/// it says so before the next step and the engine cancels the request.
struct TimedSink {
    tx: UnboundedSender<Event>,
    model: String,
    requests: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    out: IntCounter,
    t0: Instant,
    last: Option<Instant>,
}

impl TimedSink {
    fn new(m: &Metrics, model: &str, tx: UnboundedSender<Event>) -> TimedSink {
        TimedSink {
            tx,
            model: model.to_owned(),
            requests: m.requests.clone(),
            ttft: m.ttft.with_label_values(&[model]),
            itl: m.itl.with_label_values(&[model]),
            out: m.completion_tokens.with_label_values(&[model]),
            t0: Instant::now(),
            last: None,
        }
    }

    fn count(&self, outcome: &str) {
        self.requests.with_label_values(&[&self.model, outcome]).inc();
    }
}

impl EventSink for TimedSink {
    fn send(&mut self, ev: Event) -> bool {
        let outcome = match &ev.kind {
            EventKind::Token(_) => {
                let now = Instant::now();
                match self.last {
                    None => self.ttft.observe((now - self.t0).as_secs_f64()),
                    Some(l) => self.itl.observe((now - l).as_secs_f64()),
                }
                self.last = Some(now);
                self.out.inc();
                None
            }
            EventKind::Done(d) => Some(finish_reason(d.reason)),
            EventKind::Failed(_) => Some("error"),
        };
        let delivered = self.tx.send(ev).is_ok();
        match (delivered, outcome) {
            (true, Some(o)) => self.count(o),
            (false, _) => self.count("cancelled"),
            (true, None) => {}
        }
        delivered
    }

    fn is_alive(&self) -> bool {
        let alive = !self.tx.is_closed();
        if !alive {
            self.count("cancelled");
        }
        alive
    }
}

/// OpenAI's `finish_reason`.
pub(crate) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eog | FinishReason::Stop { .. } => "stop",
        FinishReason::Length => "length",
    }
}

/// A whole generation, for a response that is not streamed.
pub(crate) struct Output {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub done: Finished,
}

/// Waits for the end of `s`.
pub(crate) async fn collect(mut s: Started) -> Result<Output, ApiError> {
    let (mut bytes, mut tokens) = (Vec::new(), Vec::new());
    while let Some(ev) = s.events.recv().await {
        match ev.kind {
            EventKind::Token(t) => {
                bytes.extend_from_slice(&t.text);
                tokens.push(t);
            }
            EventKind::Done(done) => {
                bytes.extend_from_slice(&done.text);
                return Ok(Output { text: String::from_utf8_lossy(&bytes).into_owned(), tokens, done });
            }
            EventKind::Failed(e) => return Err(ApiError::from_engine(e, "prompt", "logprobs")),
        }
    }
    Err(ApiError::unavailable("the engine stopped"))
}

/// Turns a byte stream into text piece by piece: complete characters are released, an incomplete
/// one at the end is held, and invalid bytes become U+FFFD exactly as `String::from_utf8_lossy`
/// of the whole would make them.
#[derive(Debug, Default)]
pub(crate) struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Adds bytes; returns the text they complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"));
                    match e.error_len() {
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// The end of the stream: what is held, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_to_the_lossy_whole_at_every_split() {
        let whole: Vec<u8> = [b"ab".as_slice(), "é€😀".as_bytes(), &[0xff, b'x', 0xe2, 0x82], b"y", &[0xf0, 0x9f]].concat();
        let want = String::from_utf8_lossy(&whole).into_owned();
        for a in 0..=whole.len() {
            for b in a..=whole.len() {
                let mut d = Utf8Decoder::default();
                let got = d.push(&whole[..a]) + &d.push(&whole[a..b]) + &d.push(&whole[b..]) + &d.finish();
                assert_eq!(got, want, "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn an_incomplete_character_is_held_until_complete() {
        let mut d = Utf8Decoder::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push(&euro[..2]), "");
        assert_eq!(d.push(&euro[2..]), "€");
    }
}
