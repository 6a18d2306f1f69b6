//! Exact-match evaluation of a base model with and without an IAPT adapter, the way the embedded
//! demo (`converters/python/demo`) measures it in PyTorch:
//!
//! - prompt: `[BOS] + tokens(instruction) + [slot] * m` (the model's SentencePiece tokenizer, BOS as
//!   the model says; the m slot ids are the soft-token positions);
//! - with an adapter the session appends its own m soft tokens after the instruction, so the slot
//!   ids are dropped and the rows at those positions are replaced at every layer; without one the
//!   slot ids are fed as ordinary tokens (the base was trained with them as a separator);
//! - greedy decoding; stop at an end-of-generation token or a token whose text contains a newline
//!   (neither is part of the answer), or after [`PromptFormat::max_new_tokens`] tokens;
//! - exact match: the answer's text with leading and trailing whitespace stripped equals the
//!   expected response.
//!
//! Reading the examples (JSON lines) is the caller's job: [`Example`] is the parsed row.

use iapt_llama::{argmax, LlamaError, Model, Session, Token};

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
    /// llama.cpp or the adapter failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
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

/// Decodes the greedy answer to a full prompt (slots included, as [`build_prompt`] makes it).
pub fn answer(session: &mut Session<'_>, model: &Model, fmt: &PromptFormat, prompt: &[Token]) -> Result<Answer, EvalError> {
    let m = session.n_soft_tokens();
    let feed = if m == 0 {
        prompt
    } else {
        if m != fmt.n_slots {
            return Err(EvalError::SlotCount { adapter: m, format: fmt.n_slots });
        }
        // The session adds its own m soft tokens after the instruction.
        &prompt[..prompt.len().saturating_sub(m)]
    };
    let mut logits = session.prefill(feed)?;
    let mut tokens = Vec::new();
    let mut bytes = Vec::new();
    let stop = loop {
        if tokens.len() == fmt.max_new_tokens {
            break Stop::Length;
        }
        let tok = argmax(&logits);
        if model.is_eog(tok) {
            break Stop::EndOfGeneration;
        }
        let piece = model.token_bytes(tok);
        if piece.contains(&b'\n') {
            break Stop::Newline;
        }
        tokens.push(tok);
        bytes.extend_from_slice(&piece);
        if tokens.len() == fmt.max_new_tokens {
            break Stop::Length;
        }
        logits = session.step(tok)?;
    };
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
    session: &mut Session<'_>,
    model: &Model,
    fmt: &PromptFormat,
    examples: &[Example],
    on_each: &mut dyn FnMut(usize, &Example, &Answer, bool),
) -> Result<Score, EvalError> {
    let mut score = Score::default();
    for (i, ex) in examples.iter().enumerate() {
        let prompt = example_prompt(model, fmt, i, ex)?;
        let a = answer(session, model, fmt, &prompt)?;
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
