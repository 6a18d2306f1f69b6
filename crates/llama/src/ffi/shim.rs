//! The C++ shim (`shim.cpp`, built by `build.rs`): every llama.cpp call that can throw a C++
//! exception, wrapped so that the exception is caught on the C++ side and comes back as
//! [`Thrown`] with its message. An exception that reached Rust would abort the process (llama.cpp's
//! tokenizer throws `std::out_of_range` for a character a vocabulary without byte fallback cannot
//! encode; allocation failures throw `std::bad_alloc` anywhere).
//!
//! Each wrapper is an `unsafe fn` with exactly the preconditions of the llama.cpp function it
//! wraps (stated at every call site); the shim adds none.

use std::ffi::{c_char, c_int};

use llama_cpp_sys_2 as sys;

/// A C++ exception the shim caught: its `what()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Thrown(pub String);

impl std::fmt::Display for Thrown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "llama.cpp threw a C++ exception: {}", self.0)
    }
}

const ERR_SIZE: usize = 512;

extern "C" {
    fn iapt_shim_tokenize(
        vocab: *const sys::llama_vocab,
        text: *const c_char,
        text_len: i32,
        tokens: *mut sys::llama_token,
        n_tokens_max: i32,
        add_special: bool,
        parse_special: bool,
        out: *mut i32,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_token_to_piece(
        vocab: *const sys::llama_vocab,
        token: sys::llama_token,
        buf: *mut c_char,
        length: i32,
        lstrip: i32,
        special: bool,
        out: *mut i32,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_decode(ctx: *mut sys::llama_context, batch: sys::llama_batch, out: *mut i32, err: *mut c_char, err_size: usize) -> c_int;
    fn iapt_shim_chat_apply_template(
        tmpl: *const c_char,
        chat: *const sys::llama_chat_message,
        n_msg: usize,
        add_ass: bool,
        buf: *mut c_char,
        length: i32,
        out: *mut i32,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_model_load_from_file(
        path: *const c_char,
        params: sys::llama_model_params,
        out: *mut *mut sys::llama_model,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_init_from_model(
        model: *mut sys::llama_model,
        params: sys::llama_context_params,
        out: *mut *mut sys::llama_context,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_sampler_apply(
        smpl: *mut sys::llama_sampler,
        cur_p: *mut sys::llama_token_data_array,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_sampler_accept(smpl: *mut sys::llama_sampler, token: sys::llama_token, err: *mut c_char, err_size: usize) -> c_int;
    fn iapt_shim_model_quantize(
        fname_inp: *const c_char,
        fname_out: *const c_char,
        params: *const sys::llama_model_quantize_params,
        out: *mut u32,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_gguf_init_from_file(
        fname: *const c_char,
        params: sys::gguf_init_params,
        out: *mut *mut sys::gguf_context,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_memory_seq_rm(
        mem: sys::llama_memory_t,
        seq_id: sys::llama_seq_id,
        p0: sys::llama_pos,
        p1: sys::llama_pos,
        out: *mut bool,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_memory_clear(mem: sys::llama_memory_t, data: bool, err: *mut c_char, err_size: usize) -> c_int;
    fn iapt_shim_state_seq_get(
        ctx: *mut sys::llama_context,
        seq: sys::llama_seq_id,
        dst: *mut u8,
        size: usize,
        out: *mut usize,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_state_seq_set(
        ctx: *mut sys::llama_context,
        src: *const u8,
        size: usize,
        seq: sys::llama_seq_id,
        out: *mut usize,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
    fn iapt_shim_memory_seq_cp(
        mem: sys::llama_memory_t,
        src: sys::llama_seq_id,
        dst: sys::llama_seq_id,
        err: *mut c_char,
        err_size: usize,
    ) -> c_int;
}

/// Runs one shim call with an error buffer; `Err` with the message when it caught an exception.
fn run(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), Thrown> {
    let mut err = [0u8; ERR_SIZE];
    if call(err.as_mut_ptr().cast(), ERR_SIZE) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(ERR_SIZE);
    Err(Thrown(String::from_utf8_lossy(&err[..end]).into_owned()))
}

/// `llama_tokenize`.
///
/// # Safety
/// As `llama_tokenize`: a valid vocabulary, `text` readable for `text_len` bytes, `tokens`
/// writable for `n_tokens_max` tokens.
pub(crate) unsafe fn tokenize(
    vocab: *const sys::llama_vocab,
    text: &[u8],
    tokens: *mut sys::llama_token,
    n_tokens_max: i32,
    add_special: bool,
    parse_special: bool,
) -> Result<i32, Thrown> {
    let mut out = 0;
    let len = i32::try_from(text.len()).map_err(|_| Thrown("text longer than 2^31 bytes".to_owned()))?;
    // SAFETY: the caller's promise covers the arguments; `out` and the error buffer are ours.
    run(|e, n| unsafe {
        iapt_shim_tokenize(vocab, text.as_ptr().cast(), len, tokens, n_tokens_max, add_special, parse_special, &mut out, e, n)
    })?;
    Ok(out)
}

/// `llama_token_to_piece` (no stripping, special tokens rendered as their text).
///
/// # Safety
/// As `llama_token_to_piece`: a valid vocabulary, a token id in range, `buf` writable for `buf.len()`.
pub(crate) unsafe fn token_to_piece(
    vocab: *const sys::llama_vocab,
    token: sys::llama_token,
    special: bool,
    buf: &mut [u8],
) -> Result<i32, Thrown> {
    let mut out = 0;
    let len = i32::try_from(buf.len()).unwrap_or(i32::MAX);
    // SAFETY: the caller's promise; `buf` is writable for `len <= buf.len()` bytes.
    run(|e, n| unsafe { iapt_shim_token_to_piece(vocab, token, buf.as_mut_ptr().cast(), len, 0, special, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_decode`.
///
/// # Safety
/// As `llama_decode`: a valid context used by one thread, a batch whose arrays hold `n_tokens`
/// initialised entries.
pub(crate) unsafe fn decode(ctx: *mut sys::llama_context, batch: sys::llama_batch) -> Result<i32, Thrown> {
    let mut out = 0;
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_decode(ctx, batch, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_chat_apply_template` (with the assistant prefix).
///
/// # Safety
/// As `llama_chat_apply_template`: a NUL-terminated template, `n_msg` messages of NUL-terminated
/// strings, `buf` writable for its length.
pub(crate) unsafe fn chat_apply_template(
    tmpl: *const c_char,
    chat: *const sys::llama_chat_message,
    n_msg: usize,
    buf: &mut [u8],
) -> Result<i32, Thrown> {
    let mut out = 0;
    let len = i32::try_from(buf.len()).unwrap_or(i32::MAX);
    // SAFETY: the caller's promise; `buf` is writable for `len <= buf.len()` bytes.
    run(|e, n| unsafe { iapt_shim_chat_apply_template(tmpl, chat, n_msg, true, buf.as_mut_ptr().cast(), len, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_model_load_from_file`.
///
/// # Safety
/// As `llama_model_load_from_file`: a NUL-terminated path, initialised parameters.
pub(crate) unsafe fn model_load_from_file(path: *const c_char, params: sys::llama_model_params) -> Result<*mut sys::llama_model, Thrown> {
    let mut out = std::ptr::null_mut();
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_model_load_from_file(path, params, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_init_from_model`.
///
/// # Safety
/// As `llama_init_from_model`: a valid model that outlives the context, initialised parameters
/// whose callback user data outlives the context.
pub(crate) unsafe fn init_from_model(
    model: *mut sys::llama_model,
    params: sys::llama_context_params,
) -> Result<*mut sys::llama_context, Thrown> {
    let mut out = std::ptr::null_mut();
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_init_from_model(model, params, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_sampler_apply`.
///
/// # Safety
/// As `llama_sampler_apply`: a valid sampler used by one thread, `cur_p` pointing to `size`
/// initialised candidates.
pub(crate) unsafe fn sampler_apply(smpl: *mut sys::llama_sampler, cur_p: &mut sys::llama_token_data_array) -> Result<(), Thrown> {
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_sampler_apply(smpl, cur_p, e, n) })
}

/// `llama_sampler_accept`.
///
/// # Safety
/// As `llama_sampler_accept`: a valid sampler used by one thread, a token id in range.
pub(crate) unsafe fn sampler_accept(smpl: *mut sys::llama_sampler, token: sys::llama_token) -> Result<(), Thrown> {
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_sampler_accept(smpl, token, e, n) })
}

/// `llama_model_quantize`.
///
/// # Safety
/// As `llama_model_quantize`: NUL-terminated paths, initialised parameters.
pub(crate) unsafe fn model_quantize(
    inp: *const c_char,
    out_path: *const c_char,
    params: &sys::llama_model_quantize_params,
) -> Result<u32, Thrown> {
    let mut out = 0;
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_model_quantize(inp, out_path, params, &mut out, e, n) })?;
    Ok(out)
}

/// `gguf_init_from_file`.
///
/// # Safety
/// As `gguf_init_from_file`: a NUL-terminated path; `params.ctx` null or valid.
pub(crate) unsafe fn gguf_init_from_file(fname: *const c_char, params: sys::gguf_init_params) -> Result<*mut sys::gguf_context, Thrown> {
    let mut out = std::ptr::null_mut();
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_gguf_init_from_file(fname, params, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_memory_seq_rm`.
///
/// # Safety
/// As `llama_memory_seq_rm`: a valid memory handle of a context used by one thread.
pub(crate) unsafe fn memory_seq_rm(
    mem: sys::llama_memory_t,
    seq: sys::llama_seq_id,
    p0: sys::llama_pos,
    p1: sys::llama_pos,
) -> Result<bool, Thrown> {
    let mut out = false;
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_memory_seq_rm(mem, seq, p0, p1, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_memory_seq_cp` of every position (`p0 = p1 = -1`).
///
/// # Safety
/// As `llama_memory_seq_cp`: a valid memory handle of a context used by one thread, and both
/// sequence ids in `0..n_seq_max` of that context (llama.cpp asserts it, which aborts).
pub(crate) unsafe fn memory_seq_cp(mem: sys::llama_memory_t, src: sys::llama_seq_id, dst: sys::llama_seq_id) -> Result<(), Thrown> {
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_memory_seq_cp(mem, src, dst, e, n) })
}

/// `llama_state_seq_get_size` (`dst` empty) or `llama_state_seq_get_data` into `dst`.
///
/// # Safety
/// A valid context used by one thread and a sequence id in `0..n_seq_max` of it.
pub(crate) unsafe fn state_seq_get(ctx: *mut sys::llama_context, seq: sys::llama_seq_id, dst: &mut [u8]) -> Result<usize, Thrown> {
    let mut out = 0;
    let ptr = if dst.is_empty() { std::ptr::null_mut() } else { dst.as_mut_ptr() };
    // SAFETY: the caller's promise; `dst` is writable for its length (or null: the size only).
    run(|e, n| unsafe { iapt_shim_state_seq_get(ctx, seq, ptr, dst.len(), &mut out, e, n) })?;
    Ok(out)
}

/// `llama_state_seq_set_data`: 0 when llama.cpp could not load it.
///
/// # Safety
/// A valid context used by one thread and a sequence id in `0..n_seq_max` of it.
pub(crate) unsafe fn state_seq_set(ctx: *mut sys::llama_context, src: &[u8], seq: sys::llama_seq_id) -> Result<usize, Thrown> {
    let mut out = 0;
    // SAFETY: the caller's promise; `src` is readable for its length.
    run(|e, n| unsafe { iapt_shim_state_seq_set(ctx, src.as_ptr(), src.len(), seq, &mut out, e, n) })?;
    Ok(out)
}

/// `llama_memory_clear`.
///
/// # Safety
/// As `llama_memory_clear`: a valid memory handle of a context used by one thread.
pub(crate) unsafe fn memory_clear(mem: sys::llama_memory_t, data: bool) -> Result<(), Thrown> {
    // SAFETY: the caller's promise.
    run(|e, n| unsafe { iapt_shim_memory_clear(mem, data, e, n) })
}
