//! libiapt: IAPT adapters in any llama.cpp-based application, through a C API (`include/iapt.h`).
//!
//! The application keeps its own llama.cpp: it creates an `iapt_hook` ([`IaptHook`]) for its model, sets
//! `cparams.cb_eval = iapt_hook_eval_callback; cparams.cb_eval_user_data = hook;` itself (libiapt
//! never writes a llama.cpp struct, so a layout change between llama.cpp versions cannot corrupt the
//! application), binds adapters to sequences with [`iapt_hook_set_adapter`], and brackets every
//! `llama_decode` with [`iapt_hook_prepare`] and [`iapt_hook_finish`]. The hook is the one
//! `iapt-hook` shares with the `iapt` binary's engine ([`iapt_hook::StreamHook`]): several sequences
//! per batch, each with its own adapter, instruction and soft slots spread over any number of
//! decodes (chunked prefill).
//!
//! ```c
//! iapt_adapter *a = iapt_adapter_load("sorter.iapt.safetensors", err, sizeof err);
//! iapt_hook *h = iapt_hook_new(model, err, sizeof err);
//! cparams.cb_eval = iapt_hook_eval_callback; cparams.cb_eval_user_data = h;
//! cparams.kv_unified = true;   /* batch rows stay in batch order across ubatches */
//! struct llama_context *ctx = llama_init_from_model(model, cparams);
//! iapt_hook_set_adapter(h, 0, a, n_instruction, err, sizeof err);
//! /* batch: seq 0, positions 0 .. n_instruction + m - 1 (the last m tokens are placeholders) */
//! iapt_hook_prepare(h, &batch, err, sizeof err);
//! llama_decode(ctx, batch);
//! iapt_hook_finish(h, err, sizeof err);  /* 0, or what went wrong inside the decode */
//! ```
//!
//! **Many adapters.** An `iapt_registry` ([`IaptRegistry`]) loads adapters by path on first use
//! and keeps a bounded resident set (count and bytes, least recently used first, never one a
//! handle or a hook sequence holds), reloading a file whose content changed:
//! [`iapt_registry_get`] instead of [`iapt_adapter_load`].
//!
//! **Prefix cache** (on by default, [`iapt_hook_set_cache`] sizes it or turns it off): the hook
//! keeps what its sequences' prefills pooled, keyed by the instruction's exact token ids (the
//! hook's own model) and the adapter's loaded generator (`iapt_hook::prefix`, the cache the
//! `iapt` engine keeps too): each adapter's pooling snapshots every 256 rows and at the
//! instruction's end, and each layer's input rows, so that another adapter pools a shared prefix
//! without a forward pass. The application keeps the KV of the instruction rows as it keeps any
//! prompt's (llama-cpp-python's prefix reuse, llama-server's slots, `llama_memory_seq_cp` from
//! another sequence: those rows are the base model's alone, the same for every adapter) and binds
//! with [`iapt_hook_set_adapter_tokens`], saying how many leading tokens its KV holds; the hook
//! answers how many of them it can go on from:
//!
//! ```c
//! int32_t k = iapt_hook_set_adapter_tokens(h, seq, a, tokens, n, n_kept, err, sizeof err);
//! llama_memory_seq_rm(llama_get_memory(ctx), seq, k, -1);  /* k >= 0: keep [0, k) */
//! /* then decode positions k .. n + m - 1 of seq, as above */
//! ```
//!
//! **Linking: one llama.cpp, one ggml per process.** The hook reads and writes graph tensors with
//! the ggml the application's tensors belong to, so libiapt must not bring its own: it is linked
//! against the shared libraries of the toolkit's one llama.cpp (llama-cpp-sys-2's, the same the
//! `iapt` binary loads), which records NEEDED entries for `libllama.so.0` and the `libggml*.so.0`
//! libraries and RUNPATH `$ORIGIN`. In a host that already loaded a llama.cpp under those sonames
//! (a C program linked with `-lllama`, llama-cpp-python with `LLAMA_CPP_LIB_PATH`), the dynamic
//! linker reuses the loaded libraries; a host alone gets the ones installed beside libiapt. The
//! structs it declares by hand are checked against that llama.cpp at compile time (`ffi::layout`).
//!
//! **Errors.** Every function returns `IAPT_OK` (0) or a negative `IAPT_ERR_*` code, or NULL for
//! constructors, and writes a NUL-terminated message into `err` when it is not NULL (truncated to
//! `err_size`). No call unwinds or aborts across the boundary: each catches panics
//! (`IAPT_ERR_INTERNAL`). A callback cannot fail a decode, so errors inside one are recorded and
//! returned by [`iapt_hook_finish`].
//!
//! **Threads.** An `iapt_adapter` ([`IaptAdapter`]) is immutable and may be used from any thread, by any number of
//! hooks at once. An `iapt_hook` is internally locked, so no call corrupts it whatever the
//! threads, but its protocol is sequential (set adapters, prepare, decode, finish): drive one hook
//! from one thread at a time, as llama.cpp's context itself requires.
#![deny(missing_docs)]
#![deny(unsafe_code)]

