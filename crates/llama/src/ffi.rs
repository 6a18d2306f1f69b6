//! The only module with `unsafe`: a small safe wrapper over `llama-cpp-sys-2` (llama.cpp and ggml as
//! bundled with version 0.1.161).
//!
//! What it offers: process-wide backend initialisation and log control ([`set_verbose`]), the GGUF
//! probe ([`gguf_probe`], llama.cpp's own parser), [`Model`] (loading, metadata, tokenizer, chat
//! template), [`Context`] (decoding, logits, KV-cache reset) with an optional [`EvalCallback`] wired to
//! `llama_context_params.cb_eval`, [`Batch`], and [`quantize`].
//!
//! Ownership rules kept here so that the rest of the crate cannot get them wrong:
//! - a [`Context`] borrows its [`Model`] (lifetime `'m`), so the model outlives every context;
//! - the callback state is leaked into a raw pointer (`Box::into_raw`) when the context is made, and
//!   the [`Context`] owns that pointer: `Drop` frees the llama.cpp context first and only then the
//!   state (`Box::from_raw`), so llama.cpp never holds a dangling `user_data`, and no Rust borrow of
//!   the state is invalidated by moving the `Context`;
//! - a node's rows are viewed only inside bounds checked against all four of its dimensions and
//!   strides; a writable device view borrows the node mutably, so there is never a second view;
//! - logits are read only for batch rows that asked for them (llama.cpp aborts on others in a
//!   debug build).
//! - every call into Rust from C (log callback, `cb_eval` trampoline) is wrapped in `catch_unwind`;
//!   a panic is recorded and reported as an error by the next safe call instead of unwinding into C.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use llama_cpp_sys_2 as sys;

use iapt_generator_cuda::{DevRows, DevRowsMut};

use crate::error::{LlamaError, NodeError};

pub(crate) mod heap;
mod memory;
mod rpc;
mod sampler;
mod shim;

pub use rpc::{add_rpc_workers, install_abort_exit, rpc_worker_serve, RpcEndpoint};
pub use sampler::SamplerChain;

/// A token id of the model's vocabulary.
pub type Token = i32;

/// How many characters of a text that fails to tokenize are tried one by one to name the culprit.
const MAX_UNENCODABLE_SCAN: usize = 4096;

/// Why a tokenizer call failed: llama.cpp threw, or another reason.
enum TokenizeFailure {
    Thrown,
    Other(String),
}

// ---------------------------------------------------------------------------------------------
// Backend initialisation and logging
// ---------------------------------------------------------------------------------------------

/// How many recent llama.cpp error lines are kept for error messages.
const MAX_KEPT_LOG_LINES: usize = 16;

struct LogState {
    verbose: bool,
    recent: VecDeque<String>,
    last_was_error: bool,
}

static LOG: Mutex<LogState> = Mutex::new(LogState { verbose: false, recent: VecDeque::new(), last_was_error: false });
static INIT: Once = Once::new();

/// The log sink installed into llama.cpp and ggml: prints when verbose, and always keeps the last
/// few error-level lines so that a failed call can say why.
unsafe extern "C" fn log_sink(level: sys::ggml_log_level, text: *const c_char, _user_data: *mut c_void) {
    let _ = catch_unwind(|| {
        if text.is_null() {
            return;
        }
        // SAFETY: llama.cpp/ggml pass a NUL-terminated string that is valid for the duration of the
        // call (a formatted buffer on their stack or heap); we copy it before returning.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
        let Ok(mut st) = LOG.lock() else { return };
        if st.verbose {
            eprint!("{s}");
        }
        let is_error = level == sys::GGML_LOG_LEVEL_ERROR || (level == sys::GGML_LOG_LEVEL_CONT && st.last_was_error);
        if level != sys::GGML_LOG_LEVEL_CONT {
            st.last_was_error = level == sys::GGML_LOG_LEVEL_ERROR;
        }
        if is_error {
            let line = s.trim_end().to_owned();
            if !line.is_empty() {
                if st.recent.len() == MAX_KEPT_LOG_LINES {
                    st.recent.pop_front();
                }
                st.recent.push_back(line);
            }
        }
    });
}

/// Initialises llama.cpp's backends once per process and installs the log sink (quiet by default).
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: `log_sink` is a valid `extern "C"` function for the whole program and ignores
        // `user_data`, so a null `user_data` is fine (installed first, so that backend
        // initialisation is quiet too); `llama_backend_init` has no preconditions and runs exactly
        // once (guarded by `Once`).
        unsafe {
            sys::llama_log_set(Some(log_sink), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// Lets llama.cpp's log through to stderr (`true`) or keeps it quiet (`false`, the default).
pub fn set_verbose(verbose: bool) {
    init();
    if let Ok(mut st) = LOG.lock() {
        st.verbose = verbose;
    }
}

/// Takes the error lines llama.cpp logged since the last call, joined for an error message.
fn take_log_errors() -> String {
    match LOG.lock() {
        Ok(mut st) => {
            let lines: Vec<String> = st.recent.drain(..).collect();
            if lines.is_empty() {
                "no details from llama.cpp (use --verbose)".to_owned()
            } else {
                lines.join("; ")
            }
        }
        Err(_) => "log unavailable".to_owned(),
    }
}

fn clear_log_errors() {
    if let Ok(mut st) = LOG.lock() {
        st.recent.clear();
    }
}

fn path_cstring(path: &Path) -> Result<CString, LlamaError> {
    let s = path.to_str().ok_or_else(|| LlamaError::InvalidPath { path: path.to_owned() })?;
    CString::new(s).map_err(|_| LlamaError::InvalidPath { path: path.to_owned() })
}

/// Copies a C string returned by llama.cpp/ggml (null becomes empty).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the duration of the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// GGUF probe
// ---------------------------------------------------------------------------------------------

/// A metadata value as llama.cpp's GGUF parser returns it (only the types the IAPT format uses are
/// decoded; the rest are identified by their type id).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `GGUF_TYPE_STRING`.
    Str(String),
    /// `GGUF_TYPE_UINT32`.
    U32(u32),
    /// `GGUF_TYPE_FLOAT32`.
    F32(f32),
    /// `GGUF_TYPE_ARRAY`: element type id and length.
    Array {
        /// The GGUF type id of the elements.
        elem_type: u32,
        /// Number of elements.
        len: usize,
    },
    /// Any other scalar type (see the type id).
    Other,
}

/// One metadata key as llama.cpp sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufKv {
    /// The key.
    pub key: String,
    /// Its `gguf_type` id.
    pub type_id: u32,
    /// The value (decoded for strings, u32 and f32).
    pub value: GgufValue,
}

/// One tensor info as llama.cpp sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor name.
    pub name: String,
    /// The `ggml_type` id.
    pub ggml_type: u32,
    /// ggml's `ne` (fastest-varying dimension first; unused dimensions are 1).
    pub ne: [i64; 4],
    /// Offset of the data relative to the start of the data section.
    pub offset: usize,
    /// Size of the data in bytes.
    pub size: usize,
}

