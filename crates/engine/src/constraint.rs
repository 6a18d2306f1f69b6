//! Structured output: a request's answer constrained to JSON (any object, or one that a JSON schema
//! describes), with `llguidance`, the constrained-decoding library made for it (the one llama.cpp
//! and vLLM can use). At every step the matcher gives the set of tokens that keep the output a
//! prefix of a valid document; the other tokens' logits are set to -inf before the sampler chain
//! draws, and the drawn token is fed back to the matcher. Once the document is complete only the
//! end-of-sequence token is allowed, so the answer ends there.
//!
//! The vocabulary is indexed once per engine, on the first constrained request (`Vocab`):
//! each token's bytes, with llama.cpp's control tokens (BOS, `<|im_end|>`, ...) marked special so
//! that no grammar can produce them as text. Documents are compact (no whitespace between JSON
//! tokens: llguidance's `whitespace_flexible: false`), so a weak model cannot fill its budget
//! with blanks; a schema's own `x-guidance` options take precedence.
//!
//! llguidance asserts in places; every call into it is made under `catch_unwind`, so a schema or a
//! state it cannot handle fails its request alone, never the engine.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use iapt_llama::{Model, Token};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::error::EngineError;

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Structured {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON document valid against this JSON schema (its text; OpenAI's `json_schema`).
    JsonSchema(String),
}

impl Structured {
    /// The schema text a matcher is compiled from.
    fn schema(&self) -> Result<serde_json::Value, EngineError> {
        let mut schema = match self {
            Structured::JsonObject => serde_json::json!({"type": "object"}),
            Structured::JsonSchema(text) => {
                serde_json::from_str(text).map_err(|e| EngineError::BadSchema { detail: format!("not JSON: {e}") })?
            }
        };
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        }
        Ok(schema)
    }
}

/// The model's vocabulary, indexed for llguidance.
pub(crate) struct Vocab {
    factory: Arc<ParserFactory>,
    n_vocab: usize,
}

impl Vocab {
    /// Indexes `model`'s vocabulary (tens of milliseconds for 150k tokens).
    pub fn new(model: &Model) -> Result<Vocab, EngineError> {
        let n_vocab = model.n_vocab();
        let eos = model.eos().or_else(|| (0..n_vocab as Token).find(|&t| model.is_eog(t)));
        let Some(eos) = eos else {
            return Err(EngineError::BadSchema { detail: "the model has no end-of-sequence token to end a document with".to_owned() });
        };
        let words: Vec<Vec<u8>> = (0..n_vocab as Token)
            .map(|t| match model.is_control(t) || model.is_eog(t) {
                true => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &model.token_text(t)].concat(),
                false => model.token_bytes(t),
            })
            .collect();
        let built = catch_unwind(AssertUnwindSafe(|| {
            let info = TokRxInfo::new(n_vocab as u32, eos as u32);
            let env = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
            let caps = InferenceCapabilities { ff_tokens: false, conditional_ff_tokens: false, backtrack: false, fork: false };
            let mut f = ParserFactory::new(&(env as _), caps, &llguidance::earley::SlicedBiasComputer::general_slices())
                .map_err(|e| e.to_string())?;
            f.quiet();
            Ok::<_, String>(f)
        }));
        match built {
            Ok(Ok(factory)) => Ok(Vocab { factory: Arc::new(factory), n_vocab }),
            Ok(Err(e)) => Err(EngineError::BadSchema { detail: format!("llguidance cannot index the vocabulary: {e}") }),
            Err(_) => Err(EngineError::BadSchema { detail: "llguidance cannot index the vocabulary (it panicked)".to_owned() }),
        }
    }

    /// A matcher for `what`, at the start of a document; a schema llguidance cannot compile is
    /// [`EngineError::BadSchema`] with its message.
    pub fn matcher(&self, what: &Structured) -> Result<Constraint, EngineError> {
        let schema = what.schema()?;
        let made = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(TopLevelGrammar::from_json_schema(schema))));
        match made {
            Ok(Ok(parser)) => Ok(Constraint { matcher: Matcher::new(Ok(parser)), n_vocab: self.n_vocab }),
            Ok(Err(e)) => Err(EngineError::BadSchema { detail: e.to_string() }),
            Err(_) => Err(EngineError::BadSchema { detail: "llguidance cannot compile this schema (it panicked)".to_owned() }),
        }
    }
}

/// One sequence's position in its document.
pub(crate) struct Constraint {
    matcher: Matcher,
    n_vocab: usize,
}

impl Constraint {
    /// A copy at the same position (for a request's other choices).
    pub fn fork(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone(), n_vocab: self.n_vocab }
    }

    /// `logits` with every token the document cannot take next set to -inf.
    pub fn masked(&mut self, logits: &[f32]) -> Result<Vec<f32>, String> {
        let mask = catch_unwind(AssertUnwindSafe(|| self.matcher.compute_mask_or_eos()))
            .map_err(|_| "llguidance failed (it panicked)".to_owned())?
            .map_err(|e| e.to_string())?;
        if mask.num_set() == 0 {
            return Err("no token can continue the document".to_owned());
        }
        let mut out = logits.to_vec();
        for (i, l) in out.iter_mut().enumerate().take(self.n_vocab) {
            if !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(out)
    }

    /// Moves past `token` (one the mask allowed).
    pub fn accept(&mut self, token: Token) -> Result<(), String> {
        catch_unwind(AssertUnwindSafe(|| self.matcher.consume_token(token as u32)))
            .map_err(|_| "llguidance failed (it panicked)".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// The document is complete (only end-of-sequence may follow).
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}