/// cbindgen:ignore
#[allow(unsafe_code)] // The one module declaring foreign functions (their C declarations are llama.h's).
pub mod ffi;
#[allow(unsafe_code)] // Raw tensors, batches and C strings: every block states its invariant.
mod raw;
mod registry;

use std::collections::HashMap;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use iapt_format::{AdapterConfig, BaseModelInfo};
use iapt_generator::Generator;
use iapt_hook::prefix::{self, PrefixCache, Rows, Token};
use iapt_hook::{arch_spec, supported_archs, PoolKey, PoolSnapshot, Prefill, Segment, StreamHook};

use ffi::{ggml_tensor, llama_batch, llama_context, llama_model, llama_seq_id};
use raw::{ErrBuf, RawBatch};
pub use registry::IaptRegistry;

/// Success.
pub const IAPT_OK: i32 = 0;
/// A required pointer (handle, path, batch) was NULL.
pub const IAPT_ERR_NULL: i32 = -1;
/// A panic inside libiapt was caught (a bug; the message says where).
pub const IAPT_ERR_INTERNAL: i32 = -2;
/// The model's architecture is not supported by the hook.
pub const IAPT_ERR_UNSUPPORTED_ARCH: i32 = -3;
/// The adapter file could not be read or is invalid.
pub const IAPT_ERR_ADAPTER: i32 = -4;
/// The adapter was made for another base model (architecture, layers or width differ).
pub const IAPT_ERR_INCOMPATIBLE: i32 = -5;
/// An argument is out of range (`n_instruction <= 0`, instruction plus soft slots beyond the
/// context, a negative sequence id).
pub const IAPT_ERR_RANGE: i32 = -6;
/// The batch does not match what was set (positions out of order, a prefix row shared by several
/// sequences, embeddings instead of tokens, missing `pos`/`seq_id` arrays).
pub const IAPT_ERR_BATCH: i32 = -7;
/// A call out of order: `finish` without `prepare`, `prepare` or `set_adapter` between a
/// `prepare` and its `finish`.
pub const IAPT_ERR_STATE: i32 = -8;
/// The hook failed inside the decode (the message says where); the soft rows of the prepared
/// sequences are wrong, their prefill starts again at position 0.
pub const IAPT_ERR_DECODE: i32 = -9;
/// A registry's limits are reached and every resident adapter is in use (held by a handle or bound
/// to a hook sequence): nothing was loaded and nothing was dropped.
pub const IAPT_ERR_FULL: i32 = -10;

/// The prefix cache's size when a hook is made: 1 GiB, as `iapt serve --cache-mib`'s default.
pub const IAPT_DEFAULT_CACHE_BYTES: i64 = 1 << 30;

/// An error: a code and a message.
struct Failure(i32, String);

fn fail<T>(code: i32, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(code, msg.into()))
}

/// Runs `f`, catching panics; writes the message of an error into `err`.
fn guard(err: ErrBuf, f: impl FnOnce() -> Result<i32, Failure>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            err.write("");
            v
        }
        Ok(Err(Failure(code, msg))) => {
            err.write(&msg);
            code
        }
        Err(_) => {
            err.write("internal error: a panic was caught inside libiapt");
            IAPT_ERR_INTERNAL
        }
    }
}

/// `iapt_adapter` in C: a loaded adapter, its generator and the base model it was made for. Opaque to C; shared by
/// reference count (`iapt_adapter_free` drops the caller's reference, hooks keep their own).
pub struct IaptAdapter {
    gen: Arc<Generator>,
    config: AdapterConfig,
}

