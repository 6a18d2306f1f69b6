//! One generation, from prompt to events: tokenizing on the engine thread, submitting with a sink
//! that never blocks (an unbounded channel: the engine never waits on a client, and a dropped
//! receiver, a client gone, cancels the sequence and frees its KV cells), timing tokens for the
//! metrics, and turning token bytes into UTF-8 text (a character may span tokens).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use iapt_engine::{Event, EventKind, EventSink, FinishReason, Finished, Request, SeqId, TokenOut};
use iapt_llama::Token;
use prometheus::{Histogram, IntCounter, IntCounterVec};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::Common;
use crate::error::ApiError;
use crate::metrics::{InFlight, Metrics};
use crate::state::{blocking, Ready};

/// What to tokenize.
pub(crate) enum Input {
    /// Completion text: the model's tokenizer, BOS as the model says, special-token text parsed
    /// into those tokens (as llama-server and `iapt run --prompt`).
    Text(String),
    /// Chat messages: the server's chat template ([`iapt_engine::ChatTemplate`]) with the assistant
    /// prefix, then tokenized with its special tokens parsed (as `iapt run --chat`).
    Chat(Vec<(String, String)>),
}

/// Tokenizes `input` on the engine thread.
pub(crate) async fn tokenize(ready: &Arc<Ready>, input: Input) -> Result<Vec<Token>, ApiError> {
    let input = match input {
        Input::Text(t) => Ok(t),
        Input::Chat(msgs) => {
            let template =
                ready.chat.clone().map_err(|why| ApiError::invalid("messages", format!("{why}; or use /v1/completions with a prompt")))?;
            Err((msgs, template))
        }
    };
    let r = ready.clone();
    let res = blocking(move || {
        r.engine.with_model(move |m| match input {
            Ok(text) => m.tokenize(&text, true, true).map_err(|e| ("prompt", format!("cannot tokenize: {e}"))),
            Err((msgs, template)) => {
                let pairs: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                let rendered =
                    template.render(m, &pairs).map_err(|e| ("messages", format!("the chat template refuses these messages: {e}")))?;
                m.tokenize(&rendered.text, rendered.add_special, true).map_err(|e| ("messages", format!("cannot tokenize: {e}")))
            }
        })
    })
    .await?;
    match res {
        Ok(Ok(tokens)) => Ok(tokens),
        Ok(Err((field, why))) => Err(ApiError::invalid(field, why)),
        Err(e) => Err(ApiError::from_engine(e, "prompt", "logprobs")),
    }
}

/// An HTTP request's generations: one engine request per prompt, each of `n` choices, all sending
/// their events to one channel; its place in the in-flight gauge until dropped. Dropping it
/// cancels every choice (the sinks see the channel closed).
pub(crate) struct Started {
    pub events: UnboundedReceiver<Event>,
    /// Each choice's index in the response (`prompt index * n + choice`), by sequence id.
    pub choices: HashMap<SeqId, usize>,
    /// Prompt tokens of every prompt (each counted once, whatever `n`).
    pub n_prompt: usize,
    tx: Option<UnboundedSender<Event>>,
    _in_flight: InFlight,
}

impl Started {
    /// No submission yet.
    pub fn new(metrics: &Metrics, model: &str) -> Started {
        let (tx, events) = unbounded_channel();
        Started { events, choices: HashMap::new(), n_prompt: 0, tx: Some(tx), _in_flight: InFlight::new(metrics, model) }
    }

    /// Choices in the response.
    pub fn n_choices(&self) -> usize {
        self.choices.len()
    }

    /// Submits `job` as prompt `index` of the request (its choices get indexes `index * n ..`).
    pub async fn submit(&mut self, ready: &Arc<Ready>, metrics: &Metrics, job: Job, index: usize) -> Result<(), ApiError> {
        let tx = self.tx.clone().ok_or_else(|| ApiError::unavailable("the request was closed"))?;
        let (n, n_prompt) = (job.common.n, job.prompt.len());
        let first = start(ready, metrics, job, tx).await?;
        self.choices.extend((0..n).map(|j| (SeqId(first.0 + j as u64), index * n + j)));
        self.n_prompt += n_prompt;
        Ok(())
    }

    /// Every submission made: the channel closes once their sinks are gone.
    pub fn sealed(mut self) -> Started {
        self.tx = None;
        self
    }
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

/// Submits `job` with its events going to `tx`; the engine's refusals become client errors naming
/// the field. Returns the first choice's id.
pub(crate) async fn start(ready: &Arc<Ready>, metrics: &Metrics, job: Job, tx: UnboundedSender<Event>) -> Result<SeqId, ApiError> {
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
        n: c.n,
        structured: c.structured.clone(),
        ..Request::new(job.prompt, 1)
    };
    let sink = Box::new(TimedSink::new(metrics, &job.model, tx));
    let r = ready.clone();
    let fields = job.fields;
    let first =
        blocking(move || r.engine.submit_to(req, sink)).await?.map_err(|e| ApiError::from_engine(e, fields.prompt, fields.logprobs))?;
    metrics.prompt_tokens.with_label_values(&[&job.model]).inc_by(n_prompt as u64);
    Ok(first)
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
    /// Each choice's last token time.
    last: HashMap<SeqId, Instant>,
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
            last: HashMap::new(),
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
                match self.last.insert(ev.id, now) {
                    None => self.ttft.observe((now - self.t0).as_secs_f64()),
                    Some(l) => self.itl.observe((now - l).as_secs_f64()),
                }
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

/// Waits for the end of every choice of `s`: the outputs in choice order, or the first failure
/// (the other choices are then cancelled with `s`).
pub(crate) async fn collect(mut s: Started) -> Result<Vec<Output>, ApiError> {
    let n = s.n_choices();
    let mut partial: Vec<(Vec<u8>, Vec<TokenOut>)> = (0..n).map(|_| Default::default()).collect();
    let mut outs: Vec<Option<Output>> = (0..n).map(|_| None).collect();
    let mut open = n;
    while open > 0 {
        let Some(ev) = s.events.recv().await else { return Err(ApiError::unavailable("the engine stopped")) };
        let Some(&i) = s.choices.get(&ev.id) else { continue };
        match ev.kind {
            EventKind::Token(t) => {
                partial[i].0.extend_from_slice(&t.text);
                partial[i].1.push(t);
            }
            EventKind::Done(done) => {
                let (mut bytes, tokens) = std::mem::take(&mut partial[i]);
                bytes.extend_from_slice(&done.text);
                outs[i] = Some(Output { text: String::from_utf8_lossy(&bytes).into_owned(), tokens, done });
                open -= 1;
            }
            EventKind::Failed(e) => return Err(ApiError::from_engine(e, "prompt", "logprobs")),
        }
    }
    Ok(outs.into_iter().flatten().collect())
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