/// What llama.cpp's `gguf_init_from_file` reads from a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// The GGUF version.
    pub version: u32,
    /// The data alignment.
    pub alignment: usize,
    /// The file offset of the data section.
    pub data_offset: usize,
    /// Every metadata key, in file order.
    pub kvs: Vec<GgufKv>,
    /// Every tensor info, in file order.
    pub tensors: Vec<GgufTensorInfo>,
}

/// Owns a `gguf_context` and frees it on drop.
struct GgufCtx(NonNull<sys::gguf_context>);

impl Drop for GgufCtx {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `gguf_init_from_file`, is non-null, and is freed exactly once here.
        unsafe { sys::gguf_free(self.0.as_ptr()) }
    }
}

/// Parses a GGUF file's header with llama.cpp's own parser (`gguf_init_from_file`, no tensor data
/// loaded) and returns everything it saw.
pub fn gguf_probe(path: &Path) -> Result<GgufSummary, LlamaError> {
    init();
    let cpath = path_cstring(path)?;
    clear_log_errors();
    let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
    // SAFETY: `cpath` is a NUL-terminated string alive across the call; with `ctx == NULL` and
    // `no_alloc == true` the parser creates no ggml context and reads only the header.
    let raw = unsafe { shim::gguf_init_from_file(cpath.as_ptr(), params) }
        .map_err(|e| LlamaError::GgufRejected { path: path.to_owned(), detail: e.to_string() })?;
    let ctx = GgufCtx(NonNull::new(raw).ok_or_else(|| LlamaError::GgufRejected { path: path.to_owned(), detail: take_log_errors() })?);
    let p = ctx.0.as_ptr();
    // SAFETY (for every call in this block): `p` is a valid gguf_context owned by `ctx` for the whole
    // block; key ids are in 0..n_kv and tensor ids in 0..n_tensors as returned by the same context,
    // which is what the getters require; string getters are only called for keys whose type is
    // GGUF_TYPE_STRING, u32/f32 getters only for those types (the getters assert on a mismatch), and
    // returned strings are copied before the context is freed.
    unsafe {
        let n_kv = sys::gguf_get_n_kv(p);
        let mut kvs = Vec::with_capacity(n_kv.max(0) as usize);
        for i in 0..n_kv {
            let key = c_string(sys::gguf_get_key(p, i));
            let ty = sys::gguf_get_kv_type(p, i);
            let value = match ty {
                sys::GGUF_TYPE_STRING => GgufValue::Str(c_string(sys::gguf_get_val_str(p, i))),
                sys::GGUF_TYPE_UINT32 => GgufValue::U32(sys::gguf_get_val_u32(p, i)),
                sys::GGUF_TYPE_FLOAT32 => GgufValue::F32(sys::gguf_get_val_f32(p, i)),
                sys::GGUF_TYPE_ARRAY => GgufValue::Array { elem_type: sys::gguf_get_arr_type(p, i), len: sys::gguf_get_arr_n(p, i) },
                _ => GgufValue::Other,
            };
            kvs.push(GgufKv { key, type_id: ty, value });
        }
        let n_t = sys::gguf_get_n_tensors(p);
        let mut tensors = Vec::with_capacity(n_t.max(0) as usize);
        for i in 0..n_t {
            let ne_ptr = sys::gguf_get_tensor_ne(p, i);
            // `gguf_get_tensor_ne` returns a pointer to GGML_MAX_DIMS (4) int64 values inside the context.
            let ne = std::slice::from_raw_parts(ne_ptr, 4);
            tensors.push(GgufTensorInfo {
                name: c_string(sys::gguf_get_tensor_name(p, i)),
                ggml_type: sys::gguf_get_tensor_type(p, i),
                ne: [ne[0], ne[1], ne[2], ne[3]],
                offset: sys::gguf_get_tensor_offset(p, i),
                size: sys::gguf_get_tensor_size(p, i),
            });
        }
        Ok(GgufSummary {
            version: sys::gguf_get_version(p),
            alignment: sys::gguf_get_alignment(p),
            data_offset: sys::gguf_get_data_offset(p),
            kvs,
            tensors,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

/// What kind of device a ggml backend device is (`enum ggml_backend_dev_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU (host memory).
    Cpu,
    /// A discrete GPU with its own memory (CUDA, Vulkan, ...).
    Gpu,
    /// An integrated GPU that shares host memory.
    IntegratedGpu,
    /// An accelerator used together with the CPU (e.g. BLAS, AMX).
    Accelerator,
    /// A type this wrapper does not know (a newer llama.cpp).
    Other,
}

impl DeviceKind {
    /// A short lowercase name: `cpu`, `gpu`, `igpu`, `accel`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "igpu",
            DeviceKind::Accelerator => "accel",
            DeviceKind::Other => "other",
        }
    }
}

/// One ggml backend device, as the build's llama.cpp sees it (`ggml_backend_dev_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device name, e.g. `CPU` or `CUDA0`.
    pub name: String,
    /// The backend's description, e.g. the GPU's product name (`NVIDIA H200`) or the CPU's.
    pub description: String,
    /// The device type.
    pub kind: DeviceKind,
    /// Free memory in bytes, as the backend reports it (host memory for the CPU).
    pub memory_free: usize,
    /// Total memory in bytes, as the backend reports it.
    pub memory_total: usize,
}

impl std::fmt::Display for Device {
    /// `NAME (DESCRIPTION)`, or `NAME` alone for the CPU and when the description adds nothing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == DeviceKind::Cpu || self.description.is_empty() || self.description == self.name {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{} ({})", self.name, self.description)
        }
    }
}

/// Every backend device compiled into (or loaded by) this build of llama.cpp, in ggml's order:
/// the CPU alone in a CPU-only build; `CUDA0` and so on before it with a CUDA backend.
pub fn devices() -> Vec<Device> {
    init();
    // SAFETY: no arguments; ggml's backend registry is a process-wide static, built on first use
    // and never torn down while the process runs.
    let n = unsafe { sys::ggml_backend_dev_count() };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: `i < ggml_backend_dev_count()`, the range `ggml_backend_dev_get` accepts.
        let dev = unsafe { sys::ggml_backend_dev_get(i) };
        if dev.is_null() {
            continue;
        }
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: `dev` is a non-null device handle owned by the registry (valid for the whole
        // process); name and description are NUL-terminated strings owned by the device, copied at
        // once by `c_string`; `free` and `total` are valid for writes of one `usize` each.
        let (name, description, ty) = unsafe {
            sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
            (c_string(sys::ggml_backend_dev_name(dev)), c_string(sys::ggml_backend_dev_description(dev)), sys::ggml_backend_dev_type(dev))
        };
        let kind = match ty {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
            _ => DeviceKind::Other,
        };
        out.push(Device { name, description, kind, memory_free: free, memory_total: total });
    }
    out
}