/// One sequence's binding: its adapter, instruction length, and the prefill progress.
struct SeqSlot {
    adapter: Arc<IaptAdapter>,
    n_instr: usize,
    m: usize,
    /// Prefix positions (instruction plus soft slots) decoded or reused so far.
    next: usize,
    /// The pooling state between decodes (while `0 < next < n_instr + m`).
    prefill: Option<Prefill>,
    /// The instruction's token ids: all of them when the application declared them
    /// ([`iapt_hook_set_adapter_tokens`]), else those its batches carried so far.
    tokens: Vec<Token>,
    declared: bool,
    /// Instruction rows reused from the prefix cache at binding.
    cached: usize,
    /// Pooling snapshots taken at checkpoints, for the cache.
    snaps: Vec<PoolSnapshot>,
    /// When the prefill keeps its input rows for the cache: the runs of rows before `cached`, and
    /// the bytes it will keep.
    capture: Option<(Vec<Arc<Rows>>, usize)>,
    /// Whether its instruction's entry is in the cache (stored once per prefill).
    stored: bool,
}

struct State {
    seqs: HashMap<llama_seq_id, SeqSlot>,
    cache: PrefixCache,
    /// Between `prepare` and `finish`: the sequences lent to the hook (in segment order) and their
    /// progress after the decode.
    armed: Option<Vec<(llama_seq_id, usize)>>,
    n_ctx: usize,
    n_ubatch: usize,
}

/// `iapt_hook` in C: the hook of one model (and one context). Opaque to C.
pub struct IaptHook {
    stream: StreamHook,
    base: BaseModelInfo,
    state: Mutex<State>,
}

impl IaptHook {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a call panicked (caught and reported); the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The library's version (`MAJOR.MINOR.PATCH`), a static NUL-terminated string. Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Loads an adapter file (`.iapt.safetensors` or `.iapt.gguf`) and builds its CPU generator.
/// Returns NULL on error, with the message (including the spec's finding codes) in `err`.
/// Thread-safe; the result is owned by the caller ([`iapt_adapter_free`]).
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_adapter_load(path: *const c_char, err: *mut c_char, err_size: usize) -> *mut IaptAdapter {
    let err = raw::err_buf(err, err_size);
    let mut out: *mut IaptAdapter = std::ptr::null_mut();
    guard(err, || {
        let path = raw::path(path)?;
        let file = std::fs::File::open(&path).map_err(|e| Failure(IAPT_ERR_ADAPTER, format!("{}: cannot open: {e}", path.display())))?;
        out = Arc::into_raw(Arc::new(load_opened(file, &path)?)).cast_mut();
        Ok(IAPT_OK)
    });
    out
}

/// Validates the adapter in `file` (named `path` in messages) and builds its CPU generator; the
/// tensors are read from the file as the generator is built (no copy of the file is held).
fn load_opened(file: std::fs::File, path: &std::path::Path) -> Result<IaptAdapter, Failure> {
    let v = iapt_format::validate_opened(file, path, None);
    let Some(adapter) = v.adapter else {
        return fail(IAPT_ERR_ADAPTER, format!("{}: not a valid IAPT adapter:\n{}", path.display(), v.report));
    };
    // W003: weights beyond +-65504 overflow the generator in f32 on ordinary hidden states.
    if let Some(f) = adapter.warnings().iter().find(|f| f.code == iapt_format::Code::LargeWeight) {
        return fail(IAPT_ERR_ADAPTER, format!("{}: refused: {f}", path.display()));
    }
    let gen = Generator::from_adapter(&adapter).map_err(|e| Failure(IAPT_ERR_ADAPTER, format!("{}: {e}", path.display())))?;
    Ok(IaptAdapter { gen: Arc::new(gen), config: adapter.config().clone() })
}

/// Creates a registry of adapters by path with a bounded resident set: at most `max_resident`
/// adapters and `max_bytes` bytes of generator weights (0: no limit; negative: an error). See
/// [`iapt_registry_get`]. Returns NULL on error (`err`). The caller owns the result
/// ([`iapt_registry_free`]). Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_registry_new(max_resident: i32, max_bytes: i64, err: *mut c_char, err_size: usize) -> *mut IaptRegistry {
    let mut out: *mut IaptRegistry = std::ptr::null_mut();
    guard(raw::err_buf(err, err_size), || {
        if max_resident < 0 || max_bytes < 0 {
            return fail(IAPT_ERR_RANGE, format!("max_resident {max_resident} and max_bytes {max_bytes} must be >= 0 (0: no limit)"));
        }
        let limit = |v: i64| (v > 0).then(|| usize::try_from(v).unwrap_or(usize::MAX));
        out = Box::into_raw(Box::new(IaptRegistry::new(limit(i64::from(max_resident)), limit(max_bytes))));
        Ok(IAPT_OK)
    });
    out
}

/// Frees a registry (NULL is ignored). Adapters it returned stay valid until their own
/// [`iapt_adapter_free`] (and hooks keep theirs). Not thread-safe with other calls on it.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_registry_free(registry: *mut IaptRegistry) {
    let _ = catch_unwind(|| raw::registry_free(registry));
}

