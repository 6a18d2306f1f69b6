//! llama.cpp's sampler chain, applied to a logits row the caller owns.
//!
//! `llama_sampler_sample` reads the logits of a context row and aborts on a row that did not ask
//! for logits; a batch with several sequences has one such row per sequence, so the chain is
//! applied here with `llama_sampler_apply` to a token-data array built from a copy of the
//! sequence's own row, then the chosen token is accepted (penalties remember it). One chain per
//! sequence: its penalty window and its random state are that sequence's alone, so what it
//! draws does not depend on what else is in the batch.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{shim, Token};
use crate::error::LlamaError;
use crate::sampling::{InvalidSampling, SamplerSettings};

/// A llama.cpp sampler chain for one sequence (see the module documentation).
pub struct SamplerChain {
    ptr: NonNull<sys::llama_sampler>,
    n_vocab: usize,
    /// The candidates, rebuilt from the logits row at every draw.
    data: Vec<sys::llama_token_data>,
}

// SAFETY: a chain is a heap object owned by this value alone (no context, no vocabulary, no
// thread-local state: penalties, top-k/p, min-p, temperature, greedy and dist keep their state in
// the chain), and every method takes `&mut self` or consumes it, so moving it to another thread
// and using it there is sound.
unsafe impl Send for SamplerChain {}

impl SamplerChain {
    /// A chain for a vocabulary of `n_vocab` tokens with `settings` (checked first: llama.cpp does
    /// not check them).
    pub fn new(n_vocab: usize, settings: &SamplerSettings) -> Result<SamplerChain, InvalidSampling> {
        settings.validate()?;
        let n_vocab_i32 = i32::try_from(n_vocab).map_err(|_| InvalidSampling {
            field: "n_vocab",
            value: n_vocab.to_string(),
            rule: "at most i32::MAX",
        })?;
        super::init();
        let s = settings;
        // SAFETY: no preconditions; returns a plain struct of defaults.
        let params = unsafe { sys::llama_sampler_chain_default_params() };
        // SAFETY: `params` is llama.cpp's default; the result is a new chain we own.
        let chain = unsafe { sys::llama_sampler_chain_init(params) };
        let ptr = NonNull::new(chain).expect("llama_sampler_chain_init never returns null");
        let mut out = SamplerChain { ptr, n_vocab, data: Vec::with_capacity(n_vocab) };
        if let Some((t, _)) = s.logit_bias.iter().find(|(t, _)| *t as usize >= n_vocab) {
            return Err(InvalidSampling { field: "logit_bias", value: t.to_string(), rule: "token ids of the vocabulary" });
        }
        if !s.logit_bias.is_empty() {
            let biases: Vec<sys::llama_logit_bias> =
                s.logit_bias.iter().map(|&(token, bias)| sys::llama_logit_bias { token, bias }).collect();
            // SAFETY: `biases` holds `biases.len()` entries, each id in 0..n_vocab and each bias
            // finite (checked above and in `validate`); llama.cpp copies them into the stage.
            out.add(unsafe { sys::llama_sampler_init_logit_bias(n_vocab_i32, biases.len() as i32, biases.as_ptr()) });
        }
        if s.has_penalties() {
            // SAFETY: values validated above (repeat > 0, all finite, last_n >= 0).
            out.add(unsafe {
                sys::llama_sampler_init_penalties(n_vocab_i32, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            });
        }
        if s.is_greedy() {
            // SAFETY: no preconditions.
            out.add(unsafe { sys::llama_sampler_init_greedy() });
            return Ok(out);
        }
        if s.top_k > 0 {
            // SAFETY: k > 0.
            out.add(unsafe { sys::llama_sampler_init_top_k(s.top_k) });
        }
        if s.top_p < 1.0 {
            // SAFETY: p in (0, 1), min_keep 1.
            out.add(unsafe { sys::llama_sampler_init_top_p(s.top_p, 1) });
        }
        if s.min_p > 0.0 {
            // SAFETY: p in (0, 1], min_keep 1.
            out.add(unsafe { sys::llama_sampler_init_min_p(s.min_p, 1) });
        }
        // SAFETY: temperature finite and > 0 here; any seed is valid.
        out.add(unsafe { sys::llama_sampler_init_temp(s.temperature) });
        // SAFETY: as above.
        out.add(unsafe { sys::llama_sampler_init_dist(s.seed) });
        Ok(out)
    }

    /// Hands `stage` (a fresh sampler from a `llama_sampler_init_*` call) to the chain, which
    /// owns it from then on.
    fn add(&mut self, stage: *mut sys::llama_sampler) {
        let stage = NonNull::new(stage).expect("llama_sampler_init_* never returns null");
        // SAFETY: the chain is valid; `stage` is a fresh sampler not owned by anyone else, and the
        // chain frees it in `llama_sampler_free` of the chain.
        unsafe { sys::llama_sampler_chain_add(self.ptr.as_ptr(), stage.as_ptr()) }
    }

    /// Tells the chain about a token of the sequence without drawing (the prompt, for the
    /// penalties). Ids outside the vocabulary are ignored.
    pub fn accept(&mut self, token: Token) -> Result<(), LlamaError> {
        if token >= 0 && (token as usize) < self.n_vocab {
            // SAFETY: the chain is valid and used by one thread (`&mut self`); the id is in range,
            // which the penalties stage needs to index its counts.
            unsafe { shim::sampler_accept(self.ptr.as_ptr(), token) }.map_err(|e| LlamaError::Sampler { detail: e.to_string() })?;
        }
        Ok(())
    }

    /// Draws the next token from `logits` (one row of n_vocab values) and accepts it. `Ok(None)`
    /// when the row has the wrong length or the chain selected nothing (every candidate filtered
    /// out); `Err` when llama.cpp's sampler failed.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Option<Token>, LlamaError> {
        if logits.len() != self.n_vocab {
            return Ok(None);
        }
        self.data.clear();
        self.data.extend(logits.iter().enumerate().map(|(i, &logit)| sys::llama_token_data { id: i as Token, logit, p: 0.0 }));
        let mut arr = sys::llama_token_data_array { data: self.data.as_mut_ptr(), size: self.data.len(), selected: -1, sorted: false };
        // SAFETY: the chain is valid; `arr.data` points to `arr.size` initialised entries owned by
        // `self.data`, which is neither moved nor resized during the call. Stages may sort the
        // entries in place or shrink `size`; they never grow the array beyond `size`.
        unsafe { shim::sampler_apply(self.ptr.as_ptr(), &mut arr) }.map_err(|e| LlamaError::Sampler { detail: e.to_string() })?;
        let Some(sel) = usize::try_from(arr.selected).ok().filter(|&s| s < arr.size) else { return Ok(None) };
        // SAFETY: `arr.data` still points into `self.data` (or to an array a stage owns that lives
        // as long as the chain) with at least `arr.size` entries, and `sel < arr.size`.
        let token = unsafe { (*arr.data.add(sel)).id };
        self.accept(token)?;
        Ok(Some(token))
    }
}

impl Drop for SamplerChain {
    fn drop(&mut self) {
        // SAFETY: the chain came from `llama_sampler_chain_init` and is freed exactly once; it
        // frees the stages it owns.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}
