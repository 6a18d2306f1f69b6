//! The request bodies of `/v1/completions` and `/v1/chat/completions`, parsed so that every error
//! names its field: the JSON is read with `serde_path_to_error` (a wrong type says where), fields
//! that take several shapes (`prompt`, `stop`, `content`, `logprobs`) are read from JSON values by
//! hand, and every value is checked before anything reaches the engine.
//!
//! Extras beyond OpenAI's fields: llama.cpp's `top_k`, `min_p`, `repeat_penalty`, and vLLM's
//! `ignore_eos`. Fields the server does not know are ignored, as OpenAI's API does; fields it knows but cannot
//! honour (`n` > 1, `echo: true`, `best_of` > 1, `suffix`, `logit_bias`, tools) are refused by name.

use iapt_engine::MAX_LOGPROBS;
use iapt_llama::{SamplerSettings, Token};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Every field either endpoint reads (one struct, so that a type error names the field directly).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Body {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u64>,
    pub n: Option<u64>,
    pub echo: Option<bool>,
    pub best_of: Option<u64>,
    pub suffix: Option<String>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Vec<Value>>,
    pub ignore_eos: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    pub role: Option<String>,
    #[serde(default)]
    pub content: Value,
}

/// What both endpoints share once checked.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub sampling: SamplerSettings,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
    /// vLLM's extra: generate past end-of-generation tokens (up to `max_tokens`).
    pub ignore_eos: bool,
}

/// A `/v1/completions` prompt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prompt {
    /// Text, tokenized with the model's tokenizer (BOS as the model says).
    Text(String),
    /// Token ids, fed as given.
    Tokens(Vec<Token>),
}

/// Parses a body: malformed JSON is a 400 without a field; a wrong type names its path.
pub(crate) fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // serde would read a struct from an array too, by position.
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let body: Body = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => ApiError::invalid(path.clone(), format!("{path}: {inner}")),
            serde_json::error::Category::Data => ApiError::bad_request(format!("the body must be a JSON object: {inner}")),
            _ => ApiError::bad_request(format!("malformed JSON: {inner}")),
        }
    })?;
    Ok(body)
}

fn refuse_unsupported(b: &Body) -> Result<(), ApiError> {
    if b.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "n must be 1: one choice per request"));
    }
    if b.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo must be false: the prompt is not returned"));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of", "best_of must be 1"));
    }
    if b.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix (insertion) is not supported"));
    }
    if b.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid("logit_bias", "logit_bias is not supported"));
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tools are not supported"));
    }
    Ok(())
}

/// The checked fields both endpoints share; `logprobs` is the count already read by the endpoint.
pub(crate) fn common(b: &Body, logprobs: Option<usize>) -> Result<Common, ApiError> {
    refuse_unsupported(b)?;
    let model = b.model.clone().ok_or_else(|| ApiError::invalid("model", "model is required: the base model's id or an adapter's name"))?;
    let (max_field, max) = match (b.max_tokens, b.max_completion_tokens) {
        (Some(n), _) => ("max_tokens", Some(n)),
        (None, n) => ("max_completion_tokens", n),
    };
    if max == Some(0) {
        return Err(ApiError::invalid(max_field, format!("{max_field} must be at least 1")));
    }
    let seed = match b.seed {
        None => SamplerSettings::default().seed,
        Some(s) => u32::try_from(s).map_err(|_| ApiError::invalid("seed", format!("seed = {s}: must be 0 ..= {}", u32::MAX)))?,
    };
    let d = SamplerSettings::default();
    let sampling = SamplerSettings {
        temperature: b.temperature.unwrap_or(1.0),
        top_k: b.top_k.unwrap_or(d.top_k),
        top_p: b.top_p.unwrap_or(d.top_p),
        min_p: b.min_p.unwrap_or(d.min_p),
        repeat_penalty: b.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: b.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: b.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed,
        ..d
    };
    sampling.validate().map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    Ok(Common {
        model,
        max_tokens: max.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        sampling,
        stop: stop_strings(b.stop.as_ref())?,
        stream: b.stream.unwrap_or(false),
        include_usage: b.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
        ignore_eos: b.ignore_eos.unwrap_or(false),
    })
}

/// `stop`: a string or an array of at most [`MAX_STOP`] non-empty strings.
fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(str::to_owned).ok_or_else(|| ApiError::invalid(format!("stop[{i}]"), "stop strings must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop strings")));
    }
    if let Some(i) = list.iter().position(String::is_empty) {
        return Err(ApiError::invalid(format!("stop[{i}]"), "stop strings must not be empty"));
    }
    Ok(list)
}

/// `/v1/completions`: the prompt (one string or one array of token ids) and `logprobs` (an
/// integer 0..=[`MAX_LOGPROBS`], the top-N count).
pub(crate) fn completion(b: &Body) -> Result<(Common, Prompt), ApiError> {
    if b.messages.is_some() {
        return Err(ApiError::invalid("messages", "messages belong to /v1/chat/completions; /v1/completions takes a prompt"));
    }
    let logprobs = match &b.logprobs {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_LOGPROBS => Some(n as usize),
            _ => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be an integer 0 ..= {MAX_LOGPROBS} (top log-probabilities per token)"),
                ))
            }
        },
    };
    let common = common(b, logprobs)?;
    let prompt = prompt(b.prompt.as_ref())?;
    Ok((common, prompt))
}