/// The adapter of the file at `path`, loaded on first use and resident afterwards: a new reference
/// the caller frees with [`iapt_adapter_free`] (free it once the sequences it serves are
/// prefilled, so the registry may drop it). Concurrent first gets of one path load it once; a file
/// changed on disk (content hash) is loaded again, and handles of the old version stay valid. To
/// make room the least recently used adapters nobody holds are dropped; when every resident
/// adapter is held, NULL with `IAPT_ERR_FULL` in `err`. NULL on any error (`err`). Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_registry_get(
    registry: *const IaptRegistry,
    path: *const c_char,
    err: *mut c_char,
    err_size: usize,
) -> *mut IaptAdapter {
    let mut out: *mut IaptAdapter = std::ptr::null_mut();
    guard(raw::err_buf(err, err_size), || {
        let r = raw::registry_ref(registry)?;
        let path = raw::path(path)?;
        out = Arc::into_raw(r.get(&path)?).cast_mut();
        Ok(IAPT_OK)
    });
    out
}

/// Writes the registry's resident adapters, their bytes of generator weights and its loads so far
/// (first loads and reloads) through the out-pointers that are not NULL. Returns 0 or
/// `IAPT_ERR_NULL`. Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_registry_stats(registry: *const IaptRegistry, n_resident: *mut i64, bytes: *mut i64, loads: *mut i64) -> i32 {
    guard(ErrBuf::none(), || {
        let s = raw::registry_ref(registry)?.stats();
        let to = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        raw::write_out(n_resident, to(s.resident as u64));
        raw::write_out(bytes, to(s.bytes as u64));
        raw::write_out(loads, to(s.loads));
        Ok(IAPT_OK)
    })
}

/// Releases the caller's reference to an adapter (NULL is ignored). Safe while hooks still use it:
/// they hold their own references until their sequence is cleared or the hook is freed. Thread-safe;
/// each handle is freed once.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_adapter_free(adapter: *mut IaptAdapter) {
    let _ = catch_unwind(|| raw::adapter_release(adapter));
}

/// The adapter's soft tokens m (the number of placeholder positions after the instruction), or
/// `IAPT_ERR_NULL` for NULL. Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_adapter_n_soft_tokens(adapter: *const IaptAdapter) -> i32 {
    guard(ErrBuf::none(), || {
        let a = raw::adapter_ref(adapter)?;
        Ok(i32::try_from(a.gen.n_soft_tokens()).unwrap_or(i32::MAX))
    })
}

/// Creates a hook for `model`: checks that its architecture (`general.architecture`) is one the
/// hook supports. Returns NULL on error (`err`). The caller owns the result ([`iapt_hook_free`])
/// and must keep `model` alive while the hook lives. Thread-safe.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_new(model: *const llama_model, err: *mut c_char, err_size: usize) -> *mut IaptHook {
    let err = raw::err_buf(err, err_size);
    let mut out: *mut IaptHook = std::ptr::null_mut();
    guard(err, || {
        let m = raw::model_info(model)?;
        let Some(spec) = arch_spec(&m.arch) else {
            return fail(
                IAPT_ERR_UNSUPPORTED_ARCH,
                format!("the model's architecture {:?} is not supported (supported: {})", m.arch, supported_archs()),
            );
        };
        let stream = StreamHook::new(*spec, m.n_layer as usize, m.n_embd as usize);
        let cache = PrefixCache::new(IAPT_DEFAULT_CACHE_BYTES as usize);
        let state = State { seqs: HashMap::new(), cache, armed: None, n_ctx: m.n_ctx_train, n_ubatch: 0 };
        let base = BaseModelInfo { arch: m.arch, n_layer: m.n_layer, n_embd: m.n_embd };
        out = Box::into_raw(Box::new(IaptHook { stream, base, state: Mutex::new(state) }));
        Ok(IAPT_OK)
    });
    out
}

/// Frees a hook (NULL is ignored) and its references to adapters. Call it after `llama_free` of
/// the context whose `cb_eval_user_data` it is. Not thread-safe with other calls on the same hook.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_free(hook: *mut IaptHook) {
    let _ = catch_unwind(|| raw::hook_free(hook));
}

