//! The safe wrapper over llama.cpp: everything of the toolkit that touches llama.cpp.
//!
//! llama.cpp comes from `llama-cpp-sys-2` (pinned), built once per build profile as shared
//! libraries (`libllama.so`, `libggml*.so`): the one llama.cpp that the `iapt` binary, libiapt,
//! the C example, llama-cpp-python and the llama-server baseline all load (see the README). Every
//! llama.cpp call that can throw a C++ exception goes through a C++ shim (`ffi/shim.cpp`) that
//! turns it into an error, so no input can abort the process from inside llama.cpp.
//!
//! Modules: `ffi` (the only `unsafe`): process-wide backend initialisation and logging, the GGUF
//! probe (llama.cpp's own parser), [`Model`] (loading, metadata, tokenizer, chat template),
//! [`Context`] (decode, logits, per-sequence KV memory) with an optional [`EvalCallback`] wired to
//! `cb_eval` ([`NodeData`] implements [`iapt_hook::LayerRows`], so the one injection hook,
//! `iapt_hook::StreamHook`, runs inside it), [`Batch`], [`SamplerChain`] (llama.cpp's sampler chain
//! on a sequence's own logits row), backends and devices, RPC workers, and quantization;
//! `sampling` ([`SamplerSettings`], the chain's settings and their rules); `split` (how llama.cpp
//! cuts a batch into ubatches, which the hook must follow). The runtime that
//! drives all this (batching, prefill, sampling, adapters) is `iapt-engine`.
//!
//! Devices: by default llama.cpp is built for the CPU alone and no CUDA code is compiled. The `cuda`
//! cargo feature builds llama.cpp with its CUDA backend (needs a CUDA toolkit) and the CUDA
//! generator; `gpu-generator` adds the CUDA generator alone (loaded at run time, no toolkit needed),
//! for a binary whose `libggml` was built with CUDA elsewhere (`scripts/gpu/`). [`devices`] lists
//! the backend devices, [`supports_gpu_offload`] says whether layers can go to a GPU, and
//! [`ModelParams::n_gpu_layers`] chooses how many do ([`Model::load`] puts every layer on the GPU
//! when there is one).
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
mod sampling;
mod split;

pub use error::{LlamaError, NodeError};
pub use ffi::heap::release_freed_heap_memory;
pub use ffi::SamplerChain;
pub use ffi::{
    add_rpc_workers, apply_chat_template_named, builtin_chat_templates, devices, gguf_probe, init, install_abort_exit, quantize,
    rpc_worker_serve, set_verbose, supports_gpu_offload, Batch, Context, ContextParams, Device, DeviceKind, EvalCallback, GgufKv,
    GgufSummary, GgufTensorInfo, GgufValue, KvType, Model, ModelParams, NodeData, NodeInfo, Quant, RpcEndpoint, Token,
};
/// The GPU generator's runtime, re-exported for callers that choose where the generators run.
pub use iapt_generator_cuda::{GpuAdapter, GpuError, GpuRuntime};
/// The architecture table lives in `iapt-hook` (shared with libiapt); re-exported unchanged.
pub use iapt_hook::{arch_spec, supported_archs, ArchSpec, ARCHS};
pub use sampling::{InvalidSampling, SamplerSettings};
pub use split::split;
