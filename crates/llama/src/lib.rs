//! Runs IAPT adapters inside llama.cpp.
//!
//! At every layer the adapter's generator pools the instruction's hidden states into m soft tokens
//! that replace the residual-stream rows of m placeholder positions. This crate does that inside
//! llama.cpp's own forward pass through `llama_context_params.cb_eval`: the hook claims the node that
//! carries the residual stream entering each layer, reads the instruction rows, runs the CPU
//! generator and overwrites the soft-token rows before any consumer of that node runs.
//!
//! Modules: `ffi` (the only `unsafe`: a small safe wrapper over `llama-cpp-sys-2`), `arch` (the node
//! names per architecture), `hook` (the injection plan and callback), `session` (prefill and
//! generation, several sequences per decode, each with its own resident adapter), `sample` (greedy and temperature sampling), `sampling` (the settings of llama.cpp's sampler
//! chain and their rules; the chain itself, [`SamplerChain`], applied to a sequence's own logits row,
//! is in `ffi::sampler`; `ffi::memory` frees a sequence's KV cells), `bench` (side-by-side throughput),
//! `eval` (exact-match evaluation with the demo's prompt format and stop rules), `ffi::gpu` (the
//! generator on CUDA through `cudarc`, kernels compiled by NVRTC at run time, and with the
//! `gpu-emulation` feature the same kernels on CPU threads: [`GpuRuntime`]), `gpu_bench` (its
//! micro-benchmark, [`gpu_generator_bench`]).
//!
//! Devices: by default llama.cpp is built for the CPU alone. The `cuda` cargo feature builds it with
//! its CUDA backend (needs a CUDA toolkit: `nvcc` and the CUDA libraries). A binary linked to
//! llama.cpp as shared libraries (`LLAMA_BUILD_SHARED_LIBS=1`) uses whatever backends the
//! `libggml` it finds at run time was built with (`scripts/gpu/` builds one with CUDA on a GPU
//! machine). [`devices`] lists the backend devices, [`supports_gpu_offload`] says whether layers
//! can go to a GPU, and [`ModelParams::n_gpu_layers`] chooses how many do ([`Model::load`] puts
//! every layer on the GPU when there is one).
//!
//! ```no_run
//! use iapt_llama::gguf_probe;
//! let summary = gguf_probe(std::path::Path::new("adapter.gguf"))?;
//! println!("{} tensors at data offset {}", summary.tensors.len(), summary.data_offset);
//! # Ok::<(), iapt_llama::LlamaError>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod arch;
mod bench;
mod error;
pub mod eval;
#[allow(unsafe_code)] // The one module with `unsafe`; every block states its invariant.
mod ffi;
mod gpu_bench;
mod hook;
mod sample;
mod sampling;
mod session;

pub use arch::{arch_spec, supported_archs, ArchSpec, ARCHS};
pub use bench::{bench, BenchConfig, BenchReport, Throughput};
pub use error::{GpuError, LlamaError};
pub use ffi::gpu::{
    compile_kernels_ptx, nvrtc_unavailable_reason, DevRows, DevRowsMut, GpuAdapter, GpuRows, GpuRuntime, GpuSeqState, GPU_MAX_SOFT_TOKENS,
};
pub use ffi::SamplerChain;
pub use ffi::{
    devices, gguf_probe, init, quantize, set_verbose, supports_gpu_offload, Batch, Context, ContextParams, Device, DeviceKind,
    EvalCallback, GgufKv, GgufSummary, GgufTensorInfo, GgufValue, KvType, Model, ModelParams, NodeData, NodeInfo, Quant, Token,
};
pub use gpu_bench::{gpu_generator_bench, GpuBenchConfig, GpuBenchReport};
pub use hook::{Claim, HookAdapter, IaptHook, Plan, SeqPlan};
pub use sample::{argmax, Sampler, Sampling};
pub use sampling::{InvalidSampling, SamplerSettings};
pub use session::{check_compat, GenerateOptions, Generation, Request, Session, SessionOptions};