/// Whether layers can be offloaded: true when the backend registry holds a GPU device (a GPU
/// backend compiled in that found a device, or an RPC worker added with [`add_rpc_workers`]).
/// Unlike `llama_supports_gpu_offload`, a build that merely has the RPC backend compiled in does
/// not count: without a worker added, every layer stays on the CPU.
pub fn supports_gpu_offload() -> bool {
    init();
    [sys::GGML_BACKEND_DEVICE_TYPE_GPU, sys::GGML_BACKEND_DEVICE_TYPE_IGPU].into_iter().any(|ty| {
        // SAFETY: a plain enum argument; it only reads ggml's backend registry (a process-wide
        // static, built on first use and never torn down while the process runs).
        !unsafe { sys::ggml_backend_dev_by_type(ty) }.is_null()
    })
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// How [`Model::load_with`] places a model on the devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelParams {
    /// Layers to keep on the GPU. `None` (the default): all of them when llama.cpp reports GPU
    /// offload support ([`supports_gpu_offload`]), else 0. A count larger than the model's layers
    /// means all; without a GPU backend any count is harmless: llama.cpp runs on the CPU.
    pub n_gpu_layers: Option<u32>,
}

impl ModelParams {
    /// The value passed to llama.cpp's `llama_model_params.n_gpu_layers` (negative = all layers).
    pub fn llama_n_gpu_layers(&self) -> i32 {
        match self.n_gpu_layers {
            Some(n) => i32::try_from(n).unwrap_or(i32::MAX),
            None if supports_gpu_offload() => -1,
            None => 0,
        }
    }
}

/// A loaded base model (weights and vocabulary), on the CPU or partly or fully on a GPU (see
/// [`ModelParams`]).
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
}

impl Model {
    /// Loads a GGUF model file with the default [`ModelParams`] (every layer on the GPU when there
    /// is one). Fails with [`LlamaError::ModelLoad`] carrying llama.cpp's reason.
    pub fn load(path: &Path) -> Result<Model, LlamaError> {
        Model::load_with(path, &ModelParams::default())
    }

    /// Loads a GGUF model file with `mp`. Fails with [`LlamaError::ModelLoad`] carrying llama.cpp's
    /// reason (for example, not enough GPU memory for the layers asked for).
    pub fn load_with(path: &Path, mp: &ModelParams) -> Result<Model, LlamaError> {
        init();
        if !path.is_file() {
            return Err(LlamaError::ModelLoad { path: path.to_owned(), detail: "no such file".to_owned() });
        }
        let cpath = path_cstring(path)?;
        let n_gpu_layers = mp.llama_n_gpu_layers();
        clear_log_errors();
        // SAFETY: `llama_model_default_params` has no preconditions and returns a plain struct.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = n_gpu_layers;
        // SAFETY: `cpath` is NUL-terminated and alive across the call; `params` is a fully
        // initialised struct from llama.cpp's own defaults with no callbacks or pointers set by us.
        let raw = unsafe { shim::model_load_from_file(cpath.as_ptr(), params) }
            .map_err(|e| LlamaError::ModelLoad { path: path.to_owned(), detail: e.to_string() })?;
        let ptr = NonNull::new(raw).ok_or_else(|| LlamaError::ModelLoad { path: path.to_owned(), detail: take_log_errors() })?;
        // SAFETY: `ptr` is a valid model; the vocab pointer it returns lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        match NonNull::new(vocab.cast_mut()) {
            Some(vocab) => Ok(Model { ptr, vocab }),
            None => {
                // SAFETY: `ptr` is valid and not used after this.
                unsafe { sys::llama_model_free(ptr.as_ptr()) };
                Err(LlamaError::ModelLoad { path: path.to_owned(), detail: "model has no vocabulary".to_owned() })
            }
        }
    }

    /// A metadata string value (numbers are rendered as text by llama.cpp), if the key exists.
    pub fn meta(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: the model is valid; `ckey` is NUL-terminated; `buf` is writable for `buf.len()`
            // bytes, which is the size passed, and llama.cpp writes at most that many (snprintf).
            let n = unsafe { sys::llama_model_meta_val_str(self.ptr.as_ptr(), ckey.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    /// `general.architecture`.
    pub fn arch(&self) -> String {
        self.meta("general.architecture").unwrap_or_default()
    }

    /// Number of layers.
    pub fn n_layer(&self) -> usize {
        // SAFETY: the model pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) }.max(0) as usize
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        // SAFETY: the model pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) }.max(0) as usize
    }

    /// Vocabulary size (the length of a logits row).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocab pointer is valid for the model's lifetime.
        unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) }.max(0) as usize
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: the model pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// Whether the tokenizer adds BOS at the start of a prompt.
    pub fn add_bos(&self) -> bool {
        // SAFETY: the vocab pointer is valid for the model's lifetime.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab.as_ptr()) }
    }

    /// Whether `token` is a control token (BOS, EOS, `<|im_start|>`, ...: llama.cpp's
    /// `LLAMA_TOKEN_ATTR_CONTROL`), which text never spells.
    pub fn is_control(&self, token: Token) -> bool {
        // SAFETY: the vocab pointer is valid for the model's lifetime and the token id is checked to
        // be in range before the call (short-circuit).
        token >= 0
            && (token as usize) < self.n_vocab()
            && unsafe { sys::llama_vocab_get_attr(self.vocab.as_ptr(), token) } & sys::LLAMA_TOKEN_ATTR_CONTROL != 0
    }

    /// Whether `token` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: the vocab pointer is valid for the model's lifetime and the token id is checked to
        // be in range before the call (short-circuit).
        token >= 0 && (token as usize) < self.n_vocab() && unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }

    /// Tokenizes `text`; `add_special` adds BOS/EOS as the model says, `parse_special` turns
    /// special-token text (e.g. from a chat template) into those tokens. A character the
    /// vocabulary cannot encode (one without byte fallback) is [`LlamaError::Unencodable`], naming
    /// the character, never an abort inside llama.cpp.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>, LlamaError> {
        self.tokenize_raw(text, add_special, parse_special).map_err(|e| match e {
            TokenizeFailure::Thrown => self.unencodable(text, parse_special),
            TokenizeFailure::Other(detail) => LlamaError::Tokenize { detail },
        })
    }

    fn tokenize_raw(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>, TokenizeFailure> {
        if i32::try_from(text.len()).is_err() {
            return Err(TokenizeFailure::Other("text longer than 2 GiB".to_owned()));
        }
        let mut out: Vec<Token> = vec![0; text.len() + 8];
        for _ in 0..2 {
            let cap = i32::try_from(out.len()).unwrap_or(i32::MAX);
            // SAFETY: the vocab is valid for the model's lifetime; `text` is a slice whose length
            // is passed (no NUL needed); `out` is writable for `cap <= out.len()` tokens.
            let n = unsafe { shim::tokenize(self.vocab.as_ptr(), text.as_bytes(), out.as_mut_ptr(), cap, add_special, parse_special) }
                .map_err(|_| TokenizeFailure::Thrown)?;
            if n == i32::MIN {
                return Err(TokenizeFailure::Other("too many tokens".to_owned()));
            }
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            out.resize((-n) as usize, 0);
        }
        Err(TokenizeFailure::Other("token count changed between calls".to_owned()))
    }

    /// After the tokenizer threw on `text`: the first character it cannot encode alone (looked for
    /// among the first [`MAX_UNENCODABLE_SCAN`] characters), for the error message.
    fn unencodable(&self, text: &str, parse_special: bool) -> LlamaError {
        let mut buf = [0u8; 4];
        let found = text.char_indices().take(MAX_UNENCODABLE_SCAN).find(|&(_, c)| {
            let one: &str = c.encode_utf8(&mut buf);
            matches!(self.tokenize_raw(one, false, parse_special), Err(TokenizeFailure::Thrown))
        });
        LlamaError::Unencodable { character: found.map(|(_, c)| c), byte_offset: found.map(|(i, _)| i) }
    }

    /// The bytes of one token's text as output text (control tokens such as BOS or `<|im_end|>`
    /// give none, as in llama.cpp's detokenizer).
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        self.piece(token, false)
    }

    /// The bytes of one token's text, control tokens spelled out (`<s>`, `<|im_end|>`): what a
    /// chat template writes for `bos_token`.
    pub fn token_text(&self, token: Token) -> Vec<u8> {
        self.piece(token, true)
    }

    fn piece(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        for _ in 0..2 {
            let n = if token < 0 || token as usize >= self.n_vocab() {
                0
            } else {
                // SAFETY: the vocab is valid; the token is in range (checked above); `buf` is writable
                // for its length, which the shim passes.
                // A piece llama.cpp cannot render (it threw) has no text.
                unsafe { shim::token_to_piece(self.vocab.as_ptr(), token, special, &mut buf) }.unwrap_or_default()
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
        Vec::new()
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: the model is valid; a null name asks for the default template; the returned string
        // is owned by the model and copied immediately.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            None
        } else {
            // SAFETY: non-null, NUL-terminated, owned by the model which outlives this call.
            Some(unsafe { c_string(p) })
        }
    }

    /// Formats one user message with the model's chat template (llama.cpp's built-in template
    /// engine), followed by the assistant prefix.
    pub fn apply_chat_template(&self, user: &str) -> Result<String, LlamaError> {
        self.apply_chat_messages(&[("user", user)])
    }

    /// Formats a conversation of `(role, content)` messages with the model's chat template
    /// (llama.cpp's `llama_chat_apply_template`, the function llama-server uses for templates it
    /// recognises), followed by the assistant prefix.
    pub fn apply_chat_messages(&self, messages: &[(&str, &str)]) -> Result<String, LlamaError> {
        let tmpl = self.chat_template().ok_or_else(|| LlamaError::ChatTemplate { detail: "the model has no chat template".to_owned() })?;
        apply_chat_template_named(&tmpl, messages)
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<Token> {
        // SAFETY: the vocab pointer is valid for the model's lifetime.
        let t = unsafe { sys::llama_vocab_bos(self.vocab.as_ptr()) };
        (t >= 0).then_some(t)
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: the vocab pointer is valid for the model's lifetime.
        let t = unsafe { sys::llama_vocab_eos(self.vocab.as_ptr()) };
        (t >= 0).then_some(t)
    }
}

/// The names of llama.cpp's built-in chat templates (`chatml`, `llama3`, `gemma`, ...), each of which
/// [`apply_chat_template_named`] accepts in place of a template's text.
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: a null output with length 0 only asks for the count.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut names = vec![std::ptr::null::<std::ffi::c_char>(); n.max(0) as usize];
    // SAFETY: `names` is writable for `names.len()` pointers; llama.cpp fills them with pointers to
    // static NUL-terminated strings.
    let m = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    names.truncate(m.max(0) as usize);
    // SAFETY: each pointer llama.cpp wrote is a static NUL-terminated string.
    names.into_iter().filter(|p| !p.is_null()).map(|p| unsafe { c_string(p) }).collect()
}

