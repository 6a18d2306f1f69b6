//! The llama.cpp/ggml functions and types libiapt uses: the only declarations of foreign code in
//! the crate, kept to API that has been stable across llama.cpp releases, so that a host with
//! another llama.cpp of the same era works too. The structs declared here are checked at compile
//! time against llama-cpp-sys-2's bindgen definitions of the one llama.cpp (size and every field's
//! offset, module `layout`): an upgrade that moves a field fails the build instead of corrupting memory.
//!
//! - `struct ggml_tensor`: only its leading fields `type`, `buffer`, `ne[4]`, `nb[4]`, unchanged
//!   since ggml-backend (2023); everything after them (whose layout has changed, e.g.
//!   `GGML_MAX_SRC`) is reached through functions (`ggml_get_name`, `ggml_get_data`);
//! - `ggml_backend_tensor_get/set`: copies that work for host and device buffers alike;
//! - `llama_model_n_layer`, `llama_model_n_embd`, `llama_model_n_ctx_train`,
//!   `llama_model_meta_val_str` (for `general.architecture`), `llama_n_ctx`, `llama_n_ubatch`;
//! - `struct llama_batch`: its seven fields, unchanged since `llama_batch` lost `all_pos_0` (2024).
//!
//! The symbols are resolved by the dynamic linker against the libllama/libggml-base the process
//! already has loaded (see the crate documentation for how the library is linked).
#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_void};

/// `llama_seq_id`.
pub type llama_seq_id = i32;

/// `GGML_TYPE_F32`.
pub const GGML_TYPE_F32: c_int = 0;

/// llama.cpp's model (opaque).
#[repr(C)]
pub struct llama_model {
    _opaque: [u8; 0],
}

/// llama.cpp's context (opaque).
#[repr(C)]
pub struct llama_context {
    _opaque: [u8; 0],
}

/// `struct ggml_tensor`, declared opaque: its leading fields are read through [`TensorPrefix`].
#[repr(C)]
pub struct ggml_tensor {
    _opaque: [u8; 0],
}

/// The leading fields of `struct ggml_tensor` (a prefix of its layout: `enum ggml_type type;
/// struct ggml_backend_buffer * buffer; int64_t ne[4]; size_t nb[4];`).
#[repr(C)]
pub struct TensorPrefix {
    pub type_: c_int,
    pub buffer: *mut c_void,
    pub ne: [i64; 4],
    pub nb: [usize; 4],
}

/// `struct llama_batch`, field for field.
#[repr(C)]
pub struct llama_batch {
    pub n_tokens: i32,
    pub token: *mut i32,
    pub embd: *mut f32,
    pub pos: *mut i32,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut llama_seq_id,
    pub logits: *mut i8,
}

extern "C" {
    pub fn ggml_get_name(tensor: *const ggml_tensor) -> *const c_char;
    pub fn ggml_get_data(tensor: *const ggml_tensor) -> *mut c_void;
    pub fn ggml_backend_tensor_get(tensor: *const ggml_tensor, data: *mut c_void, offset: usize, size: usize);
    pub fn ggml_backend_tensor_set(tensor: *mut ggml_tensor, data: *const c_void, offset: usize, size: usize);
    pub fn ggml_backend_buffer_is_host(buffer: *mut c_void) -> bool;
    pub fn llama_model_n_layer(model: *const llama_model) -> i32;
    pub fn llama_model_n_embd(model: *const llama_model) -> i32;
    pub fn llama_model_n_ctx_train(model: *const llama_model) -> i32;
    pub fn llama_model_meta_val_str(model: *const llama_model, key: *const c_char, buf: *mut c_char, buf_size: usize) -> i32;
    pub fn llama_n_ctx(ctx: *const llama_context) -> u32;
    pub fn llama_n_ubatch(ctx: *const llama_context) -> u32;
}

/// Compile-time checks of the hand-written declarations against the bindgen definitions of the
/// llama.cpp libiapt is built with: the whole `llama_batch`, and the leading fields of
/// `ggml_tensor` that [`TensorPrefix`] reads.
pub mod layout {
    use std::mem::{offset_of, size_of};

    use llama_cpp_sys_2 as sys;

    use super::{llama_batch, TensorPrefix};

    const _: () = {
        assert!(size_of::<llama_batch>() == size_of::<sys::llama_batch>());
        assert!(offset_of!(llama_batch, n_tokens) == offset_of!(sys::llama_batch, n_tokens));
        assert!(offset_of!(llama_batch, token) == offset_of!(sys::llama_batch, token));
        assert!(offset_of!(llama_batch, embd) == offset_of!(sys::llama_batch, embd));
        assert!(offset_of!(llama_batch, pos) == offset_of!(sys::llama_batch, pos));
        assert!(offset_of!(llama_batch, n_seq_id) == offset_of!(sys::llama_batch, n_seq_id));
        assert!(offset_of!(llama_batch, seq_id) == offset_of!(sys::llama_batch, seq_id));
        assert!(offset_of!(llama_batch, logits) == offset_of!(sys::llama_batch, logits));
        assert!(size_of::<TensorPrefix>() <= size_of::<sys::ggml_tensor>());
        assert!(offset_of!(TensorPrefix, type_) == offset_of!(sys::ggml_tensor, type_));
        assert!(offset_of!(TensorPrefix, buffer) == offset_of!(sys::ggml_tensor, buffer));
        assert!(offset_of!(TensorPrefix, ne) == offset_of!(sys::ggml_tensor, ne));
        assert!(offset_of!(TensorPrefix, nb) == offset_of!(sys::ggml_tensor, nb));
        assert!(size_of::<super::llama_seq_id>() == size_of::<sys::llama_seq_id>());
        assert!(super::GGML_TYPE_F32 as u32 == sys::GGML_TYPE_F32);
    };
}
