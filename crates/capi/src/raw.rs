//! Everything that dereferences a pointer from C: handles, strings, the `err` buffer, batches and
//! graph tensors. Each function checks what it can (NULL, sizes, strides) and states in a
//! `// SAFETY:` comment what the C caller promised for the rest (the header's contract).

use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::ffi::{self, ggml_tensor, llama_batch, llama_context, llama_model, llama_seq_id, TensorPrefix, GGML_TYPE_F32};
use crate::{fail, Failure, IaptAdapter, IaptHook, IaptRegistry, IAPT_ERR_BATCH, IAPT_ERR_NULL};

/// The caller's `err` buffer (or none).
#[derive(Clone, Copy)]
pub(crate) struct ErrBuf {
    ptr: *mut c_char,
    size: usize,
}

impl ErrBuf {
    pub fn none() -> ErrBuf {
        ErrBuf { ptr: std::ptr::null_mut(), size: 0 }
    }

    /// Writes `msg`, truncated to `size - 1` bytes at a UTF-8 boundary, NUL-terminated.
    pub fn write(self, msg: &str) {
        if self.ptr.is_null() || self.size == 0 {
            return;
        }
        let mut n = msg.len().min(self.size - 1);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        let bytes: Vec<u8> = msg.as_bytes()[..n].iter().map(|&b| if b == 0 { b'?' } else { b }).collect();
        // SAFETY: the header requires `err` to be NULL or writable for `err_size` bytes; `n + 1 <=
        // size`, and `bytes` is our own allocation, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.cast::<u8>(), n);
            *self.ptr.add(n) = 0;
        }
    }
}

pub(crate) fn err_buf(ptr: *mut c_char, size: usize) -> ErrBuf {
    ErrBuf { ptr, size }
}

fn null(what: &str) -> Failure {
    Failure(IAPT_ERR_NULL, format!("{what} is NULL"))
}

/// A NUL-terminated path.
pub(crate) fn path(p: *const c_char) -> Result<PathBuf, Failure> {
    if p.is_null() {
        return Err(null("path"));
    }
    // SAFETY: non-NULL, and the header requires a NUL-terminated string valid for the call.
    let s = unsafe { CStr::from_ptr(p) };
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
}

/// The adapter behind a handle, borrowed for the call.
pub(crate) fn adapter_ref<'a>(a: *const IaptAdapter) -> Result<&'a IaptAdapter, Failure> {
    if a.is_null() {
        return Err(null("adapter"));
    }
    // SAFETY: a non-NULL handle is one `iapt_adapter_load` returned (`Arc::into_raw`) and the caller
    // has not freed it (header contract), so the Arc holds it alive for this call.
    Ok(unsafe { &*a })
}

/// A new reference to the adapter behind a handle (what a hook keeps).
pub(crate) fn adapter_clone(a: *const IaptAdapter) -> Result<Arc<IaptAdapter>, Failure> {
    if a.is_null() {
        return Err(null("adapter"));
    }
    // SAFETY: as in `adapter_ref`: the pointer came from `Arc::into_raw` and its reference is still
    // held by the caller, so incrementing and taking one more reference is sound.
    unsafe {
        Arc::increment_strong_count(a);
        Ok(Arc::from_raw(a))
    }
}

/// Drops the caller's reference (NULL ignored).
pub(crate) fn adapter_release(a: *mut IaptAdapter) {
    if a.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Arc::into_raw` in `iapt_adapter_load` and is freed once (header
    // contract); hooks hold their own references, so the adapter lives on while they use it.
    drop(unsafe { Arc::from_raw(a.cast_const()) });
}

/// The hook behind a handle, borrowed for the call.
pub(crate) fn hook_ref<'a>(h: *const IaptHook) -> Result<&'a IaptHook, Failure> {
    if h.is_null() {
        return Err(null("hook"));
    }
    // SAFETY: a non-NULL handle is one `iapt_hook_new` returned (`Box::into_raw`), not yet freed
    // (header contract: freed after `llama_free`, so no callback runs later); it is only used through
    // shared references, its mutable state being behind a mutex.
    Ok(unsafe { &*h })
}

pub(crate) fn hook_free(h: *mut IaptHook) {
    if h.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Box::into_raw` in `iapt_hook_new`, is freed once, and no other
    // call on it runs concurrently (header contract).
    drop(unsafe { Box::from_raw(h) });
}