/// Formats `(role, content)` messages with a chat template that llama.cpp knows: one of
/// [`builtin_chat_templates`] by name, or a template text it recognises (llama.cpp matches the
/// text against its built-in formats), followed by the assistant prefix. A template it does not
/// recognise is [`LlamaError::ChatTemplate`].
pub fn apply_chat_template_named(template: &str, messages: &[(&str, &str)]) -> Result<String, LlamaError> {
    let bad = |detail: &str| LlamaError::ChatTemplate { detail: detail.to_owned() };
    let ctmpl = CString::new(template).map_err(|_| bad("template contains NUL"))?;
    let mut owned = Vec::with_capacity(messages.len());
    for (role, content) in messages {
        let role = CString::new(*role).map_err(|_| bad("a role contains NUL"))?;
        let content = CString::new(*content).map_err(|_| bad("a message contains NUL"))?;
        owned.push((role, content));
    }
    let msgs: Vec<sys::llama_chat_message> =
        owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
    let total: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
    let mut buf = vec![0u8; total * 2 + 256];
    for _ in 0..2 {
        // SAFETY: `ctmpl` and every role and content string in `owned` are NUL-terminated and
        // alive across the call; `msgs` holds `msgs.len()` messages pointing into them; `buf` is
        // writable for its length, which the shim passes.
        let n =
            unsafe { shim::chat_apply_template(ctmpl.as_ptr(), msgs.as_ptr(), msgs.len(), &mut buf) }.map_err(|e| bad(&e.to_string()))?;
        if n < 0 {
            return Err(bad("llama.cpp does not support this chat template"));
        }
        let n = n as usize;
        if n <= buf.len() {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        buf.resize(n + 1, 0);
    }
    Err(bad("template output changed size"))
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `llama_model_load_from_file` and is freed exactly once; every
        // `Context` borrows the model, so none is alive here.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation callback
// ---------------------------------------------------------------------------------------------

/// The name of a tensor, up to its NUL (or the whole array), `""` if it is not UTF-8.
///
/// # Safety
/// `t` must point to a valid tensor whose name is not written during `'a`.
unsafe fn tensor_name<'a>(t: *const sys::ggml_tensor) -> &'a str {
    // SAFETY: per the contract; `name` is a fixed array of c_char, which has the size and alignment
    // of u8, so viewing its bytes is sound; the end is found within the array, NUL-terminated or not.
    let bytes: &[u8] = unsafe {
        let name = &(*t).name;
        std::slice::from_raw_parts(name.as_ptr().cast(), name.len())
    };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).unwrap_or("")
}

/// A graph node as the scheduler offers it in the ask phase of `cb_eval`.
pub struct NodeInfo<'a> {
    t: NonNull<sys::ggml_tensor>,
    _life: PhantomData<&'a sys::ggml_tensor>,
}