fn prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let one = "prompt must be a string or an array of token ids (one prompt per request)";
    match v {
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_owned())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => prompt(Some(&a[0])),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            let ids = a.iter().enumerate().map(|(i, t)| {
                t.as_i64()
                    .and_then(|t| Token::try_from(t).ok())
                    .ok_or_else(|| ApiError::invalid(format!("prompt[{i}]"), format!("{t} is not a token id")))
            });
            Ok(Prompt::Tokens(ids.collect::<Result<_, _>>()?))
        }
        Some(_) => Err(ApiError::invalid("prompt", one)),
    }
}

/// `/v1/chat/completions`: the messages as `(role, text)` and `logprobs` (a boolean) with
/// `top_logprobs` (0..=[`MAX_LOGPROBS`]).
pub(crate) fn chat(b: &Body) -> Result<(Common, Vec<(String, String)>), ApiError> {
    if b.prompt.is_some() {
        return Err(ApiError::invalid("prompt", "prompt belongs to /v1/completions; /v1/chat/completions takes messages"));
    }
    let want = match &b.logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(v)) => *v,
        Some(_) => return Err(ApiError::invalid("logprobs", "logprobs must be a boolean (top_logprobs gives the count)")),
    };
    let logprobs = match (want, b.top_logprobs) {
        (false, Some(n)) if n > 0 => return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true")),
        (false, _) => None,
        (true, n) if n.unwrap_or(0) as usize <= MAX_LOGPROBS => Some(n.unwrap_or(0) as usize),
        (true, _) => return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be 0 ..= {MAX_LOGPROBS}"))),
    };
    let common = common(b, logprobs)?;
    let messages = b.messages.as_ref().ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must hold at least one message"));
    }
    let msgs = messages.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<_, _>>()?;
    Ok((common, msgs))
}

fn message(i: usize, m: &Message) -> Result<(String, String), ApiError> {
    let role = match m.role.as_deref().unwrap_or_default() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => return Err(ApiError::invalid(format!("messages[{i}].role"), format!("role {other:?}: give system, user or assistant"))),
    };
    let field = format!("messages[{i}].content");
    let text = match &m.content {
        Value::String(s) => s.clone(),
        Value::Null if role == "assistant" => String::new(),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}[{j}]"),
                            "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ))
                    }
                }
            }
            text
        }
        _ => return Err(ApiError::invalid(field, "content must be a string or an array of text parts")),
    };
    if text.contains('\0') {
        return Err(ApiError::invalid(format!("messages[{i}].content"), "content must not contain NUL characters"));
    }
    Ok((role.to_owned(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str, completion_endpoint: bool) -> ApiError {
        let b = match parse(json.as_bytes()) {
            Ok(b) => b,
            Err(e) => return e,
        };
        if completion_endpoint {
            completion(&b).expect_err(json)
        } else {
            chat(&b).expect_err(json)
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (r#"{"model":"m","prompt":"x","temperature":"hot"}"#, true, Some("temperature")),
            (r#"{"model":"m","prompt":"x","temperature":-1}"#, true, Some("temperature")),
            (r#"{"model":"m","prompt":"x","top_p":0}"#, true, Some("top_p")),
            (r#"{"model":"m","prompt":"x","n":2}"#, true, Some("n")),
            (r#"{"model":"m","prompt":"x","echo":true}"#, true, Some("echo")),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, true, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","max_tokens":-3}"#, true, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","logprobs":21}"#, true, Some("logprobs")),
            (r#"{"model":"m","prompt":"x","stop":["a",""]}"#, true, Some("stop[1]")),
            (r#"{"model":"m","prompt":"x","stop":5}"#, true, Some("stop")),
            (r#"{"model":"m","prompt":"x","seed":-1}"#, true, Some("seed")),
            (r#"{"model":"m","prompt":[1,"a"]}"#, true, Some("prompt")),
            (r#"{"model":"m","prompt":[1,2.5]}"#, true, Some("prompt[1]")),
            (r#"{"model":"m","prompt":["a","b"]}"#, true, Some("prompt")),
            (r#"{"model":"m"}"#, true, Some("prompt")),
            (r#"{"prompt":"x"}"#, true, Some("model")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#, true, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, false, Some("messages")),
            (r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#, false, Some("messages[0].role")),
            (r#"{"model":"m","messages":[{"role":"user","content":3}]}"#, false, Some("messages[0].content")),
            (r#"{"model":"m","messages":[{"content":"x"}]}"#, false, Some("messages[0].role")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#, false, Some("top_logprobs")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":3}"#, false, Some("logprobs")),
            (r#"{"model":"m","prompt":"x","top_k":1.5}"#, true, Some("top_k")),
            (r#"{"model":"m","prompt":"x","stream":"yes"}"#, true, Some("stream")),
            (r#"{"model":"m","prompt":"x""#, true, None),
            (r#"[1,2]"#, true, None),
        ];
        for (json, completion_endpoint, param) in cases {
            let e = err(json, completion_endpoint);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{json}");
            assert_eq!(e.param.as_deref(), param, "{json}: {e}");
        }
    }

    #[test]
    fn good_bodies_parse() {
        let b = parse(br#"{"model":"m","prompt":[3,4],"logprobs":2,"stop":"x","temperature":0,"seed":7,"unknown":1}"#).unwrap();
        let (c, p) = completion(&b).unwrap();
        assert_eq!(p, Prompt::Tokens(vec![3, 4]));
        assert_eq!((c.logprobs, c.stop, c.sampling.seed, c.sampling.temperature), (Some(2), vec!["x".to_owned()], 7, 0.0));
        let b = parse(br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"logprobs":true,"top_logprobs":3}"#).unwrap();
        let (c, m) = chat(&b).unwrap();
        assert_eq!((c.logprobs, m), (Some(3), vec![("user".to_owned(), "ab".to_owned())]));
    }
}
