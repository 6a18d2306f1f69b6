//! Runs IAPT adapters inside llama.cpp.
//!
//! At every layer the adapter's generator pools the instruction's hidden states into m soft tokens
//! that replace the residual-stream rows of m placeholder positions. This crate does that inside
//! llama.cpp's own forward pass through `llama_context_params.cb_eval`: the hook claims the node that
//! carries the residual stream entering each layer, reads the instruction rows, runs the generator
//! (on the CPU, `iapt-generator`, or on a GPU, `iapt-generator-cuda`) and overwrites the soft-token
//! rows before any consumer of that node runs.
//!
//! Its one job is what touches llama.cpp. Modules: `ffi` (the only `unsafe`: a small safe wrapper
//! over `llama-cpp-sys-2`, including the narrow bridge that lends a graph node's device memory to
//! the GPU generator, [`NodeData::gpu_rows`]; `ffi::sampler`, llama.cpp's sampler chain applied to
//! a sequence's own logits row, [`SamplerChain`]; `ffi::memory`, per-sequence KV control), `arch`
//! (re-exported from `iapt-hook`: the node names per architecture), `hook` (the injection plan and callback), `session` (prefill
//! and generation, several sequences per decode, each with its own resident adapter), `sample`
//! (greedy and temperature sampling), `sampling` (the sampler chain's settings and their rules).
//! The demo's exact-match evaluation and the throughput benchmark are tools of the `iapt` CLI; the
//! GPU generator, its kernels and its micro-benchmark are `iapt-generator-cuda`.
//!
//! Devices: by default llama.cpp is built for the CPU alone and no CUDA code is compiled. The `cuda`
//! cargo feature builds llama.cpp with its CUDA backend (needs a CUDA toolkit) and the CUDA
//! generator; `gpu-generator` adds the CUDA generator alone (loaded at run time, no toolkit needed),
//! for a binary linked to llama.cpp as shared libraries (`LLAMA_BUILD_SHARED_LIBS=1`) that uses
//! whatever backends the `libggml` it finds at run time was built with (`scripts/gpu/` builds one
//! with CUDA on a GPU machine). [`devices`] lists the backend devices, [`supports_gpu_offload`] says
//! whether layers can go to a GPU, and [`ModelParams::n_gpu_layers`] chooses how many do
//! ([`Model::load`] puts every layer on the GPU when there is one).
//!
//! ```no_run
//! use iapt_llama::gguf_probe;
//! let summary = gguf_probe(std::path::Path::new("adapter.gguf"))?;
//! println!("{} tensors at data offset {}", summary.tensors.len(), summary.data_offset);
//! # Ok::<(), iapt_llama::LlamaError>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod error;
#[allow(unsafe_code)] // The one module with `unsafe`; every block states its invariant.
mod ffi;
mod hook;
mod sample;
mod sampling;
mod session;

pub use error::{HookError, LlamaError, NodeError};
pub use ffi::SamplerChain;
pub use ffi::{
    add_rpc_workers, devices, gguf_probe, init, install_abort_exit, quantize, rpc_worker_serve, set_verbose, supports_gpu_offload, Batch,
    Context, ContextParams, Device, DeviceKind, EvalCallback, GgufKv, GgufSummary, GgufTensorInfo, GgufValue, KvType, Model, ModelParams,
    NodeData, NodeInfo, Quant, RpcEndpoint, Token,
};
pub use hook::{Claim, HookAdapter, HookTimes, IaptHook, Plan, SeqPlan};
/// The GPU generator's types that appear in this crate's API ([`SessionOptions::gpu`],
/// [`HookAdapter::Gpu`]), re-exported so that callers need no second import.
pub use iapt_generator_cuda::{GpuAdapter, GpuError, GpuRuntime};
/// The architecture table lives in `iapt-hook` (shared with libiapt); re-exported unchanged.
pub use iapt_hook::{arch_spec, supported_archs, ArchSpec, ARCHS};
pub use sample::{argmax, Sampler, Sampling};
pub use sampling::{InvalidSampling, SamplerSettings};
pub use session::{check_compat, GenerateOptions, Generation, Request, Session, SessionOptions};