/// The registry behind a handle, borrowed for the call.
pub(crate) fn registry_ref<'a>(r: *const IaptRegistry) -> Result<&'a IaptRegistry, Failure> {
    if r.is_null() {
        return Err(null("registry"));
    }
    // SAFETY: a non-NULL handle is one `iapt_registry_new` returned (`Box::into_raw`), not yet
    // freed (header contract); it is only used through shared references, its state being behind
    // a mutex.
    Ok(unsafe { &*r })
}

pub(crate) fn registry_free(r: *mut IaptRegistry) {
    if r.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Box::into_raw` in `iapt_registry_new`, is freed once, and no
    // other call on it runs concurrently (header contract). Adapters it handed out are `Arc`s of
    // their own and live on.
    drop(unsafe { Box::from_raw(r) });
}

/// The caller's array of `n` token ids (`n == 0`: none, and the pointer may be NULL).
pub(crate) fn tokens<'a>(p: *const i32, n: usize) -> Result<&'a [i32], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null("tokens"));
    }
    // SAFETY: non-NULL and, by the header's contract, `n` readable, aligned `llama_token`s that
    // stay valid for this call.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writes `v` through an optional out-pointer (NULL: the caller does not want it).
pub(crate) fn write_out(out: *mut i64, v: i64) {
    if out.is_null() {
        return;
    }
    // SAFETY: the header requires each out-pointer to be NULL or a writable, aligned `int64_t`.
    unsafe { *out = v };
}

/// What the hook needs to know of a model.
pub(crate) struct ModelInfo {
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ctx_train: usize,
}

pub(crate) fn model_info(model: *const llama_model) -> Result<ModelInfo, Failure> {
    if model.is_null() {
        return Err(null("model"));
    }
    let mut buf = [0 as c_char; 128];
    // SAFETY: `model` is a live llama_model (header contract); the key is a NUL-terminated literal;
    // `llama_model_meta_val_str` writes at most `buf.len()` bytes, NUL-terminated (snprintf).
    let (n, n_layer, n_embd, n_ctx) = unsafe {
        let n = ffi::llama_model_meta_val_str(model, c"general.architecture".as_ptr(), buf.as_mut_ptr(), buf.len());
        (n, ffi::llama_model_n_layer(model), ffi::llama_model_n_embd(model), ffi::llama_model_n_ctx_train(model))
    };
    if n < 0 {
        return fail(crate::IAPT_ERR_UNSUPPORTED_ARCH, "the model has no general.architecture");
    }
    // SAFETY: llama.cpp NUL-terminated the buffer (it was large enough or truncated with a NUL).
    let arch = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    let (Ok(n_layer), Ok(n_embd)) = (u32::try_from(n_layer), u32::try_from(n_embd)) else {
        return fail(crate::IAPT_ERR_UNSUPPORTED_ARCH, format!("the model reports n_layer {n_layer}, n_embd {n_embd}"));
    };
    Ok(ModelInfo { arch, n_layer, n_embd, n_ctx_train: n_ctx.max(0) as usize })
}

/// `llama_n_ctx` and `llama_n_ubatch`.
pub(crate) fn context_info(ctx: *const llama_context) -> Result<(usize, usize), Failure> {
    if ctx.is_null() {
        return Err(null("context"));
    }
    // SAFETY: `ctx` is a live llama_context (header contract); both getters only read it.
    Ok(unsafe { (ffi::llama_n_ctx(ctx) as usize, ffi::llama_n_ubatch(ctx) as usize) })
}

/// A batch, checked: its arrays are read only within `n_tokens`.
pub(crate) struct RawBatch<'a> {
    b: &'a llama_batch,
}

pub(crate) fn batch<'a>(b: *const llama_batch) -> Result<RawBatch<'a>, Failure> {
    if b.is_null() {
        return Err(null("batch"));
    }
    // SAFETY: non-NULL and, by the header's contract, the batch the caller is about to decode,
    // valid for this call.
    let b = unsafe { &*b };
    if b.n_tokens < 0 {
        return fail(IAPT_ERR_BATCH, format!("batch.n_tokens is {}", b.n_tokens));
    }
    Ok(RawBatch { b })
}

impl RawBatch<'_> {
    pub fn n_tokens(&self) -> usize {
        self.b.n_tokens as usize
    }

    pub fn has_embd(&self) -> bool {
        !self.b.embd.is_null()
    }

    /// Row `i`'s token id (`None` when the batch carries embeddings instead).
    pub fn token(&self, i: usize) -> Option<i32> {
        if self.b.token.is_null() || i >= self.n_tokens() {
            return None;
        }
        // SAFETY: llama.cpp's batch contract: a non-NULL `token` holds `n_tokens` ids, and
        // `i < n_tokens` (checked above).
        Some(unsafe { *self.b.token.add(i) })
    }

    /// Row `i`'s position and sequences.
    pub fn row(&self, i: usize) -> Result<(i32, &[llama_seq_id]), String> {
        let b = self.b;
        if b.pos.is_null() || b.n_seq_id.is_null() || b.seq_id.is_null() {
            return Err("the batch has no pos/n_seq_id/seq_id arrays: the hook needs explicit positions and sequences".to_owned());
        }
        // SAFETY: llama.cpp's batch contract: `pos`, `n_seq_id` and `seq_id` hold `n_tokens` entries
        // and `i < n_tokens`.
        let (pos, n, ids) = unsafe { (*b.pos.add(i), *b.n_seq_id.add(i), *b.seq_id.add(i)) };
        if n < 1 || ids.is_null() {
            return Err(format!("batch row {i} has {n} sequence ids"));
        }
        // SAFETY: `seq_id[i]` holds `n_seq_id[i]` ids (llama.cpp's batch contract).
        Ok((pos, unsafe { std::slice::from_raw_parts(ids, n as usize) }))
    }
}

/// Why a graph tensor's rows cannot be copied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    /// Not f32 with rows packed one after another.
    #[error("node {node} is not f32 with densely packed rows (type {ty}, ne {ne:?}, nb {nb:?})")]
    NotDenseF32 { node: String, ty: i32, ne: [i64; 4], nb: [usize; 4] },
    /// No buffer or data pointer.
    #[error("node {node} has no data")]
    NoData { node: String },
    /// Rows outside the tensor, or not whole rows.
    #[error("node {node}: {values} values from row {row0} are not whole rows inside its {rows} rows of {n_embd}")]
    OutOfRange { node: String, row0: usize, values: usize, rows: usize, n_embd: usize },
}

/// A graph tensor handed to `cb_eval`, valid for the callback.
pub(crate) struct Node {
    t: NonNull<ggml_tensor>,
}

impl Node {
    pub fn new(t: *mut ggml_tensor) -> Option<Node> {
        NonNull::new(t).map(|t| Node { t })
    }

    fn prefix(&self) -> &TensorPrefix {
        // SAFETY: llama.cpp passes a live `struct ggml_tensor`, whose layout begins with exactly
        // `TensorPrefix`'s fields (see `ffi`); it is not written during the callback.
        unsafe { &*self.t.as_ptr().cast::<TensorPrefix>() }
    }

    pub fn name_str(&self) -> &str {
        // SAFETY: the tensor is live for the callback; `ggml_get_name` returns its NUL-terminated
        // `name` array, which lives as long as the tensor.
        let p = unsafe { ffi::ggml_get_name(self.t.as_ptr()) };
        if p.is_null() {
            return "";
        }
        // SAFETY: see above.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("")
    }

    /// Byte offset of `row0` after checking that `values` f32 from there are whole rows inside.
    fn check_rows(&self, row0: usize, values: usize) -> Result<usize, NodeError> {
        let t = self.prefix();
        let node = || self.name_str().to_owned();
        if t.type_ != GGML_TYPE_F32 || !is_dense_f32(t.ne, t.nb) {
            return Err(NodeError::NotDenseF32 { node: node(), ty: t.type_, ne: t.ne, nb: t.nb });
        }
        // SAFETY: the tensor is live; `ggml_get_data` only reads its `data` field.
        let data = unsafe { ffi::ggml_get_data(self.t.as_ptr()) };
        if t.buffer.is_null() || data.is_null() {
            return Err(NodeError::NoData { node: node() });
        }
        let d = t.ne[0] as usize;
        let rows = (t.ne[1] * t.ne[2] * t.ne[3]) as usize;
        match row0.checked_add(values / d.max(1)) {
            Some(end) if d > 0 && values % d == 0 && end <= rows => Ok(row0 * t.nb[1]),
            _ => Err(NodeError::OutOfRange { node: node(), row0, values, rows, n_embd: d }),
        }
    }
}

/// Whether `ne`/`nb` describe f32 rows packed one after another, with a total size that fits.
fn is_dense_f32(ne: [i64; 4], nb: [usize; 4]) -> bool {
    let mut stride = 4usize;
    for k in 0..4 {
        if ne[k] < 0 || nb[k] != stride {
            return false;
        }
        match stride.checked_mul(ne[k] as usize) {
            Some(next) => stride = next,
            None => return false,
        }
    }
    true
}

impl iapt_hook::LayerRows for Node {
    type Error = NodeError;

    fn name(&self) -> &str {
        self.name_str()
    }

    fn ne(&self) -> [i64; 4] {
        self.prefix().ne
    }

    fn is_host(&self) -> bool {
        let buffer = self.prefix().buffer;
        // SAFETY: a non-null `buffer` is the live backend buffer the scheduler allocated the node
        // in; `ggml_backend_buffer_is_host` only queries it.
        !buffer.is_null() && unsafe { ffi::ggml_backend_buffer_is_host(buffer) }
    }

    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), NodeError> {
        let offset = self.check_rows(row0, out.len())?;
        // SAFETY: data phase of cb_eval: the node is computed and nothing runs on it until we return;
        // `check_rows` verified dense f32 rows, a buffer and data, and offset + size within the
        // tensor (so ggml's own asserts hold); `out` is writable for exactly that size.
        unsafe { ffi::ggml_backend_tensor_get(self.t.as_ptr(), out.as_mut_ptr().cast(), offset, std::mem::size_of_val(out)) };
        Ok(())
    }

    fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), NodeError> {
        let offset = self.check_rows(row0, values.len())?;
        // SAFETY: as in `read_rows`; in the data phase no consumer of the node has started, so the
        // write races with nothing.
        unsafe { ffi::ggml_backend_tensor_set(self.t.as_ptr(), values.as_ptr().cast(), offset, std::mem::size_of_val(values)) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_buf_truncates_at_a_char_boundary_and_terminates() {
        let mut buf = [1 as c_char; 6];
        err_buf(buf.as_mut_ptr(), buf.len()).write("abcdé!");
        // "abcd" + 'é' (2 bytes) does not fit in 5: truncated before it.
        // SAFETY: `write` NUL-terminated the buffer within its 6 bytes.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(s.to_bytes(), b"abcd");
        let mut one = [1 as c_char; 1];
        err_buf(one.as_mut_ptr(), 1).write("x");
        assert_eq!(one[0], 0);
        err_buf(std::ptr::null_mut(), 10).write("ignored");
    }

    #[test]
    fn dense_strides_only() {
        assert!(is_dense_f32([4, 3, 1, 1], [4, 16, 48, 48]));
        assert!(!is_dense_f32([4, 3, 1, 1], [4, 20, 60, 60]));
        assert!(!is_dense_f32([4, -1, 1, 1], [4, 16, 48, 48]));
    }
}