/// Optional: tells the hook the context it serves, after `llama_init_from_model`. The hook then
/// checks instruction plus soft slots against `llama_n_ctx(ctx)` (instead of the model's training
/// context) and knows `llama_n_ubatch(ctx)` (instead of learning it from the first ubatch).
/// Returns 0 or a negative code. Call it before the first `prepare`.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_set_context(hook: *mut IaptHook, ctx: *const llama_context, err: *mut c_char, err_size: usize) -> i32 {
    guard(raw::err_buf(err, err_size), || {
        let h = raw::hook_ref(hook)?;
        let (n_ctx, n_ubatch) = raw::context_info(ctx)?;
        let mut st = h.lock();
        st.n_ctx = n_ctx;
        st.n_ubatch = n_ubatch;
        Ok(IAPT_OK)
    })
}

/// Binds `adapter` to sequence `seq` from now on: in its rows, positions `[0, n_instruction)` are
/// the instruction and `[n_instruction, n_instruction + m)` the soft slots (any token ids; their
/// rows are overwritten at every layer); the logits at position `n_instruction + m - 1` give the
/// first response token. `adapter = NULL` clears the sequence. The adapter is checked against the
/// model (architecture, layers, width; spec finding codes in `err`); the hook keeps its own
/// reference. Rebinding a sequence restarts its prefill at position 0 (its instruction tokens are
/// learned from the batches, for the prefix cache); [`iapt_hook_set_adapter_tokens`] can go on
/// from a cached prefix instead. Not between `prepare` and `finish`.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_set_adapter(
    hook: *mut IaptHook,
    seq: llama_seq_id,
    adapter: *const IaptAdapter,
    n_instruction: i32,
    err: *mut c_char,
    err_size: usize,
) -> i32 {
    guard(raw::err_buf(err, err_size), || bind(raw::hook_ref(hook)?, seq, adapter, n_instruction, None))
}

/// As [`iapt_hook_set_adapter`], with the instruction's `n_instruction` token ids, of which the
/// context's KV already holds the first `n_kept` for this sequence (the application's own prefix
/// reuse; 0: none). Returns `k` in `0..=n_kept`, the leading positions whose pooling the hook's
/// prefix cache holds for this adapter: the application removes the sequence's cells from `k` on
/// (`llama_memory_seq_rm(mem, seq, k, -1)`) and its next decode of the sequence starts at
/// position `k` (or at 0). The batches must then carry these very tokens (else
/// `IAPT_ERR_BATCH`). A negative code on error, with `err`. With `adapter = NULL` the sequence
/// is cleared and `n_kept` returned. Not between `prepare` and `finish`.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_set_adapter_tokens(
    hook: *mut IaptHook,
    seq: llama_seq_id,
    adapter: *const IaptAdapter,
    tokens: *const i32,
    n_instruction: i32,
    n_kept: i32,
    err: *mut c_char,
    err_size: usize,
) -> i32 {
    guard(raw::err_buf(err, err_size), || {
        let h = raw::hook_ref(hook)?;
        let n = usize::try_from(n_instruction).unwrap_or(0);
        let kept = usize::try_from(n_kept)
            .ok()
            .filter(|&k| k <= n)
            .ok_or_else(|| Failure(IAPT_ERR_RANGE, format!("n_kept is {n_kept}: it must be within 0..=n_instruction ({n_instruction})")))?;
        let tokens = raw::tokens(tokens, n)?;
        bind(h, seq, adapter, n_instruction, Some((tokens, kept)))
    })
}

/// Binds (or clears) a sequence; with declared tokens, goes on from the longest prefix of the
/// first `kept` that the cache can give this adapter, and returns its length.
fn bind(
    h: &IaptHook,
    seq: llama_seq_id,
    adapter: *const IaptAdapter,
    n_instruction: i32,
    declared: Option<(&[Token], usize)>,
) -> Result<i32, Failure> {
    let mut st = h.lock();
    if st.armed.is_some() {
        return fail(IAPT_ERR_STATE, "binding a sequence between iapt_hook_prepare and iapt_hook_finish");
    }
    if seq < 0 {
        return fail(IAPT_ERR_RANGE, format!("sequence id {seq} is negative"));
    }
    if adapter.is_null() {
        st.seqs.remove(&seq);
        return Ok(declared.map_or(0, |(_, kept)| kept as i32));
    }
    let a = raw::adapter_clone(adapter)?;
    let findings = h.base.check(&a.config);
    if !findings.is_empty() {
        let detail = findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ");
        return fail(IAPT_ERR_INCOMPATIBLE, detail);
    }
    let m = a.gen.n_soft_tokens();
    if n_instruction <= 0 {
        return fail(IAPT_ERR_RANGE, format!("n_instruction is {n_instruction}: the instruction needs at least one token"));
    }
    let n = n_instruction as usize;
    if n + m > st.n_ctx {
        return fail(IAPT_ERR_RANGE, format!("{n} instruction tokens plus {m} soft slots exceed the context of {} tokens", st.n_ctx));
    }
    st.seqs.remove(&seq);
    let gen = a.gen.clone();
    let mut slot = SeqSlot {
        adapter: a,
        n_instr: n,
        m,
        next: 0,
        prefill: None,
        tokens: declared.map_or_else(Vec::new, |(t, _)| t.to_vec()),
        declared: declared.is_some(),
        cached: 0,
        snaps: Vec::new(),
        capture: None,
        stored: false,
    };
    if let Some((tokens, kept)) = declared {
        let hit = st.cache.lookup(&tokens[..kept], Some(PoolKey::Cpu(gen.id())));
        let resumed = hit.and_then(|hit| {
            let start = |snap: Option<&PoolSnapshot>| {
                snap.map_or_else(|| Some(Prefill::cpu(gen.clone(), n)), |s| Prefill::cpu_from(gen.clone(), n, s))
            };
            hit.resume(start).map(|pf| (hit.reuse, pf, hit.inputs))
        });
        if let Some((reuse, pf, runs)) = resumed {
            slot.next = reuse;
            slot.cached = reuse;
            slot.prefill = Some(pf);
            slot.capture = runs.and_then(|runs| capture(&st, &h.base, &mut slot, runs));
        }
    }
    let k = slot.next as i32;
    st.seqs.insert(seq, slot);
    Ok(k)
}