impl NodeInfo<'_> {
    /// The node's name (as set by llama.cpp's graph builder, e.g. `l_out-3`).
    pub fn name(&self) -> &str {
        // SAFETY: the tensor is valid and not written by anyone during the callback ('a).
        unsafe { tensor_name(self.t.as_ptr()) }
    }

    /// The names of the node's inputs (ggml's `src`, in order, unnamed ones as `""`): which nodes
    /// this one reads, for checking the graph's shape (e.g. that a layer reads the previous layer's
    /// `l_out`).
    pub fn src_names(&self) -> Vec<&str> {
        // SAFETY: the tensor is valid during the callback ('a); its non-null `src` pointers are
        // tensors of the same graph, valid and not renamed while it is evaluated.
        unsafe { (*self.t.as_ptr()).src.iter().filter(|p| !p.is_null()).map(|&p| tensor_name(p)).collect() }
    }

    /// ggml's `ne`: `[n_embd, n_tokens, 1, 1]` for the residual stream.
    pub fn ne(&self) -> [i64; 4] {
        // SAFETY: the tensor is valid for the duration of the callback.
        unsafe { (*self.t.as_ptr()).ne }
    }

    /// Whether the data is f32 with every row stored contiguously one after another
    /// (`nb[0] = 4`, `nb[1] = 4 ne[0]`, `nb[2] = nb[1] ne[1]`, `nb[3] = nb[2] ne[2]`), which row
    /// access requires: rows are then counted as `ne[1] ne[2] ne[3]`.
    pub fn is_f32_rows(&self) -> bool {
        // SAFETY: the tensor is valid for the duration of the callback.
        let t = unsafe { &*self.t.as_ptr() };
        t.type_ == sys::GGML_TYPE_F32 && is_dense_f32(t.ne, t.nb)
    }

    /// Whether the data lives in host memory (otherwise it is copied through the backend API).
    pub fn is_host(&self) -> bool {
        // SAFETY: the tensor is valid during the callback; a non-null `buffer` is a live backend
        // buffer owned by the scheduler, which `ggml_backend_buffer_is_host` only queries.
        unsafe {
            let t = &*self.t.as_ptr();
            !t.buffer.is_null() && sys::ggml_backend_buffer_is_host(t.buffer)
        }
    }

    /// The byte offset of row `row0`, after checking that `values` f32 starting there are whole
    /// rows inside the tensor's data.
    fn check_rows(&self, row0: usize, values: usize) -> Result<usize, NodeError> {
        let node = || self.name().to_owned();
        // SAFETY: the tensor is valid for the duration of the callback.
        let t = unsafe { &*self.t.as_ptr() };
        if t.type_ != sys::GGML_TYPE_F32 || !is_dense_f32(t.ne, t.nb) {
            return Err(NodeError::NotDenseF32 { node: node(), ne: t.ne, nb: t.nb });
        }
        if t.buffer.is_null() || t.data.is_null() {
            return Err(NodeError::NoData { node: node() });
        }
        let (d, rows) = (t.ne[0] as usize, dense_rows(t.ne));
        if d == 0 || values % d != 0 {
            return Err(NodeError::NotWholeRows { node: node(), values, n_embd: d });
        }
        match row0.checked_add(values / d) {
            Some(end) if end <= rows => Ok(row0 * t.nb[1]),
            _ => Err(NodeError::RowsOutOfRange { node: node(), row0, n: values / d, rows }),
        }
    }
}

/// Whether `ne`/`nb` (ggml's extents and byte strides) describe f32 rows packed one after another
/// in all four dimensions, with non-negative extents whose total size fits in `usize`.
fn is_dense_f32(ne: [i64; 4], nb: [usize; 4]) -> bool {
    if ne.iter().any(|&n| n < 0) {
        return false;
    }
    let mut stride = 4usize;
    for k in 0..4 {
        if nb[k] != stride {
            return false;
        }
        match stride.checked_mul(ne[k] as usize) {
            Some(next) => stride = next,
            None => return false,
        }
    }
    true
}

/// Rows of a dense tensor (`ne[1] ne[2] ne[3]`); only for shapes [`is_dense_f32`] accepted, whose
/// product fits.
fn dense_rows(ne: [i64; 4]) -> usize {
    (ne[1] * ne[2] * ne[3]) as usize
}

/// A computed node in the data phase of `cb_eval`: its rows can be read and overwritten before any
/// node that consumes it runs.
pub struct NodeData<'a> {
    info: NodeInfo<'a>,
}

impl<'a> std::ops::Deref for NodeData<'a> {
    type Target = NodeInfo<'a>;
    fn deref(&self) -> &NodeInfo<'a> {
        &self.info
    }
}

impl NodeData<'_> {
    /// Copies rows `row0 .. row0 + out.len() / ne[0]` into `out` (row-major, `ne[0]` per row).
    pub fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), NodeError> {
        let offset = self.check_rows(row0, out.len())?;
        // SAFETY: the node has been computed (data phase) and nothing else runs on it during the
        // callback; `check_rows` verified f32 data with contiguous rows, a set buffer and data pointer,
        // and that offset + size stays within the tensor; `out` is writable for exactly `size` bytes.
        unsafe {
            sys::ggml_backend_tensor_get(self.t.as_ptr(), out.as_mut_ptr().cast(), offset, std::mem::size_of_val(out));
        }
        Ok(())
    }

    /// Whether [`NodeData::host_rows`] can view this node's rows in place: its data is in host
    /// memory (a CPU buffer) and aligned for f32.
    pub fn rows_in_host_memory(&self) -> bool {
        // SAFETY: the tensor is valid for the duration of the callback; only the pointer is read.
        let data = unsafe { (*self.t.as_ptr()).data };
        self.is_host() && !data.is_null() && (data as usize) % std::mem::align_of::<f32>() == 0
    }

    /// Rows `row0 .. row0 + n` viewed in place in host memory, without a copy (for nodes where
    /// [`NodeData::rows_in_host_memory`] holds; [`NodeError::NotHostMemory`] otherwise). The view
    /// borrows the node, so no write to it can happen while the view lives.
    pub fn host_rows(&self, row0: usize, n: usize) -> Result<&[f32], NodeError> {
        if !self.rows_in_host_memory() {
            return Err(NodeError::NotHostMemory { node: self.name().to_owned() });
        }
        let d = self.ne()[0].max(0) as usize;
        let values = n.checked_mul(d).ok_or_else(|| NodeError::RowsOutOfRange { node: self.name().to_owned(), row0, n, rows: 0 })?;
        let offset = self.check_rows(row0, values)?;
        // SAFETY: `check_rows` verified dense f32 rows, a non-null buffer and data pointer, and that
        // `offset` plus `values` f32 lie within the tensor's data; `rows_in_host_memory` verified
        // that the buffer is host memory and the pointer f32-aligned (the offset is a multiple of
        // the row stride, itself a multiple of 4). In the data phase the node is computed and
        // nothing writes it until the callback returns, except `write_rows`, which needs `&mut
        // self` and so cannot run while this shared borrow lives; the scheduler keeps the buffer
        // allocated for the whole graph.
        Ok(unsafe { std::slice::from_raw_parts((*self.t.as_ptr()).data.cast::<u8>().add(offset).cast::<f32>(), values) })
    }

    /// Overwrites rows `row0 .. row0 + values.len() / ne[0]` with `values`.
    pub fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), NodeError> {
        let offset = self.check_rows(row0, values.len())?;
        // SAFETY: as in `read_rows`; additionally, in the data phase the scheduler has finished the
        // producing node and has not started any consumer, so writing the tensor's memory races with
        // nothing (the backend was synchronised before the callback).
        unsafe {
            sys::ggml_backend_tensor_set(self.t.as_ptr(), values.as_ptr().cast(), offset, std::mem::size_of_val(values));
        }
        Ok(())
    }
}

