//! The IAPT soft-prompt generator on a GPU.
//!
//! The CPU generator lives in `iapt-generator`; this crate runs the same computation (its
//! PoolFirst form, any chunking giving the one-shot result) as CUDA kernels, the way candle keeps
//! its kernels in a crate of their own:
//!
//! - [`GpuRuntime`]: one CUDA device through `cudarc` (the `cuda` feature; the driver and NVRTC
//!   are loaded at run time, so building needs no CUDA toolkit), or the CPU emulator of the same
//!   kernel source (the `emulation` feature, for tests on machines without a GPU);
//! - [`GpuAdapter`] (an adapter's weights in device memory), [`GpuSeqState`] (one sequence's
//!   streaming state for every layer), [`GpuRows`] (rows owned by the runtime), and the borrowed
//!   views [`DevRows`] / [`DevRowsMut`] through which a caller's device tensors (llama.cpp's, in
//!   `iapt-llama`'s hook) are read and written in place;
//! - [`gpu_generator_bench`]: the generator's micro-benchmark (`iapt bench-gpu`);
//! - `testing` (cargo feature `testing`): the CUDA device for a test, or a skip that `IAPT_REQUIRE_CUDA=1` turns into a
//!   failure.
//!
//! A build with neither feature compiles no CUDA code and no `cudarc`: every constructor of
//! [`GpuRuntime`] then returns [`GpuError::CudaNotCompiled`] or [`GpuError::EmulationNotCompiled`],
//! so callers need no feature gates of their own.
//!
//! ```
//! use iapt_generator_cuda::{GpuError, GpuRuntime};
//! match GpuRuntime::cuda(0) {
//!     Ok(rt) => println!("{}", rt.describe()),
//!     Err(e @ (GpuError::CudaNotCompiled | GpuError::CudaUnavailable { .. })) => println!("no GPU generator: {e}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), GpuError>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]
// Without a backend the orchestration code still compiles (so that callers need no feature gates)
// but nothing can reach it: every match over the empty backend enum is unreachable.
#![cfg_attr(not(any(feature = "cuda", feature = "emulation")), allow(dead_code, unused_variables, unreachable_code))]

mod bench;
#[allow(unsafe_code)] // The one module with `unsafe` (driver, emulator, raw device addresses); every block states its invariant.
mod device;
mod error;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use bench::{gpu_generator_bench, GpuBenchConfig, GpuBenchReport};
pub use device::{
    compile_kernels_ptx, nvrtc_unavailable_reason, DevRows, DevRowsMut, GpuAdapter, GpuRows, GpuRuntime, GpuSeqState, GpuStateCopy,
    GPU_MAX_SOFT_TOKENS,
};
pub use error::GpuError;

/// Whether this build can run the generator on CUDA devices (the `cuda` feature).
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");
/// Whether this build has the kernels' CPU emulator (the `emulation` feature).
pub const EMULATION_COMPILED: bool = cfg!(feature = "emulation");