/// Whether `slot`'s prefill keeps its input rows for the cache (the rows before `slot.cached`
/// being `runs`): see [`PrefixCache::may_capture`]. Turns the capture on and returns what the
/// sequence's entry will start with.
fn capture(st: &State, base: &BaseModelInfo, slot: &mut SeqSlot, runs: Vec<Arc<Rows>>) -> Option<(Vec<Arc<Rows>>, usize)> {
    let bytes = base.n_layer as usize * (slot.n_instr - slot.cached) * base.n_embd as usize * 4;
    let in_flight: usize = st.seqs.values().filter_map(|s| s.capture.as_ref()).map(|(_, b)| b).sum();
    if !st.cache.may_capture(in_flight, bytes) {
        return None;
    }
    slot.prefill.as_mut().is_some_and(Prefill::capture_inputs).then_some((runs, bytes))
}

/// Sets the prefix cache's size in bytes (0 turns it off; a hook starts with
/// [`IAPT_DEFAULT_CACHE_BYTES`]) and empties it. Returns 0 or a negative code. Not between
/// `prepare` and `finish`.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_set_cache(hook: *mut IaptHook, max_bytes: i64, err: *mut c_char, err_size: usize) -> i32 {
    guard(raw::err_buf(err, err_size), || {
        let h = raw::hook_ref(hook)?;
        let bytes = usize::try_from(max_bytes)
            .map_err(|_| Failure(IAPT_ERR_RANGE, format!("max_bytes is {max_bytes}: it must be >= 0 (0: off)")))?;
        let mut st = h.lock();
        if st.armed.is_some() {
            return fail(IAPT_ERR_STATE, "iapt_hook_set_cache between iapt_hook_prepare and iapt_hook_finish");
        }
        st.cache = PrefixCache::new(bytes);
        for slot in st.seqs.values_mut() {
            slot.capture = None;
            if let Some(pf) = slot.prefill.as_mut() {
                pf.take_inputs();
            }
        }
        Ok(IAPT_OK)
    })
}

/// Writes the prefix cache's counters through the out-pointers that are not NULL: bindings that
/// reused a cached prefix (`hits`) and that found none (`misses`), instruction tokens reused, and
/// the bytes it holds now. Returns 0 or `IAPT_ERR_NULL`.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_cache_stats(
    hook: *const IaptHook,
    hits: *mut i64,
    misses: *mut i64,
    tokens_reused: *mut i64,
    bytes: *mut i64,
) -> i32 {
    guard(ErrBuf::none(), || {
        let st = raw::hook_ref(hook)?.lock().cache.stats.clone();
        let to = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        raw::write_out(hits, to(st.hits));
        raw::write_out(misses, to(st.misses));
        raw::write_out(tokens_reused, to(st.tokens_reused));
        raw::write_out(bytes, to(st.bytes as u64));
        Ok(IAPT_OK)
    })
}