impl NodeData<'_> {
    /// Rows `row0 .. row0 + n` of the node as [`DevRows`] for a runtime that computes where
    /// the node lives: device memory for a CUDA runtime (`emulated == false`), host memory for the
    /// emulator. `Ok(None)` when the node lives elsewhere (then use [`NodeData::read_rows`]). The
    /// runtime still checks the pointer against its device (ordinal, allocation extent).
    ///
    /// # Safety
    /// The view is only valid while the node's data phase lasts: the caller must make sure that no
    /// work queued with it on a GPU runtime is still running when the callback returns (synchronise
    /// the runtime first), since llama.cpp then runs the node's consumers and may reuse its memory.
    pub unsafe fn gpu_rows(&self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRows<'_>>, NodeError> {
        let Some((ptr, d)) = self.gpu_ptr(emulated, row0, n)? else { return Ok(None) };
        // SAFETY: `gpu_ptr` checked f32 data with contiguous rows and that rows row0..row0+n lie
        // within the tensor's data, which sits in one ggml backend buffer of the kind the runtime
        // computes on. In the data phase the node is computed and nothing runs on it until this
        // callback returns; the buffer stays allocated for the whole graph; the borrow of `self`
        // (the callback's duration) bounds the view, and the caller promised to synchronise the
        // runtime before the callback returns, so no queued read outlives the view.
        Ok(Some(unsafe { DevRows::from_raw(ptr, n, d) }))
    }

    /// As [`NodeData::gpu_rows`], writable: where the soft tokens go. The view borrows the node
    /// mutably, so no other view of it (read or write) can exist at the same time:
    ///
    /// ```compile_fail,E0499
    /// fn two_views(node: &mut iapt_llama::NodeData<'_>) {
    ///     // SAFETY: not run (this example does not compile).
    ///     let a = unsafe { node.gpu_rows_mut(true, 0, 1) };
    ///     let b = unsafe { node.gpu_rows_mut(true, 1, 1) }; // error[E0499]: a second mutable borrow
    ///     drop((a, b));
    /// }
    /// ```
    /// ```no_run
    /// fn one_view(node: &mut iapt_llama::NodeData<'_>) {
    ///     // SAFETY: nothing is queued with the views (they are dropped at once).
    ///     let a = unsafe { node.gpu_rows_mut(true, 0, 1) };
    ///     drop(a);
    ///     let b = unsafe { node.gpu_rows_mut(true, 1, 1) }; // the first view ended: fine
    ///     drop(b);
    /// }
    /// ```
    ///
    /// # Safety
    /// As [`NodeData::gpu_rows`]: no work queued with the view may run after the callback returns.
    pub unsafe fn gpu_rows_mut(&mut self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRowsMut<'_>>, NodeError> {
        let Some((ptr, d)) = self.gpu_ptr(emulated, row0, n)? else { return Ok(None) };
        // SAFETY: as in `gpu_rows`; additionally no consumer of the node has started (data phase),
        // so writing the rows races with nothing, and `&mut self` makes this the only view of the
        // node while it lives.
        Ok(Some(unsafe { DevRowsMut::from_raw(ptr, n, d) }))
    }

    /// The address of row `row0` and the row width, when the node lives where the runtime computes.
    fn gpu_ptr(&self, emulated: bool, row0: usize, n: usize) -> Result<Option<(u64, usize)>, NodeError> {
        let d = self.ne()[0].max(0) as usize;
        let values = n.checked_mul(d).ok_or_else(|| NodeError::RowsOutOfRange { node: self.name().to_owned(), row0, n, rows: 0 })?;
        let offset = self.check_rows(row0, values)?;
        if self.is_host() != emulated {
            return Ok(None);
        }
        // SAFETY: the tensor is valid for the duration of the callback; `check_rows` verified a
        // non-null data pointer.
        let data = unsafe { (*self.t.as_ptr()).data } as u64;
        Ok(Some((data + offset as u64, d)))
    }
}

impl iapt_hook::LayerRows for NodeData<'_> {
    type Error = NodeError;
    fn name(&self) -> &str {
        NodeInfo::name(self)
    }
    fn ne(&self) -> [i64; 4] {
        NodeInfo::ne(self)
    }
    fn is_host(&self) -> bool {
        NodeInfo::is_host(self)
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), NodeError> {
        NodeData::read_rows(self, row0, out)
    }
    fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), NodeError> {
        NodeData::write_rows(self, row0, values)
    }
    fn host_rows(&self, row0: usize, n: usize) -> Option<Result<&[f32], NodeError>> {
        self.rows_in_host_memory().then(|| NodeData::host_rows(self, row0, n))
    }
    unsafe fn device_rows(&self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRows<'_>>, NodeError> {
        // SAFETY: the trait's contract is `gpu_rows`'s.
        unsafe { self.gpu_rows(emulated, row0, n) }
    }
    unsafe fn device_rows_mut(&mut self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRowsMut<'_>>, NodeError> {
        // SAFETY: the trait's contract is `gpu_rows_mut`'s.
        unsafe { self.gpu_rows_mut(emulated, row0, n) }
    }
}

/// The shared multi-sequence hook (the engine's) as this crate's callback.
impl EvalCallback for iapt_hook::StreamHook {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        iapt_hook::StreamHook::wants(self, node.name())
    }
    fn on_data(&self, node: &mut NodeData<'_>) {
        iapt_hook::StreamHook::on_data(self, node)
    }
}

/// Receives graph nodes from llama.cpp's scheduler (`cb_eval`).
///
/// Called on the thread running `llama_decode`, never concurrently for one context. Panics are
/// caught at the FFI boundary and turn the decode into [`LlamaError::CallbackPanicked`].
pub trait EvalCallback: Send + Sync {
    /// Ask phase: whether the node's data is wanted. The scheduler then computes the graph up to and
    /// including this node and calls [`EvalCallback::on_data`] before running anything that uses it.
    fn wants(&self, node: &NodeInfo<'_>) -> bool;
    /// Data phase: the node is computed; read or overwrite it. Errors must be recorded by the
    /// implementation: llama.cpp offers no way to abort a decode from here (returning `false` only
    /// skips the rest of the current graph split), so the trampoline always continues.
    fn on_data(&self, node: &mut NodeData<'_>);
}

/// The boxed state llama.cpp's `cb_eval_user_data` points to.
struct CallbackSlot {
    cb: Arc<dyn EvalCallback>,
    panicked: AtomicBool,
}

unsafe extern "C" fn eval_trampoline(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    if user_data.is_null() {
        return false;
    }
    // SAFETY: `user_data` is the pointer `Box::into_raw` returned for the `CallbackSlot` of the
    // `Context` whose scheduler calls us; it is freed (`Box::from_raw`) only after `llama_free`
    // (see `Context::drop`), so it is alive here, and it is only ever accessed through shared
    // references (its mutable state is an atomic).
    let slot = unsafe { &*(user_data as *const CallbackSlot) };
    let Some(t) = NonNull::new(t) else { return false };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let info = NodeInfo { t, _life: PhantomData };
        if ask {
            slot.cb.wants(&info)
        } else {
            slot.cb.on_data(&mut NodeData { info });
            true
        }
    }));
    match result {
        Ok(v) => v,
        Err(_) => {
            slot.panicked.store(true, Ordering::SeqCst);
            // In the ask phase say "not needed"; in the data phase continue (see `EvalCallback::on_data`).
            !ask
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Context and batch
// ---------------------------------------------------------------------------------------------

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// 32-bit float (exact reference runs).
    F32,
    /// 16-bit float (llama.cpp's default).
    F16,
}

impl KvType {
    fn ggml(self) -> sys::ggml_type {
        match self {
            KvType::F32 => sys::GGML_TYPE_F32,
            KvType::F16 => sys::GGML_TYPE_F16,
        }
    }
}

/// Context settings (the subset the toolkit needs; everything else is llama.cpp's default).
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// Context size in tokens.
    pub n_ctx: u32,
    /// Largest batch one `decode` accepts.
    pub n_batch: u32,
    /// Physical micro-batch size (llama.cpp splits a batch into ubatches of at most this size).
    pub n_ubatch: u32,
    /// Threads (0: llama.cpp's default).
    pub n_threads: i32,
    /// Flash attention: `None` = llama.cpp's automatic choice.
    pub flash_attn: Option<bool>,
    /// K and V cache type.
    pub kv_type: KvType,
    /// Sequences one decode may hold.
    pub n_seq_max: u32,
    /// One KV cache of `n_ctx` cells shared by every sequence (`true`), or one stream of
    /// `n_ctx / n_seq_max` cells per sequence (`false`, llama.cpp's default: a sequence's attention
    /// reads only its own cells, and a batch is split by [`crate::split`]'s equal rule).
    pub kv_unified: bool,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_threads: 0,
            flash_attn: None,
            kv_type: KvType::F16,
            n_seq_max: 1,
            kv_unified: false,
        }
    }
}

