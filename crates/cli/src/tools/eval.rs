//! Exact-match evaluation of a base model with and without an IAPT adapter, the way the embedded
//! demo (`converters/python/demo`) measures it in PyTorch:
//!
//! - prompt: `[BOS] + tokens(instruction) + [slot] * m` (the model's SentencePiece tokenizer, BOS as
//!   the model says; the m slot ids are the soft-token positions);
//! - with an adapter the engine appends its own m soft tokens after the instruction, so the slot
//!   ids are dropped and the rows at those positions are replaced at every layer; without one the
//!   slot ids are fed as ordinary tokens (the base was trained with them as a separator);
//! - greedy decoding; stop at an end-of-generation token or a token whose text contains a newline
//!   (neither is part of the answer), or after [`PromptFormat::max_new_tokens`] tokens;
//! - exact match: the answer's text with leading and trailing whitespace stripped equals the
//!   expected response.
//!
//! Reading the examples (JSON lines) is the caller's job: [`Example`] is the parsed row.

use iapt_engine::{Engine, EngineError, FinishReason, Request};
use iapt_llama::{LlamaError, Model, Token};

/// How a prompt is built and an answer decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptFormat {
    /// The token id of a soft-token slot.
    pub slot_id: Token,
    /// The number of slots after the instruction (the adapter's `n_soft_tokens`).
    pub n_slots: usize,
    /// Tokens generated at most per answer.
    pub max_new_tokens: usize,
}

/// One evaluation example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The instruction text (tokenized with the model's tokenizer).
    pub instruction: String,
    /// The expected answer.
    pub response: String,
    /// The full prompt ids the data set's authors used (BOS and slots included), if given; the
    /// tokenization is checked against them.
    pub prompt_ids: Option<Vec<Token>>,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// An end-of-generation token.
    EndOfGeneration,
    /// A token whose text contains a newline.
    Newline,
    /// [`PromptFormat::max_new_tokens`] tokens were generated.
    Length,
}

/// A decoded answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The generated tokens (the stop token excluded).
    pub tokens: Vec<Token>,
    /// Their text, whitespace-stripped at both ends (invalid UTF-8 replaced).
    pub text: String,
    /// Why decoding stopped.
    pub stop: Stop,
}

/// Exact-match counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Score {
    /// Examples evaluated.
    pub n: usize,
    /// Examples answered exactly.
    pub correct: usize,
}

impl Score {
    /// Accuracy in percent (0 for no examples).
    pub fn percent(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.n as f64
        }
    }
}

/// Evaluation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// llama.cpp failed (tokenizing).
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// The engine refused or failed a request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model's tokenizer does not give the prompt ids the data set carries.
    #[error(
        "example {index} ({instruction:?}): the model's tokenizer gives prompt ids {got:?} but the data says {expected:?}; \
         the data was made with another tokenizer or prompt format (check the base model and the slot id)"
    )]
    PromptMismatch {
        /// 0-based example index.
        index: usize,
        /// The instruction.
        instruction: String,
        /// The ids in the data.
        expected: Vec<Token>,
        /// The ids built here.
        got: Vec<Token>,
    },
    /// The adapter's soft-token count differs from the prompt format's slot count.
    #[error("the adapter has {adapter} soft tokens but the prompt format has {format} slots; use the adapter the data was made for")]
    SlotCount {
        /// The adapter's m.
        adapter: usize,
        /// The format's slot count.
        format: usize,
    },
}

/// Builds the full prompt ids: BOS (if the model adds one) + the instruction's tokens + the slots.
pub fn build_prompt(model: &Model, fmt: &PromptFormat, instruction: &str) -> Result<Vec<Token>, EvalError> {
    let mut ids = model.tokenize(instruction, true, false)?;
    ids.extend(std::iter::repeat_n(fmt.slot_id, fmt.n_slots));
    Ok(ids)
}