/// Plans the next `llama_decode` of `batch`: finds each bound sequence's prefix rows (instruction
/// and soft slots) and arms the callback. Each bound sequence's prefix rows must be contiguous in
/// the batch, belong to that sequence alone, and continue its prefix where the previous decode
/// left it (or restart it at position 0); the batch must carry token ids with `pos` and `seq_id`
/// arrays. On error nothing is armed. Call [`iapt_hook_finish`] after the decode, whatever it
/// returned. The hook follows llama.cpp's ubatches in batch order, so a context with
/// `n_seq_max > 1` needs `cparams.kv_unified = true` (tested with it only). Not thread-safe with a
/// decode of the same hook's context.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_prepare(hook: *mut IaptHook, batch: *const llama_batch, err: *mut c_char, err_size: usize) -> i32 {
    guard(raw::err_buf(err, err_size), || {
        let h = raw::hook_ref(hook)?;
        let batch = raw::batch(batch)?;
        let mut st = h.lock();
        if st.armed.is_some() {
            return fail(IAPT_ERR_STATE, "iapt_hook_prepare called twice without iapt_hook_finish");
        }
        let plan = plan_batch(&st, &batch)?;
        let n_ubatch = st.n_ubatch;
        let mut segs = Vec::with_capacity(plan.len());
        let mut lent = Vec::with_capacity(plan.len());
        for p in plan {
            let mut slot = st.seqs.remove(&p.seq).expect("planned from the bound sequences");
            if p.first == 0 || slot.prefill.is_none() {
                // A start (or a restart) at position 0: nothing reused.
                slot.prefill = Some(Prefill::cpu(slot.adapter.gen.clone(), slot.n_instr));
                (slot.cached, slot.stored) = (0, false);
                slot.snaps.clear();
                slot.capture = capture(&st, &h.base, &mut slot, Vec::new());
            }
            if !slot.declared {
                slot.tokens.truncate(p.first);
                slot.tokens.extend(&p.tokens);
            }
            let prefill = slot.prefill.take().expect("set above");
            segs.push(Segment { row0: p.row0, first: p.first, len: p.len, prefill });
            lent.push((p.seq, p.first + p.len));
            st.seqs.insert(p.seq, slot);
        }
        if !segs.is_empty() {
            h.stream.arm(segs, iapt_hook::Split::Simple { batch_len: batch.n_tokens(), n_ubatch });
        }
        st.armed = Some(lent);
        Ok(IAPT_OK)
    })
}

/// Ends the decode [`iapt_hook_prepare`] planned: returns 0, or `IAPT_ERR_DECODE` with what went
/// wrong inside it (then the prepared sequences restart their prefill at position 0), or
/// `IAPT_ERR_STATE` without a `prepare`. Not thread-safe with a decode of the same hook's context.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_finish(hook: *mut IaptHook, err: *mut c_char, err_size: usize) -> i32 {
    guard(raw::err_buf(err, err_size), || {
        let h = raw::hook_ref(hook)?;
        let mut st = h.lock();
        let Some(lent) = st.armed.take() else {
            return fail(IAPT_ERR_STATE, "iapt_hook_finish without iapt_hook_prepare");
        };
        if lent.is_empty() {
            return Ok(IAPT_OK);
        }
        let (states, result) = h.stream.finish();
        let ok = result.is_ok();
        let st = &mut *st;
        for ((seq, next), mut prefill) in lent.into_iter().zip(states) {
            if let Some(slot) = st.seqs.get_mut(&seq) {
                let whole = slot.n_instr + slot.m;
                slot.next = if ok { next } else { 0 };
                if ok && st.cache.enabled() {
                    keep_for_cache(&mut st.cache, slot, &mut prefill, h.base.n_embd as usize);
                }
                slot.prefill = (ok && next < whole).then_some(prefill);
                if !ok {
                    slot.capture = None;
                }
            }
        }
        match result {
            Ok(()) => Ok(IAPT_OK),
            Err(errors) => fail(IAPT_ERR_DECODE, errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
        }
    })
}

/// After a decode that took `slot`'s prefill to `slot.next`: copies its pooling at a checkpoint,
/// and stores the instruction's entry (snapshots and kept input rows) once the instruction is
/// pooled whole.
fn keep_for_cache(cache: &mut PrefixCache, slot: &mut SeqSlot, prefill: &mut Prefill, n_embd: usize) {
    if PrefixCache::is_checkpoint(slot.next, slot.n_instr) {
        slot.snaps.extend(prefill.snapshot());
    }
    if slot.stored || slot.next < slot.n_instr || slot.tokens.len() < slot.n_instr {
        return;
    }
    slot.stored = true;
    slot.snaps.extend(prefill.snapshot());
    let kept = prefill.take_inputs();
    let inputs = match (slot.capture.take(), kept) {
        (Some((mut runs, _)), Some(rows)) => {
            runs.extend(prefix::runs(slot.cached, n_embd, rows));
            runs
        }
        _ => Vec::new(),
    };
    cache.store(slot.tokens[..slot.n_instr].to_vec(), Vec::new(), std::mem::take(&mut slot.snaps), inputs);
}