/// A llama.cpp inference context over a [`Model`], with an optional evaluation callback.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    n_vocab: usize,
    /// The callback state from `Box::into_raw` (llama.cpp keeps it as `cb_eval_user_data`); freed
    /// in `Drop::drop` after `llama_free`.
    slot: Option<NonNull<CallbackSlot>>,
    /// Rows of the last decoded batch that asked for logits (`logits` refuses the others).
    logit_rows: Vec<bool>,
    /// One KV stream for every sequence (unified, or one sequence at most).
    one_stream: bool,
    _model: PhantomData<&'m Model>,
}

impl<'m> Context<'m> {
    /// Creates a context. With `callback`, every graph node is offered to it (see [`EvalCallback`]).
    pub fn new(model: &'m Model, params: &ContextParams, callback: Option<Arc<dyn EvalCallback>>) -> Result<Context<'m>, LlamaError> {
        init();
        // SAFETY: no preconditions; returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch.min(params.n_batch);
        cp.n_seq_max = params.n_seq_max.max(1);
        cp.kv_unified = params.kv_unified;
        if params.n_threads > 0 {
            cp.n_threads = params.n_threads;
            cp.n_threads_batch = params.n_threads;
        }
        cp.flash_attn_type = match params.flash_attn {
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        };
        cp.type_k = params.kv_type.ggml();
        cp.type_v = params.kv_type.ggml();
        let slot = callback.map(|cb| NonNull::from(Box::leak(Box::new(CallbackSlot { cb, panicked: AtomicBool::new(false) }))));
        if let Some(s) = slot {
            cp.cb_eval = Some(eval_trampoline);
            cp.cb_eval_user_data = s.as_ptr().cast();
        }
        clear_log_errors();
        // SAFETY: the model pointer is valid and outlives the context ('m); `cp` comes from llama.cpp's
        // defaults with plain values changed; `cb_eval_user_data` is a leaked Box that the
        // `Context` made below frees only after `llama_free` (see `Drop`), or that is freed here.
        let raw = unsafe { shim::init_from_model(model.ptr.as_ptr(), cp) }.unwrap_or_else(|e| {
            LOG.lock().map(|mut st| st.recent.push_back(e.to_string())).ok();
            std::ptr::null_mut()
        });
        let Some(ptr) = NonNull::new(raw) else {
            if let Some(s) = slot {
                // SAFETY: llama.cpp made no context, so nothing holds the pointer; it came from
                // `Box::leak` above and is freed exactly once, here.
                drop(unsafe { Box::from_raw(s.as_ptr()) });
            }
            return Err(LlamaError::ContextInit { detail: take_log_errors() });
        };
        let one_stream = params.kv_unified || params.n_seq_max <= 1;
        Ok(Context { ptr, n_vocab: model.n_vocab(), slot, logit_rows: Vec::new(), one_stream, _model: PhantomData })
    }

    /// The context size in tokens.
    pub fn n_ctx(&self) -> usize {
        // SAFETY: the context pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) as usize }
    }

    /// How `decode` will split `batch` into ubatches (for [`iapt_hook::StreamHook::arm`]).
    pub fn split(&self, batch: &Batch) -> iapt_hook::Split {
        crate::split::split(&batch.seqs, self.n_ubatch(), self.one_stream)
    }

    /// The largest batch `decode` accepts.
    pub fn n_batch(&self) -> usize {
        // SAFETY: the context pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_n_batch(self.ptr.as_ptr()) as usize }
    }

    /// The physical micro-batch size.
    pub fn n_ubatch(&self) -> usize {
        // SAFETY: the context pointer is valid for `self`'s lifetime.
        unsafe { sys::llama_n_ubatch(self.ptr.as_ptr()) as usize }
    }

    /// Runs the model on `batch`. Fails on llama.cpp's error codes and when the callback panicked.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), LlamaError> {
        if batch.is_empty() {
            return Err(LlamaError::Decode { code: -1, detail: "empty batch".to_owned() });
        }
        if batch.len() > self.n_batch() {
            return Err(LlamaError::Decode {
                code: -1,
                detail: format!("batch of {} tokens exceeds n_batch {}", batch.len(), self.n_batch()),
            });
        }
        clear_log_errors();
        self.logit_rows.clear();
        // SAFETY: the context is valid and used by one thread at a time (`&mut self`); `batch.raw`
        // points to arrays allocated by `llama_batch_init` for `capacity >= n_tokens` entries, each
        // with one sequence id, all filled in by `Batch::push`; the callback slot (if any) is alive.
        let rc = unsafe { shim::decode(self.ptr.as_ptr(), batch.raw) };
        if let Some(s) = self.slot {
            // SAFETY: the slot is alive until `Drop` (see the field) and only shared-borrowed.
            if unsafe { s.as_ref() }.panicked.swap(false, Ordering::SeqCst) {
                return Err(LlamaError::CallbackPanicked);
            }
        }
        let rc = rc.map_err(|e| LlamaError::Decode { code: -3, detail: e.to_string() })?;
        if rc != 0 {
            let why = match rc {
                1 => "no KV cache slot for the batch (context full)".to_owned(),
                2 => "aborted".to_owned(),
                _ => take_log_errors(),
            };
            return Err(LlamaError::Decode { code: rc, detail: why });
        }
        self.logit_rows = batch.logit_rows();
        Ok(())
    }