/// Builds an example's prompt and checks it against the example's `prompt_ids` when it has them.
pub fn example_prompt(model: &Model, fmt: &PromptFormat, index: usize, ex: &Example) -> Result<Vec<Token>, EvalError> {
    let got = build_prompt(model, fmt, &ex.instruction)?;
    match &ex.prompt_ids {
        Some(expected) if *expected != got => {
            Err(EvalError::PromptMismatch { index, instruction: ex.instruction.clone(), expected: expected.clone(), got })
        }
        _ => Ok(got),
    }
}

/// Who answers: the engine and, for the adapter's runs, the name it is loaded under and its m.
pub struct Answerer<'e, 'm> {
    /// The engine (one slot, idle between answers).
    pub engine: &'e mut Engine<'m>,
    /// The adapter's name in the engine and its soft tokens, or `None` for the base alone.
    pub adapter: Option<(String, usize)>,
}

/// Decodes the greedy answer to a full prompt (slots included, as [`build_prompt`] makes it): the
/// engine's greedy sampler chain, stopping at an end-of-generation token, at a token whose text
/// holds a newline (the stop string `"\n"`; the tokens before it are the answer) or after
/// `max_new_tokens`.
pub fn answer(who: &mut Answerer<'_, '_>, model: &Model, fmt: &PromptFormat, prompt: &[Token]) -> Result<Answer, EvalError> {
    let feed = match &who.adapter {
        None => prompt,
        Some((_, m)) if *m != fmt.n_slots => return Err(EvalError::SlotCount { adapter: *m, format: fmt.n_slots }),
        // The engine adds its own m soft tokens after the instruction.
        Some((_, m)) => &prompt[..prompt.len().saturating_sub(*m)],
    };
    let mut req = Request::new(feed.to_vec(), fmt.max_new_tokens.max(1));
    req.adapter = who.adapter.as_ref().map(|(name, _)| name.clone());
    req.stop = vec!["\n".to_owned()];
    let done = who.engine.complete(req, &mut |_| {})?;
    let mut tokens: Vec<Token> = done.tokens.iter().map(|t| t.token).collect();
    tokens.truncate(fmt.max_new_tokens);
    let stop = match done.finished.reason {
        _ if fmt.max_new_tokens == 0 => Stop::Length,
        FinishReason::Eog => Stop::EndOfGeneration,
        FinishReason::Stop { .. } => Stop::Newline,
        FinishReason::Length => Stop::Length,
    };
    let bytes: Vec<u8> = tokens.iter().flat_map(|&t| model.token_bytes(t)).collect();
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    Ok(Answer { tokens, text, stop })
}

/// Whether an answer matches the expected response exactly (the answer is already stripped).
pub fn exact_match(answer: &str, expected: &str) -> bool {
    answer.trim() == expected
}

/// Answers every example and counts exact matches; `on_each(index, example, answer, correct)` is
/// called after each one (for progress or a transcript).
pub fn evaluate(
    who: &mut Answerer<'_, '_>,
    model: &Model,
    fmt: &PromptFormat,
    examples: &[Example],
    on_each: &mut dyn FnMut(usize, &Example, &Answer, bool),
) -> Result<Score, EvalError> {
    let mut score = Score::default();
    for (i, ex) in examples.iter().enumerate() {
        let prompt = example_prompt(model, fmt, i, ex)?;
        let a = answer(who, model, fmt, &prompt)?;
        let ok = exact_match(&a.text, &ex.response);
        score.n += 1;
        score.correct += usize::from(ok);
        on_each(i, ex, &a, ok);
    }
    Ok(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_strips_the_answer_only() {
        assert!(exact_match("  = sun owl cake ", "= sun owl cake"));
        assert!(!exact_match("= sun owl cake", "= sun owl"));
        assert!(!exact_match("= sun  owl cake", "= sun owl cake"));
    }

    #[test]
    fn percent_handles_empty_and_counts() {
        assert_eq!(Score::default().percent(), 0.0);
        assert_eq!(Score { n: 40, correct: 30 }.percent(), 75.0);
    }
}