/// The `cb_eval` callback: set `cparams.cb_eval = iapt_hook_eval_callback` and
/// `cparams.cb_eval_user_data = hook`. Claims the layer-input nodes while a `prepare` is armed and
/// handles them; errors are recorded for [`iapt_hook_finish`]. Never unwinds; with a NULL hook it
/// claims nothing. Called by llama.cpp on the decoding thread.
#[allow(unsafe_code)] // `no_mangle`: exported under its C name.
#[no_mangle]
pub extern "C" fn iapt_hook_eval_callback(t: *mut ggml_tensor, ask: bool, hook: *mut std::ffi::c_void) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        let Ok(h) = raw::hook_ref(hook.cast()) else { return !ask };
        let Some(mut node) = raw::Node::new(t) else { return !ask };
        if ask {
            h.stream.wants(node.name_str())
        } else {
            h.stream.on_data(&mut node);
            true
        }
    }))
    // In the ask phase "not wanted"; in the data phase "continue".
    .unwrap_or(!ask)
}

/// One bound sequence's prefix rows in a batch.
struct Planned {
    seq: llama_seq_id,
    row0: usize,
    first: usize,
    len: usize,
    /// The token ids of its instruction rows.
    tokens: Vec<Token>,
}

/// Finds the prefix rows of the bound sequences in `batch` and checks them (see `iapt_hook_prepare`).
fn plan_batch(st: &State, batch: &RawBatch<'_>) -> Result<Vec<Planned>, Failure> {
    let mut plan: Vec<Planned> = Vec::new();
    let mut idx: HashMap<llama_seq_id, usize> = HashMap::new();
    if st.seqs.is_empty() {
        return Ok(plan);
    }
    for row in 0..batch.n_tokens() {
        let (pos, seqs) = batch.row(row).map_err(|e| Failure(IAPT_ERR_BATCH, e))?;
        for &seq in seqs {
            let Some(slot) = st.seqs.get(&seq) else { continue };
            let whole = slot.n_instr + slot.m;
            let bad = |msg: String| Failure(IAPT_ERR_BATCH, format!("batch row {row} (sequence {seq}, position {pos}): {msg}"));
            if pos < 0 {
                return Err(bad("negative position".to_owned()));
            }
            let p = pos as usize;
            match idx.get(&seq).map(|&i| &mut plan[i]) {
                Some(seg) if p < whole => {
                    if seg.row0 + seg.len != row || seg.first + seg.len != p {
                        return Err(bad(format!(
                            "the sequence's prefix rows must be contiguous in the batch with consecutive positions (previous row {} at position {})",
                            seg.row0 + seg.len - 1,
                            seg.first + seg.len - 1
                        )));
                    }
                    seg.len += 1;
                    if p < slot.n_instr {
                        seg.tokens.push(batch.token(row).unwrap_or(-1));
                    }
                }
                Some(seg) if seg.first + seg.len != whole => {
                    return Err(bad(format!("the prefix ends at position {} of {whole}: positions skipped", seg.first + seg.len)));
                }
                Some(_) => {}
                None if p < whole || slot.next < whole => {
                    if p != 0 && p != slot.next {
                        return Err(bad(format!(
                            "expected position {} (instruction {} + soft slots {}: decoded in order, or restarted at 0)",
                            slot.next, slot.n_instr, slot.m
                        )));
                    }
                    if p >= whole {
                        continue;
                    }
                    idx.insert(seq, plan.len());
                    let tokens = if p < slot.n_instr { vec![batch.token(row).unwrap_or(-1)] } else { Vec::new() };
                    plan.push(Planned { seq, row0: row, first: p, len: 1, tokens });
                }
                None => {}
            }
            if p < whole && seqs.len() != 1 {
                return Err(bad(format!("a prefix row belongs to {} sequences; it must belong to its sequence alone", seqs.len())));
            }
            if slot.declared && p < slot.n_instr && batch.token(row).is_some_and(|t| t != slot.tokens[p]) {
                return Err(bad(format!(
                    "token {} differs from the instruction token {} declared to iapt_hook_set_adapter_tokens",
                    batch.token(row).unwrap_or(-1),
                    slot.tokens[p]
                )));
            }
        }
    }
    if !plan.is_empty() && batch.has_embd() {
        return fail(IAPT_ERR_BATCH, "the batch carries embeddings (batch.embd): the hook needs token ids");
    }
    Ok(plan)
}
