//! The multi-tenant IAPT engine: many requests, each with its own adapter (or none), on one base
//! model and one llama.cpp context.
//!
//! After its prefill, a sequence's adapter lives only in the KV entries of its m soft tokens, so
//! the decode steps of sequences with different adapters batch together as plain base-model
//! decodes. The [`Engine`] does continuous batching as llama-server and vLLM do for plain models:
//!
//! - **Steps.** Each [`Engine::step`] admits queued requests into free sequence slots, then runs one
//!   `llama_decode` holding one token of every decoding sequence and prefill chunks of new ones,
//!   oldest first, up to [`EngineConfig::batch_tokens`]. A long prompt is prefilled over several
//!   steps; the injection hook keeps each sequence's pooling state between steps, so the result
//!   equals a one-shot prefill, and the soft slots are written in the decode that holds them.
//!   Rows of decoding sequences pass through the hook untouched.
//! - **Slots and cells.** At most [`EngineConfig::parallel`] sequences run; each has a budget of
//!   [`EngineConfig::seq_ctx`] tokens, checked when the request is submitted (prompt plus soft tokens
//!   plus `max_tokens`), so a request that can never fit is refused up front and admitted ones never
//!   run out of KV cells. A finished, failed or cancelled sequence frees its cells at once
//!   (`llama_memory_seq_rm`) and its slot is reused. By default each slot has its own KV stream
//!   (llama.cpp's `kv_unified = false`, as llama-server): a decoding sequence's attention reads its
//!   own cells only, which makes a decode step of 16 sequences ~15% faster than over one unified
//!   cache ([`EngineConfig::kv_unified`]); llama.cpp then splits a batch into ubatches that hold
//!   as many rows of each sequence, and the engine tells the hook which rows each holds
//!   ([`iapt_llama::split`]).
//! - **Sampling.** Every request has its own llama.cpp sampler chain ([`iapt_llama::SamplerChain`]:
//!   logit bias, penalties, filters, a seeded draw), applied to its own logits row; stop at
//!   end-of-generation tokens, at stop strings (matched across token boundaries, never emitted) or
//!   at `max_tokens`; optional top-N log-probabilities. [`Request::structured`] constrains the
//!   output to JSON (a schema) with `llguidance` (the `constraint` module).
//! - **Choices.** A request of [`Request::n`] choices is prefilled once; its KV cells are then
//!   copied to the other choices' sequences (llama.cpp's `seq_cp`), each sampling with its own seed.
//! - **Chat.** [`ChatTemplate`] renders messages into the instruction (Jinja, or llama.cpp's
//!   built-in formats), for every command and host alike.
//! - **Adapters** are loaded and unloaded by name at run time ([`Engine::load_adapter`]); a
//!   request holds its adapter, so unloading one in use is deferred, never a use-after-free.
//! - **Errors.** Every bad input is an [`EngineError`] variant, refused by [`Engine::submit`].
//!
//! - **Failures stay with their request.** An adapter whose soft tokens overflow on a prompt
//!   fails that request alone ([`EngineError::AdapterFailed`]): the hook checks every soft token
//!   before it enters llama.cpp's graph, so nothing it would have written reaches the KV cache
//!   other sequences attend over.
//!
//! The engine is the toolkit's one runtime: `iapt run | bench | eval | demo | batch | serve` all
//! drive it (a single request is a batch of one). The generators run on the CPU, or on a GPU
//! runtime ([`EngineConfig::gpu`]), which reads and writes llama.cpp's device tensors in place when
//! the layers are offloaded to it.
//!
//! - **Prefix cache** ([`EngineConfig::prefix_cache_bytes`], `iapt_hook::prefix`, which libiapt's hook keeps too): the KV of an
//!   instruction is the base model's alone (its rows never see soft tokens), so one cached copy
//!   serves every adapter and the base; each adapter's pooling of the cached rows comes from its
//!   own snapshot or is pooled from the cached input rows, without a forward pass. Keys are the
//!   exact token ids (per engine, so per base model) and, for pooling, the generator's id: a
//!   replaced adapter never hits an old entry. Exact against cold runs.
//!
//! [`EngineHandle`] runs an engine on its own thread for servers: requests in over a channel,
//! each request's [`Event`]s out over its own [`EventStream`], cancelled when that stream is dropped.
//!
//! ```no_run
//! use iapt_engine::{Engine, EngineConfig, EventKind, Request};
//! let model = iapt_llama::Model::load(std::path::Path::new("base.gguf"))?;
//! let mut engine = Engine::new(&model, EngineConfig::default())?;
//! engine.load_adapter_file("sorter", std::path::Path::new("sorter.iapt.gguf"))?;
//! let prompt = model.tokenize("sort: b a c", true, false)?;
//! let id = engine.submit(Request::new(prompt, 32).with_adapter("sorter"))?;
//! engine.run_until_idle(&mut |ev| {
//!     if let EventKind::Token(t) = ev.kind {
//!         print!("{}", String::from_utf8_lossy(&t.text));
//!     }
//! });
//! # let _ = id;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod chat;
mod constraint;
mod engine;
mod error;
mod fault;
mod handle;
mod output;
mod registry;
mod request;

pub use chat::{ChatError, ChatTemplate, Rendered};
pub use constraint::Structured;
pub use engine::{Engine, EngineConfig, EngineStats};
pub use error::EngineError;
pub use handle::{EngineHandle, EngineSpec, EventSink, EventStream, Status};
pub use iapt_hook::prefix::{CacheStats, CHECKPOINT};
pub use registry::{AdapterCache, AdapterInfo, InsertOptions, Inserted, Unloaded};
pub use request::{Completion, Event, EventKind, FinishReason, Finished, Request, SeqId, TokenOut, MAX_LOGPROBS};