    /// The logits of batch entry `i` of the last successful decode, or `None` when that entry did
    /// not ask for them (or there is no such entry): llama.cpp is then not asked at all, since its
    /// debug builds abort on such a row.
    pub fn logits(&self, i: usize) -> Option<&[f32]> {
        if !self.logit_rows.get(i).copied().unwrap_or(false) {
            return None;
        }
        let i = i32::try_from(i).ok()?;
        #[cfg(test)]
        tests::LOGITS_ASKED.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the context is valid; entry `i` of the last decode asked for logits (checked
        // above), so llama.cpp has an output row for it.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i) };
        if p.is_null() {
            clear_log_errors();
            return None;
        }
        // SAFETY: a non-null result points to n_vocab floats in the context's output buffer, which
        // stays unchanged until the next decode; that needs `&mut self`, so the borrow of `self`
        // keeps the slice valid.
        Some(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    /// Empties the KV cache (a fresh sequence can start at position 0).
    pub fn clear_kv(&mut self) {
        self.logit_rows.clear();
        // SAFETY: the context is valid; the memory handle it returns lives as long as the context.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            if !mem.is_null() {
                // Clearing frees cells; it throws only on allocation failure, and then the cache
                // keeps its cells: nothing to report beyond the next decode's failure.
                let _ = shim::memory_clear(mem, true);
            }
        }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `llama_init_from_model` and is freed exactly once. The callback
        // slot is still alive during teardown (freed below).
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
        if let Some(s) = self.slot.take() {
            // SAFETY: `s` came from `Box::leak` in `Context::new`; llama.cpp, its only other holder,
            // was freed just above, and `take` makes this the one and only free.
            drop(unsafe { Box::from_raw(s.as_ptr()) });
        }
    }
}

/// A batch of tokens, each of one sequence.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    /// Each row's sequence (also in `raw`; kept here for [`Context::split`] without `unsafe`).
    seqs: Vec<i32>,
}

impl Batch {
    /// An empty batch that can hold `capacity` tokens.
    pub fn new(capacity: usize) -> Batch {
        init();
        let cap = i32::try_from(capacity.max(1)).unwrap_or(i32::MAX);
        // SAFETY: `embd = 0` allocates token arrays; `n_seq_max = 1` gives each entry one seq id slot.
        let raw = unsafe { sys::llama_batch_init(cap, 0, 1) };
        Batch { raw, capacity: cap as usize, seqs: Vec::with_capacity(cap as usize) }
    }

    /// Number of tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens.max(0) as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every token.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
        self.seqs.clear();
    }

    /// For each entry, whether it asks for its output row.
    fn logit_rows(&self) -> Vec<bool> {
        // SAFETY: `llama_batch_init` allocated `capacity >= len()` entries of `logits`, and the
        // first `len()` were written by `push_seq`.
        (0..self.len()).map(|i| unsafe { *self.raw.logits.add(i) } != 0).collect()
    }

    /// Appends `token` of sequence 0 at position `pos`; `logits` asks for its output row.
    pub fn push(&mut self, token: Token, pos: i32, logits: bool) -> Result<(), LlamaError> {
        self.push_seq(token, pos, 0, logits)
    }

    /// Appends `token` of sequence `seq` at position `pos`; `logits` asks for its output row.
    pub fn push_seq(&mut self, token: Token, pos: i32, seq: i32, logits: bool) -> Result<(), LlamaError> {
        let i = self.len();
        if i >= self.capacity {
            return Err(LlamaError::BatchFull { capacity: self.capacity });
        }
        // SAFETY: `llama_batch_init(capacity, 0, 1)` allocated `capacity` entries in token, pos,
        // n_seq_id, seq_id (each seq_id[i] an array of 1) and logits; `i < capacity`.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.raw.n_tokens += 1;
        self.seqs.push(seq);
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `llama_batch_init` and is freed exactly once (n_tokens does not
        // matter to `llama_batch_free`, which frees by the stored pointers).
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

/// Target types for [`quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// `LLAMA_FTYPE_MOSTLY_Q8_0`.
    Q8_0,
    /// `LLAMA_FTYPE_MOSTLY_Q4_K_M`.
    Q4KM,
    /// `LLAMA_FTYPE_MOSTLY_F16`.
    F16,
}

/// Quantizes a GGUF model file with llama.cpp's `llama_model_quantize`.
pub fn quantize(src: &Path, dst: &Path, quant: Quant, n_threads: i32) -> Result<(), LlamaError> {
    init();
    let csrc = path_cstring(src)?;
    let cdst = path_cstring(dst)?;
    // SAFETY: no preconditions; returns a plain struct of defaults with null optional pointers.
    let mut p = unsafe { sys::llama_model_quantize_default_params() };
    p.nthread = n_threads;
    p.ftype = match quant {
        Quant::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
        Quant::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
        Quant::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
    };
    clear_log_errors();
    // SAFETY: both paths are NUL-terminated and alive across the call; `p` is llama.cpp's default
    // params with plain fields changed and no pointers set by us.
    let rc = unsafe { shim::model_quantize(csrc.as_ptr(), cdst.as_ptr(), &p) }
        .map_err(|e| LlamaError::Quantize { path: src.to_owned(), detail: e.to_string() })?;
    if rc != 0 {
        return Err(LlamaError::Quantize { path: src.to_owned(), detail: take_log_errors() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Calls of `llama_get_logits_ith` made by [`Context::logits`].
    pub(super) static LOGITS_ASKED: AtomicUsize = AtomicUsize::new(0);

    fn strides(ne: [i64; 4]) -> [usize; 4] {
        let mut nb = [4usize; 4];
        for k in 1..4 {
            nb[k] = nb[k - 1] * ne[k - 1] as usize;
        }
        nb
    }

    #[test]
    fn dense_f32_rows_are_checked_in_all_four_dimensions() {
        let ne = [8, 3, 2, 2];
        assert!(is_dense_f32(ne, strides(ne)));
        assert_eq!(dense_rows(ne), 12);
        // Rows packed in dimensions 0 and 1, but the planes of dimension 2 have a gap between them
        // (a view of a larger tensor): counting ne1*ne2*ne3 rows would read past the planes.
        let mut gap = strides(ne);
        gap[2] += 32;
        gap[3] = gap[2] * 2;
        assert!(!is_dense_f32(ne, gap));
        // Dimensions 2 and 3 swapped (a permuted view): the rows are not in row order.
        let mut permuted = strides(ne);
        permuted.swap(2, 3);
        assert!(!is_dense_f32(ne, permuted));
        // Overflowing and negative extents.
        assert!(!is_dense_f32([i64::MAX, 2, 1, 1], [4, usize::MAX, 0, 0]));
        assert!(!is_dense_f32([8, -1, 1, 1], strides([8, 1, 1, 1])));
    }

    #[test]
    fn logits_of_rows_that_did_not_ask_never_reach_llama_cpp() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models");
        let model = Model::load(&dir.join("llama-tiny-f32.gguf")).expect("fixture model");
        let mut ctx = Context::new(&model, &ContextParams { n_ctx: 64, n_batch: 64, n_ubatch: 64, ..ContextParams::default() }, None)
            .expect("context");
        let mut batch = Batch::new(4);
        for i in 0..3 {
            batch.push(1 + i, i, i == 2).unwrap();
        }
        ctx.decode(&batch).unwrap();
        let before = LOGITS_ASKED.load(Ordering::SeqCst);
        assert!(ctx.logits(0).is_none() && ctx.logits(1).is_none() && ctx.logits(3).is_none());
        assert_eq!(LOGITS_ASKED.load(Ordering::SeqCst), before, "llama.cpp was asked for a row without logits (a debug build aborts)");
        assert!(ctx.logits(2).is_some());
        assert_eq!(LOGITS_ASKED.load(Ordering::SeqCst), before + 1);
    }
}
