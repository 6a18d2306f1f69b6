//! The IAPT soft-prompt generator on the CPU.
//!
//! At every layer l the generator turns the instruction's hidden states H (n x d, the residual
//! stream entering layer l) into m soft tokens P_l (m x d):
//!
//! ```text
//! Z = H W_down^T + b_down    S = (Z Q^T) s    A = softmax over the n rows    P_l = g(A^T Z) W_up^T + b_up
//! ```
//!
//! - [`Generator`] is the f32 production path: W_down and W_up held as stored (F16, BF16 or F32)
//!   and widened exactly inside the products, the rest converted once at load, shared tensors held
//!   once, optional threads ([`Generator::with_threads`]), and two evaluation orders
//!   ([`Strategy`]) of which the default picks the cheaper.
//! - [`LayerState`] streams: feed the instruction's rows in any number of chunks (as llama.cpp
//!   hands over a long prompt in several ubatches), then finish into the soft tokens. An online
//!   softmax (running max, running sum of weights, running weighted sum of rows) makes any
//!   chunking give the one-shot result.
//! - [`reference`](mod@reference) is an independent f64 implementation in plain loops, for tests.
//! - [`synthetic`] has random valid adapters for benchmarks and tests; `testing` (cargo feature
//!   `testing`) seeds and helpers for tests of this and other crates.
//!
//! ```
//! use iapt_format::Activation;
//! use iapt_format::rng::Rng;
//! use iapt_generator::synthetic::{random_adapter, AdapterSpec};
//! use iapt_generator::Generator;
//!
//! let adapter = random_adapter(&AdapterSpec::small(2, 16, 4, 8, Activation::Gelu), &mut Rng::new(7)).unwrap();
//! let gen = Generator::from_adapter(&adapter)?;
//! let rows = vec![0.25f32; 3 * gen.n_embd()]; // 3 instruction rows
//! let mut soft = vec![0.0f32; gen.n_soft_tokens() * gen.n_embd()];
//! gen.generate(1, &rows, &mut soft)?;
//!
//! // Streaming: the same rows in two chunks.
//! let mut st = gen.begin(1);
//! st.feed(&gen, &rows[..gen.n_embd()])?;
//! st.feed(&gen, &rows[gen.n_embd()..])?;
//! let mut streamed = vec![0.0f32; soft.len()];
//! st.finish(&gen, &mut streamed)?;
//! assert!(soft.iter().zip(&streamed).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + a.abs())));
//! # Ok::<(), iapt_generator::GeneratorError>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod activation;
mod error;
mod generator;
mod kernels;
mod matmul;
pub mod reference;
pub mod synthetic;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod weights;

pub use error::GeneratorError;

/// Support for this crate's benchmark (not a stable API).
#[doc(hidden)]
pub mod bench_support {
    use crate::matmul::{matmul, MatMut, MatRef};

    /// `c = a b` for row-major `a` (m x k), `b` (k x n), `c` (m x n), single-threaded, through the
    /// GEMM wrapper the generator uses. Panics if a slice is too short.
    pub fn matmul_f32(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
        matmul(MatMut::row_major(c, m, n), None, MatRef::row_major(a, m, k), MatRef::row_major(b, k, n), 1.0);
    }
}
pub use generator::{Generator, LayerState, Strategy};

#[cfg(test)]
mod tests;
