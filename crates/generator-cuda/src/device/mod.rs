//! The IAPT generator on a GPU: [`GpuRuntime`] (one CUDA device through `cudarc`, or the CPU
//! emulator of the same kernels), [`GpuAdapter`] (an adapter's weights in device memory),
//! [`GpuSeqState`] (one sequence's streaming state for every layer), and the device-row views
//! [`DevRows`] / [`DevRowsMut`] through which llama.cpp's tensors are read and written without a
//! host round trip.
//!
//! The orchestration here (validation, upload, state layout, the sequence of launches) is shared
//! by both backends; only allocation, copies, launches and synchronisation differ
//! (`cuda` with the `cuda` feature, `emulated` with the `emulation` feature). The kernels are `device/kernels.cu`
//! (see its header for the pipeline and launch geometry).
//!
//! Semantics: those of `iapt_generator`'s PoolFirst path (any chunking gives the one-shot result),
//! with the scores, softmax statistics and pooled sums in f64 and K^T = Q W_down precomputed in f64
//! on the host and stored as f32. Work is queued on the runtime's own stream; `feed_*` returns
//! before the kernels finish, `finish_*` and [`GpuRuntime::synchronize`] wait for them. A
//! non-finite score is reported by `finish_*` (which synchronise), and then nothing is written.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "emulation")]
mod emulated;

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iapt_format::{Activation, Adapter, DType, RationalVariant, Role, TensorName};

use crate::error::GpuError;

/// Largest number of soft tokens the kernels handle (`IAPT_MAX_M` in kernels.cu).
pub const GPU_MAX_SOFT_TOKENS: usize = 8;
/// Threads per block on a real device.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CUDA_BLOCK: u32 = 256;
/// Largest block the kernels' shared arrays allow (`IAPT_MAX_BLOCK`).
#[cfg_attr(not(feature = "emulation"), allow(dead_code))]
const MAX_BLOCK: u32 = 256;
/// Threads per output-channel group in the projection kernels (`IAPT_GROUP`).
const GROUP: u32 = 32;
/// `IAPT_NO_BAD_ROW`: the error word's value while every score is finite.
const NO_BAD_ROW: i32 = i32::MAX;
/// Fewest rows one pooling block handles (more splits only add atomics).
const MIN_ROWS_PER_SPLIT: usize = 8;
/// Most rows the kernels index in one sequence and layer (they use `int` row indices).
const MAX_ROWS: usize = i32::MAX as usize;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Backend plumbing shared by CUDA and the emulator
// ---------------------------------------------------------------------------------------------

/// The kernels of kernels.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scores,
    Stats,
    Pool,
    Down(DType),
    Up(DType),
}

impl Kernel {
    /// Every kernel, in the order of [`Kernel::index`].
    const NAMES: [&'static str; 9] = [
        "iapt_scores",
        "iapt_stats",
        "iapt_pool",
        "iapt_down_f32",
        "iapt_down_f16",
        "iapt_down_bf16",
        "iapt_up_f32",
        "iapt_up_f16",
        "iapt_up_bf16",
    ];

    fn index(self) -> usize {
        // A device tensor is never Q8_0: `Uploader::tensor` widens Q8_0 to f32 on the host.
        let dt = |d: DType| match d {
            DType::F32 | DType::Q8_0 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        match self {
            Kernel::Scores => 0,
            Kernel::Stats => 1,
            Kernel::Pool => 2,
            Kernel::Down(d) => 3 + dt(d),
            Kernel::Up(d) => 6 + dt(d),
        }
    }

    #[cfg_attr(not(feature = "emulation"), allow(dead_code))]
    fn name(self) -> &'static str {
        Kernel::NAMES[self.index()]
    }
}

/// One kernel argument, passed by value (device pointers as `u64`, like CUDA's 64-bit pointers).
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    F64(f64),
}

impl Arg {
    /// A pointer to the value, as CUDA's `kernelParams` (and the emulator) expect. Valid while
    /// `self` is borrowed.
    #[cfg_attr(not(feature = "emulation"), allow(dead_code))]
    fn as_param(&self) -> *mut c_void {
        match self {
            Arg::Ptr(v) => v as *const u64 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F64(v) => v as *const f64 as *mut c_void,
        }
    }
}

/// Element types that may be viewed as bytes and back: no padding, every bit pattern valid.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for i32 {}
impl Plain for u8 {}

fn as_bytes<T: Plain>(s: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` has no padding bytes, so every byte of the slice is initialised; u8 has
    // alignment 1 and the length is exactly the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Plain>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; additionally every bit pattern is a valid `T: Plain`, so any bytes
    // written through the view leave valid values, and the view borrows `s` mutably.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// Memory owned by a backend (held only to be freed on drop).
#[allow(dead_code)]
enum Mem {
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<u8>),
    #[cfg(feature = "emulation")]
    Host(emulated::HostMem),
}

/// A device allocation: its address and size, and the owner that frees it.
struct DevBuf {
    ptr: u64,
    bytes: usize,
    _mem: Mem,
}

impl DevBuf {
    fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// A point in the stream's work, for timing.
enum Mark {
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaEvent),
    #[cfg(feature = "emulation")]
    Host(std::time::Instant),
}

/// The backends compiled into this build (none in a CPU-only build: then no [`GpuRuntime`] can be
/// made, and every match below is over an empty enum).
enum Backend {
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBackend),
    #[cfg(feature = "emulation")]
    Emulated(emulated::EmuBackend),
}

impl Backend {
    fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf, GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(ref b) => b.alloc_zeroed(bytes),
            #[cfg(feature = "emulation")]
            Backend::Emulated(ref b) => b.alloc_zeroed(bytes),
        }
    }

    /// Copies `src` to device address `dst` (queued on the stream; `src` may be reused on return).
    ///
    /// # Safety
    /// `dst .. dst + src.len()` lies inside one live allocation of this backend's device, and no
    /// kernel queued before this copy reads it after the copy (stream order guarantees that).
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            // SAFETY: forwarded contract.
            Backend::Cuda(ref b) => unsafe { b.htod(dst, src) },
            #[cfg(feature = "emulation")]
            // SAFETY: forwarded contract.
            Backend::Emulated(ref b) => unsafe { b.htod(dst, src) },
        }
    }

    /// Copies device memory at `src` into `dst` after all queued work (synchronous).
    ///
    /// # Safety
    /// `src .. src + dst.len()` lies inside one live allocation of this backend's device.
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            // SAFETY: forwarded contract.
            Backend::Cuda(ref b) => unsafe { b.dtoh(src, dst) },
            #[cfg(feature = "emulation")]
            // SAFETY: forwarded contract.
            Backend::Emulated(ref b) => unsafe { b.dtoh(src, dst) },
        }
    }

    /// Copies `bytes` device bytes from `src` to `dst` (queued).
    ///
    /// # Safety
    /// Both ranges lie inside live allocations of this backend's device and do not overlap.
    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            // SAFETY: forwarded contract.
            Backend::Cuda(ref b) => unsafe { b.dtod(dst, src, bytes) },
            #[cfg(feature = "emulation")]
            // SAFETY: forwarded contract.
            Backend::Emulated(ref b) => unsafe { b.dtod(dst, src, bytes) },
        }
    }

    /// Zeroes `bytes` device bytes at `dst` (queued).
    ///
    /// # Safety
    /// As for [`Backend::htod`].
    unsafe fn memset0(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            // SAFETY: forwarded contract.
            Backend::Cuda(ref b) => unsafe { b.memset0(dst, bytes) },
            #[cfg(feature = "emulation")]
            // SAFETY: forwarded contract.
            Backend::Emulated(ref b) => unsafe { b.memset0(dst, bytes) },
        }
    }

    /// Queues `kernel` on the stream.
    ///
    /// # Safety
    /// `args` match the kernel's parameter list in kernels.cu (count and types), every pointer
    /// argument is valid for every access the kernel makes with the other arguments and this grid
    /// and block (see the kernel's comment), and the block size is a power of two in
    /// [`GROUP`, `MAX_BLOCK`].
    unsafe fn launch(&self, kernel: Kernel, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            // SAFETY: forwarded contract.
            Backend::Cuda(ref b) => unsafe { b.launch(kernel, grid, block, args) },
            #[cfg(feature = "emulation")]
            // SAFETY: forwarded contract.
            Backend::Emulated(ref b) => unsafe { b.launch(kernel, grid, block, args) },
        }
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(ref b) => b.synchronize(),
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// Checks that `ptr .. ptr + bytes` is memory this backend's kernels may access.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn check_ptr(&self, ptr: u64, bytes: usize) -> Result<(), GpuError> {
        if ptr == 0 || ptr % 4 != 0 {
            return Err(GpuError::BadPointer { ptr });
        }
        match *self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(ref b) => b.check_ptr(ptr, bytes),
            // Host memory: nothing to ask (the `from_raw` contract covers it).
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => Ok(()),
        }
    }

    fn mark(&self) -> Result<Mark, GpuError> {
        match *self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(ref b) => b.mark(),
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => Ok(Mark::Host(std::time::Instant::now())),
        }
    }

    fn elapsed_ms(&self, a: &Mark, b: &Mark) -> Result<f64, GpuError> {
        match (self, a, b) {
            #[cfg(feature = "cuda")]
            (Backend::Cuda(_), Mark::Cuda(a), Mark::Cuda(b)) => cuda::elapsed_ms(a, b),
            #[cfg(feature = "emulation")]
            (_, Mark::Host(a), Mark::Host(b)) => Ok(b.duration_since(*a).as_secs_f64() * 1e3),
            #[allow(unreachable_patterns)]
            _ => Err(GpuError::Driver { op: "timing", detail: "marks from different backends".to_owned() }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device rows
// ---------------------------------------------------------------------------------------------

/// `n_rows` rows of `n_embd` f32 values, contiguous and row-major, in the runtime's device memory
/// (host memory for the emulator), readable for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct DevRows<'a> {
    ptr: u64,
    /// The runtime whose [`GpuRows`] these are, or 0 for rows from `from_raw`.
    origin: u64,
    n_rows: usize,
    n_embd: usize,
    _life: PhantomData<&'a [f32]>,
}

impl DevRows<'_> {
    /// Device rows at `ptr` (e.g. a ggml tensor's `data`, offset to the first row wanted).
    ///
    /// # Safety
    /// For the chosen lifetime `'a`: `ptr` is the address of `n_rows * n_embd` contiguous f32
    /// values in device memory of the runtime this is passed to (for the emulated runtime: host
    /// memory), inside one allocation, which stays allocated, and which nothing writes while
    /// work queued with these rows may still run (until the next `finish_*` or
    /// [`GpuRuntime::synchronize`] returns). The runtime checks what it can (null, alignment, and
    /// on CUDA the device ordinal and the allocation's extent) and returns an error on mismatch.
    pub unsafe fn from_raw<'a>(ptr: u64, n_rows: usize, n_embd: usize) -> DevRows<'a> {
        DevRows { ptr, origin: 0, n_rows, n_embd, _life: PhantomData }
    }

    /// Rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Values per row.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }
}

/// As [`DevRows`], writable: where `finish_device` puts the soft tokens.
#[derive(Debug)]
pub struct DevRowsMut<'a> {
    ptr: u64,
    /// As in [`DevRows`].
    origin: u64,
    n_rows: usize,
    n_embd: usize,
    _life: PhantomData<&'a mut [f32]>,
}

impl DevRowsMut<'_> {
    /// Writable device rows at `ptr`.
    ///
    /// # Safety
    /// As [`DevRows::from_raw`], and additionally nothing else reads or writes the rows until the
    /// `finish_device` that writes them returns (it synchronises).
    pub unsafe fn from_raw<'a>(ptr: u64, n_rows: usize, n_embd: usize) -> DevRowsMut<'a> {
        DevRowsMut { ptr, origin: 0, n_rows, n_embd, _life: PhantomData }
    }

    /// Rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Values per row.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }
}

/// Rows of f32 owned by a runtime's device (for benchmarks and tests; the hook uses llama.cpp's
/// tensors through [`DevRows`] instead).
#[derive(Debug)]
pub struct GpuRows {
    buf: DevBuf,
    runtime_id: u64,
    n_rows: usize,
    n_embd: usize,
}

impl GpuRows {
    /// Rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Values per row.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    fn check_range(&self, row0: usize, n: usize) -> Result<(), GpuError> {
        match row0.checked_add(n) {
            Some(end) if end <= self.n_rows => Ok(()),
            _ => Err(GpuError::RowRange { row0, end: row0.saturating_add(n), n_rows: self.n_rows }),
        }
    }

    /// Rows `row0 .. row0 + n` as [`DevRows`].
    pub fn rows(&self, row0: usize, n: usize) -> Result<DevRows<'_>, GpuError> {
        self.check_range(row0, n)?;
        Ok(DevRows {
            ptr: self.buf.at(row0 * self.n_embd * 4),
            origin: self.runtime_id,
            n_rows: n,
            n_embd: self.n_embd,
            _life: PhantomData,
        })
    }

    /// Rows `row0 .. row0 + n` as [`DevRowsMut`].
    pub fn rows_mut(&mut self, row0: usize, n: usize) -> Result<DevRowsMut<'_>, GpuError> {
        self.check_range(row0, n)?;
        Ok(DevRowsMut {
            ptr: self.buf.at(row0 * self.n_embd * 4),
            origin: self.runtime_id,
            n_rows: n,
            n_embd: self.n_embd,
            _life: PhantomData,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Runtime, adapter, state
// ---------------------------------------------------------------------------------------------

/// One device (or the emulator), one stream, the compiled kernels. `Send + Sync`; share it as
/// `Arc`. Work from several threads is queued on the one stream in call order.
pub struct GpuRuntime {
    id: u64,
    /// Whether work that reads caller-owned device rows ([`GpuRuntime::feed_device`]) may still be
    /// queued: set by `feed_device`, cleared by every synchronisation.
    unsynced: std::sync::atomic::AtomicBool,
    backend: Backend,
    block: u32,
    /// Blocks the pooling launch aims for (about two per multiprocessor).
    target_blocks: u32,
    description: String,
}

impl std::fmt::Debug for GpuRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuRuntime").field("device", &self.description).field("block", &self.block).finish()
    }
}

/// A tensor in device memory, in its stored dtype.
#[derive(Debug)]
struct DevTensor {
    buf: DevBuf,
    dtype: DType,
}

/// One layer's device tensors (tensors shared across layers are the same `Arc`).
#[derive(Debug)]
struct GpuLayer {
    down: Arc<DevTensor>,
    down_bias: Option<Arc<DevTensor>>,
    up: Arc<DevTensor>,
    up_bias: Option<Arc<DevTensor>>,
    /// Rational coefficients as f32 (exact for every stored dtype), or `None`.
    num: Option<Arc<DevTensor>>,
    den: Option<Arc<DevTensor>>,
    /// K^T = Q W_down, m x d, f32.
    kt: Arc<DevTensor>,
}

/// The activation as the kernels take it.
#[derive(Debug, Clone, Copy)]
struct ActParams {
    kind: i32,
    variant: i32,
    num_len: i32,
    den_len: i32,
    groups: i32,
}

fn act_params(act: &Activation) -> ActParams {
    let fixed = |kind| ActParams { kind, variant: 0, num_len: 0, den_len: 0, groups: 1 };
    match act {
        Activation::Identity => fixed(0),
        Activation::Relu => fixed(1),
        Activation::Gelu => fixed(2),
        Activation::GeluTanh => fixed(3),
        Activation::Silu => fixed(4),
        Activation::Tanh => fixed(5),
        Activation::Rational(rc) => ActParams {
            kind: 6,
            variant: match rc.variant {
                RationalVariant::A => 0,
                RationalVariant::B | RationalVariant::D => 1,
                RationalVariant::C => 2,
            },
            num_len: rc.numerator_degree as i32 + 1,
            den_len: rc.denominator_len() as i32,
            groups: rc.groups.max(1) as i32,
        },
    }
}

fn dtype_code(d: DType) -> i32 {
    // A device tensor is never Q8_0: `Uploader::tensor` widens Q8_0 to f32 on the host.
    match d {
        DType::F32 | DType::Q8_0 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// An adapter's weights in device memory. `Send + Sync`.
#[derive(Debug)]
pub struct GpuAdapter {
    id: u64,
    runtime_id: u64,
    n_layer: usize,
    d: usize,
    r: usize,
    m: usize,
    pool_scale: f64,
    act: ActParams,
    layers: Vec<GpuLayer>,
    device_bytes: usize,
}

impl GpuAdapter {
    /// Unique per upload in this process: the key of its pooling copies in a prefix cache.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Layers (L).
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Hidden size (d).
    pub fn n_embd(&self) -> usize {
        self.d
    }

    /// Soft tokens per layer (m).
    pub fn n_soft_tokens(&self) -> usize {
        self.m
    }

    /// Bottleneck width (r).
    pub fn bottleneck(&self) -> usize {
        self.r
    }

    /// Device bytes held (each shared tensor once, K^T included).
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// Bytes of W_down of one layer (what the down-projection kernel reads).
    pub(crate) fn down_bytes(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.down.buf.bytes)
    }
}

/// One sequence's streaming state for every layer: per layer the running weighted sum (m x d,
/// f64), running max and sum of weights (m each, f64), rows seen and the error word; plus scratch.
#[derive(Debug)]
pub struct GpuSeqState {
    adapter_id: u64,
    runtime_id: u64,
    acc: DevBuf,
    mx: DevBuf,
    sum: DevBuf,
    bad: DevBuf,
    /// U = g(pooled W_down^T + b_down), m x r f64 (one layer at a time).
    u: DevBuf,
    /// finish_host's output, m x d f32.
    out: DevBuf,
    /// Scores, then pooling weights, m x n f64 (grows).
    scores: Option<DevBuf>,
    /// feed_host's rows (grows).
    rows: Option<DevBuf>,
    rows_seen: Vec<usize>,
}

impl GpuSeqState {
    /// Rows fed so far to `layer` (0 for a layer out of range).
    pub fn rows_seen(&self, layer: usize) -> usize {
        self.rows_seen.get(layer).copied().unwrap_or(0)
    }
}

/// A host copy of a [`GpuSeqState`]'s pooling (running sums, maxima, error words, rows seen):
/// what a prefix cache keeps so that a later sequence of the same adapter goes on from it
/// ([`GpuRuntime::save_state`], [`GpuRuntime::load_state`]).
#[derive(Debug, Clone)]
pub struct GpuStateCopy {
    adapter_id: u64,
    runtime_id: u64,
    acc: Vec<u8>,
    mx: Vec<u8>,
    sum: Vec<u8>,
    bad: Vec<u8>,
    rows_seen: Vec<usize>,
}

impl GpuStateCopy {
    /// Rows fed to `layer` when it was taken (0 for a layer out of range).
    pub fn rows_seen(&self, layer: usize) -> usize {
        self.rows_seen.get(layer).copied().unwrap_or(0)
    }

    /// The id of the uploaded adapter it belongs to ([`GpuAdapter::id`]).
    pub fn adapter_id(&self) -> u64 {
        self.adapter_id
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.acc.len() + self.mx.len() + self.sum.len() + self.bad.len() + self.rows_seen.len() * 8
    }
}

/// Why [`GpuRuntime::cuda`] would fail for `ordinal`, without panicking on a missing library.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn cuda_unavailable(ordinal: usize) -> Option<String> {
    #[cfg(feature = "cuda")]
    return cuda::unavailable_reason(ordinal);
    #[cfg(not(feature = "cuda"))]
    Some(GpuError::CudaNotCompiled.to_string())
}

impl GpuRuntime {
    /// Opens CUDA device `ordinal`: loads the driver and NVRTC, retains the device's primary
    /// context (the one llama.cpp's CUDA backend uses, so device pointers are shared), creates
    /// the runtime's stream, and compiles the kernels for the device's architecture (once per
    /// process; the PTX is also cached on disk under `$XDG_CACHE_HOME/iapt/kernels` or
    /// `~/.cache/iapt/kernels`, failing soft when that is not writable).
    ///
    /// In a build without the `cuda` feature this is always [`GpuError::CudaNotCompiled`].
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn cuda(ordinal: usize) -> Result<Arc<GpuRuntime>, GpuError> {
        #[cfg(not(feature = "cuda"))]
        return Err(GpuError::CudaNotCompiled);
        #[cfg(feature = "cuda")]
        Self::open_cuda(ordinal)
    }

    #[cfg(feature = "cuda")]
    fn open_cuda(ordinal: usize) -> Result<Arc<GpuRuntime>, GpuError> {
        if let Some(reason) = cuda_unavailable(ordinal) {
            return Err(GpuError::CudaUnavailable { reason });
        }
        // cudarc looks driver functions up lazily and panics on a missing one (a driver older than
        // its bindings): report that as unavailable instead of unwinding into the caller.
        let opened = std::panic::catch_unwind(|| cuda::CudaBackend::open(ordinal)).unwrap_or_else(|_| {
            Err(GpuError::CudaUnavailable {
                reason: "the NVIDIA driver lacks a function the CUDA bindings need; update the driver".to_owned(),
            })
        });
        let (b, sm_count, description) = opened?;
        Ok(Arc::new(GpuRuntime {
            id: next_id(),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            backend: Backend::Cuda(b),
            block: CUDA_BLOCK,
            target_blocks: sm_count.saturating_mul(2).max(1),
            description,
        }))
    }

    /// `None` if [`GpuRuntime::cuda`]`(0)` can work; else why not (no driver library, no device,
    /// no NVRTC, ...). Never panics.
    pub fn cuda_unavailable_reason() -> Option<String> {
        cuda_unavailable(0)
    }

    /// The CPU emulator of the kernels, with the smallest block (32 threads, fast).
    #[cfg(feature = "emulation")]
    pub fn emulated() -> Arc<GpuRuntime> {
        Self::emulated_with_block(GROUP).unwrap_or_else(|_| unreachable!("32 is a valid block size"))
    }

    /// The CPU emulator with `block` threads per block (a power of two from 32 to 256; 256 is what
    /// a real device uses).
    #[cfg(feature = "emulation")]
    pub fn emulated_with_block(block: u32) -> Result<Arc<GpuRuntime>, GpuError> {
        if !block.is_power_of_two() || !(GROUP..=MAX_BLOCK).contains(&block) {
            return Err(GpuError::Unsupported { detail: format!("block size {block} (must be a power of two from 32 to 256)") });
        }
        Ok(Arc::new(GpuRuntime {
            id: next_id(),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            backend: Backend::Emulated(emulated::EmuBackend),
            block,
            // Pretend to have 4 multiprocessors so that small tests still split the pooling.
            target_blocks: 8,
            description: format!("emulated ({block} threads per block)"),
        }))
    }

    /// The emulator if this build has it ([`GpuError::EmulationNotCompiled`] otherwise).
    pub fn try_emulated() -> Result<Arc<GpuRuntime>, GpuError> {
        #[cfg(feature = "emulation")]
        return Ok(Self::emulated());
        #[cfg(not(feature = "emulation"))]
        Err(GpuError::EmulationNotCompiled)
    }

    /// E.g. `CUDA device 0: NVIDIA H200 (sm_90, 132 SMs), driver 13.0`, or `emulated (...)`.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// Whether this is the CPU emulator.
    pub fn is_emulated(&self) -> bool {
        match self.backend {
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => false,
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => true,
        }
    }

    fn upload_bytes(&self, bytes: &[u8]) -> Result<DevBuf, GpuError> {
        let buf = self.backend.alloc_zeroed(bytes.len())?;
        // SAFETY: `buf` was just allocated with exactly `bytes.len()` bytes and no kernel uses it.
        unsafe { self.backend.htod(buf.ptr, bytes)? };
        Ok(buf)
    }

    /// Uploads `adapter` once: every tensor in its stored dtype (F32/F16/BF16 bytes as stored; the
    /// rational coefficients, a few values, as f32), tensors shared by all layers once, and per
    /// layer K^T = Q W_down (m x d), computed in f64 on the host and stored as f32.
    pub fn upload(&self, adapter: &Adapter) -> Result<GpuAdapter, GpuError> {
        let cfg = adapter.config();
        let (n_layer, d, r, m) = (cfg.n_layer as usize, cfg.n_embd as usize, cfg.bottleneck as usize, cfg.n_soft_tokens as usize);
        check_kernel_limits(d, r, m)?;
        let mut up = Uploader { rt: self, adapter, cache: HashMap::new(), host: HashMap::new(), kt_cache: HashMap::new(), device_bytes: 0 };
        let layers = (0..cfg.n_layer).map(|l| up.layer(l)).collect::<Result<Vec<_>, _>>()?;
        Ok(GpuAdapter {
            id: next_id(),
            runtime_id: self.id,
            n_layer,
            d,
            r,
            m,
            pool_scale: f64::from(cfg.pool_scale),
            act: act_params(&cfg.activation),
            layers,
            device_bytes: up.device_bytes,
        })
    }

    fn check_adapter(&self, a: &GpuAdapter) -> Result<(), GpuError> {
        if a.runtime_id != self.id {
            return Err(GpuError::ForeignAdapter);
        }
        Ok(())
    }

    /// Rows of another runtime's [`GpuRows`] may be memory of another kind (host vs device).
    fn check_origin(&self, origin: u64) -> Result<(), GpuError> {
        if origin != 0 && origin != self.id {
            return Err(GpuError::ForeignRows);
        }
        Ok(())
    }

    fn check(&self, a: &GpuAdapter, st: &GpuSeqState, layer: usize) -> Result<(), GpuError> {
        self.check_adapter(a)?;
        if st.adapter_id != a.id || st.runtime_id != self.id {
            return Err(GpuError::ForeignState);
        }
        if layer >= a.n_layer {
            return Err(GpuError::LayerOutOfRange { layer, n_layer: a.n_layer });
        }
        Ok(())
    }

    /// A fresh state for one sequence (every layer empty).
    pub fn new_state(&self, a: &GpuAdapter) -> Result<GpuSeqState, GpuError> {
        self.check_adapter(a)?;
        let (l, m, d, r) = (a.n_layer, a.m, a.d, a.r);
        let too_large = || GpuError::Unsupported { detail: "the sequence state does not fit in memory".to_owned() };
        let acc_bytes = l.checked_mul(m * d * 8).ok_or_else(too_large)?;
        let mut st = GpuSeqState {
            adapter_id: a.id,
            runtime_id: self.id,
            acc: self.backend.alloc_zeroed(acc_bytes)?,
            mx: self.backend.alloc_zeroed(l * m * 8)?,
            sum: self.backend.alloc_zeroed(l * m * 8)?,
            bad: self.backend.alloc_zeroed(l * 4)?,
            u: self.backend.alloc_zeroed(m * r * 8)?,
            out: self.backend.alloc_zeroed(m * d * 4)?,
            scores: None,
            rows: None,
            rows_seen: vec![0; l],
        };
        self.reset(&mut st)?;
        Ok(st)
    }

    /// Empties every layer of `st` (for the next sequence); clears a non-finite-input error.
    pub fn reset(&self, st: &mut GpuSeqState) -> Result<(), GpuError> {
        if st.runtime_id != self.id {
            return Err(GpuError::ForeignState);
        }
        let n_max = st.mx.bytes / 8;
        let neg_inf = vec![f64::NEG_INFINITY; n_max];
        let no_bad = vec![NO_BAD_ROW; st.bad.bytes / 4];
        // SAFETY: each destination is exactly one of the state's own allocations, of the size
        // written; kernels queued earlier that use them run first (stream order).
        unsafe {
            self.backend.memset0(st.acc.ptr, st.acc.bytes)?;
            self.backend.memset0(st.sum.ptr, st.sum.bytes)?;
            self.backend.htod(st.mx.ptr, as_bytes(&neg_inf))?;
            self.backend.htod(st.bad.ptr, as_bytes(&no_bad))?;
        }
        st.rows_seen.iter_mut().for_each(|r| *r = 0);
        Ok(())
    }

    /// A scratch buffer of at least `bytes`, replacing a smaller one (after the queued work that
    /// may use the old one has finished).
    fn ensure(&self, slot: &mut Option<DevBuf>, bytes: usize) -> Result<u64, GpuError> {
        if let Some(b) = slot {
            if b.bytes >= bytes {
                return Ok(b.ptr);
            }
            self.sync()?;
        }
        let b = self.backend.alloc_zeroed(bytes.max(1024))?;
        let ptr = b.ptr;
        *slot = Some(b);
        Ok(ptr)
    }

    /// A host copy of `st`'s pooling after all queued work (see [`GpuStateCopy`]).
    pub fn save_state(&self, st: &GpuSeqState) -> Result<GpuStateCopy, GpuError> {
        if st.runtime_id != self.id {
            return Err(GpuError::ForeignState);
        }
        let read = |b: &DevBuf| -> Result<Vec<u8>, GpuError> {
            let mut out = vec![0u8; b.bytes];
            // SAFETY: `b` is one of the state's own allocations, `b.bytes` long; `dtoh` waits for
            // the queued work that writes it before copying.
            unsafe { self.backend.dtoh(b.ptr, &mut out)? };
            Ok(out)
        };
        Ok(GpuStateCopy {
            adapter_id: st.adapter_id,
            runtime_id: self.id,
            acc: read(&st.acc)?,
            mx: read(&st.mx)?,
            sum: read(&st.sum)?,
            bad: read(&st.bad)?,
            rows_seen: st.rows_seen.clone(),
        })
    }

    /// A new state of adapter `a` that holds `copy` (taken from a state of this very adapter and
    /// runtime, else [`GpuError::ForeignState`]): feeding it more rows equals feeding them to the
    /// state the copy was taken from.
    pub fn load_state(&self, a: &GpuAdapter, copy: &GpuStateCopy) -> Result<GpuSeqState, GpuError> {
        if copy.adapter_id != a.id || copy.runtime_id != self.id {
            return Err(GpuError::ForeignState);
        }
        let mut st = self.new_state(a)?;
        let sizes =
            [(st.acc.bytes, copy.acc.len()), (st.mx.bytes, copy.mx.len()), (st.sum.bytes, copy.sum.len()), (st.bad.bytes, copy.bad.len())];
        if sizes.iter().any(|(a, b)| a != b) || copy.rows_seen.len() != st.rows_seen.len() {
            return Err(GpuError::ForeignState);
        }
        // SAFETY: each destination is one of the new state's own allocations, exactly as long as
        // the bytes copied into it (checked above); `htod` stages pageable host memory.
        unsafe {
            self.backend.htod(st.acc.ptr, &copy.acc)?;
            self.backend.htod(st.mx.ptr, &copy.mx)?;
            self.backend.htod(st.sum.ptr, &copy.sum)?;
            self.backend.htod(st.bad.ptr, &copy.bad)?;
        }
        st.rows_seen.clone_from(&copy.rows_seen);
        Ok(st)
    }

    /// Uploads `rows` (n x n_embd, row-major) to the state's scratch buffer and feeds them to
    /// `layer` as [`GpuRuntime::feed_device`] does.
    pub fn feed_host(&self, a: &GpuAdapter, st: &mut GpuSeqState, layer: usize, rows: &[f32]) -> Result<(), GpuError> {
        self.check(a, st, layer)?;
        if rows.len() % a.d != 0 {
            return Err(GpuError::RowsNotMultiple { len: rows.len(), n_embd: a.d });
        }
        let n = rows.len() / a.d;
        if n == 0 {
            return Ok(());
        }
        self.check_rows(st, layer, n)?;
        let ptr = self.ensure(&mut st.rows, std::mem::size_of_val(rows))?;
        // SAFETY: `ptr` is the state's rows scratch, at least `rows.len() * 4` bytes; kernels queued
        // earlier that read it run before this copy (stream order).
        unsafe { self.backend.htod(ptr, as_bytes(rows))? };
        // SAFETY: the scratch holds the n x d f32 just copied; it is replaced only after a
        // synchronisation (`ensure`) and freed stream-ordered, so it outlives the queued work.
        unsafe { self.launch_feed(a, st, layer, ptr, n) }
    }

    /// Feeds `rows` (n rows already in device memory, n_embd wide) to `layer` of the state:
    /// queued, no host round trip. Zero rows is a no-op.
    pub fn feed_device(&self, a: &GpuAdapter, st: &mut GpuSeqState, layer: usize, rows: DevRows<'_>) -> Result<(), GpuError> {
        self.check(a, st, layer)?;
        if rows.n_embd != a.d {
            return Err(GpuError::RowWidth { got: rows.n_embd, n_embd: a.d });
        }
        self.check_origin(rows.origin)?;
        if rows.n_rows == 0 {
            return Ok(());
        }
        self.check_rows(st, layer, rows.n_rows)?;
        self.backend.check_ptr(rows.ptr, rows.n_rows * a.d * 4)?;
        // SAFETY: `DevRows`' contract (its constructor's) makes `ptr` n_rows x d readable f32 on this
        // device for as long as the queued work runs; `check_ptr` verified what the driver knows.
        let queued = unsafe { self.launch_feed(a, st, layer, rows.ptr, rows.n_rows) };
        // Set after the launches (which may synchronise first to grow a buffer), and on failure
        // too: some of them may be queued.
        self.unsynced.store(true, Ordering::SeqCst);
        queued
    }

    fn check_rows(&self, st: &GpuSeqState, layer: usize, n: usize) -> Result<(), GpuError> {
        let total = st.rows_seen[layer].saturating_add(n);
        if total > MAX_ROWS || n.saturating_mul(GPU_MAX_SOFT_TOKENS * 8) > isize::MAX as usize {
            return Err(GpuError::TooManyRows { rows: total, limit: MAX_ROWS });
        }
        Ok(())
    }

    /// Queues scores, stats and pooling of `n` rows at `h` into `layer` of `st`.
    ///
    /// # Safety
    /// `h` points to n x d readable f32 of this runtime's device, valid until the queued work ends.
    unsafe fn launch_feed(&self, a: &GpuAdapter, st: &mut GpuSeqState, layer: usize, h: u64, n: usize) -> Result<(), GpuError> {
        let (m, d) = (a.m, a.d);
        let s = self.ensure(&mut st.scores, m * n * 8)?;
        let lay = &a.layers[layer];
        let acc = st.acc.at(layer * m * d * 8);
        let mx = st.mx.at(layer * m * 8);
        let sum = st.sum.at(layer * m * 8);
        let bad = st.bad.at(layer * 4);
        let (n32, d32, m32) = (n as i32, d as i32, m as i32);
        let row0 = st.rows_seen[layer] as i32;
        let col_blocks = d.div_ceil(self.block as usize);
        let max_splits = n.div_ceil(MIN_ROWS_PER_SPLIT).min(65_535);
        let splits = (self.target_blocks as usize).div_ceil(col_blocks).clamp(1, max_splits.max(1));
        let rows_per_split = n.div_ceil(splits);
        let splits = n.div_ceil(rows_per_split);
        // SAFETY (all three launches): argument lists match kernels.cu; `h` is n x d f32 (this
        // function's contract); kt is m x d f32 (uploaded for this layer); `s` holds at least
        // m x n f64 (`ensure`); acc/mx/sum/bad point at this layer's m x d, m, m f64 and one i32 of
        // the state, allocated for n_layer layers, layer < n_layer (checked by the callers); the
        // grids cover exactly what each kernel's comment says it touches; block is a power of two
        // in [32, 256] (runtime constructors).
        unsafe {
            self.backend.launch(
                Kernel::Scores,
                (n as u32, 1),
                self.block,
                &[
                    Arg::Ptr(h),
                    Arg::I32(n32),
                    Arg::I32(d32),
                    Arg::Ptr(lay.kt.buf.ptr),
                    Arg::I32(m32),
                    Arg::F64(a.pool_scale),
                    Arg::Ptr(s),
                    Arg::Ptr(bad),
                    Arg::I32(row0),
                ],
            )?;
            self.backend.launch(
                Kernel::Stats,
                (1, 1),
                self.block,
                &[Arg::Ptr(s), Arg::I32(n32), Arg::I32(m32), Arg::Ptr(mx), Arg::Ptr(sum), Arg::Ptr(acc), Arg::I32(d32)],
            )?;
            self.backend.launch(
                Kernel::Pool,
                (col_blocks as u32, splits as u32),
                self.block,
                &[Arg::Ptr(h), Arg::I32(n32), Arg::I32(d32), Arg::Ptr(s), Arg::I32(m32), Arg::Ptr(acc), Arg::I32(rows_per_split as i32)],
            )?;
        }
        st.rows_seen[layer] += n;
        Ok(())
    }

    /// Queues the down-projection (with bias and activation) of `layer` into the state's U.
    fn launch_down(&self, a: &GpuAdapter, st: &GpuSeqState, layer: usize) -> Result<(), GpuError> {
        let (m, d, r) = (a.m, a.d, a.r);
        let lay = &a.layers[layer];
        let per_block = (self.block / GROUP) as usize;
        let (bd, bd_dt) = lay.down_bias.as_ref().map_or((0, 0), |b| (b.buf.ptr, dtype_code(b.dtype)));
        let num = lay.num.as_ref().map_or(0, |t| t.buf.ptr);
        let den = lay.den.as_ref().map_or(0, |t| t.buf.ptr);
        let act = a.act;
        // SAFETY: arguments match `iapt_down_*` in kernels.cu for W_down's dtype; acc/sum are this
        // layer's m x d and m f64 of the state (layer checked by the callers, at least one row fed so
        // every sum > 0); W_down is r x d of its dtype, b_down r values of its dtype or null;
        // num/den are f32 [groups, num_len] / [groups, den_len] (shapes checked at upload) or null
        // when the activation is not rational (then the kernel never reads them); U holds m x r f64;
        // the grid has one 32-thread group per channel.
        unsafe {
            self.backend.launch(
                Kernel::Down(lay.down.dtype),
                (r.div_ceil(per_block) as u32, 1),
                self.block,
                &[
                    Arg::Ptr(st.acc.at(layer * m * d * 8)),
                    Arg::Ptr(st.sum.at(layer * m * 8)),
                    Arg::I32(m as i32),
                    Arg::I32(d as i32),
                    Arg::Ptr(lay.down.buf.ptr),
                    Arg::Ptr(bd),
                    Arg::I32(bd_dt),
                    Arg::I32(r as i32),
                    Arg::I32(act.kind),
                    Arg::I32(act.variant),
                    Arg::Ptr(num),
                    Arg::Ptr(den),
                    Arg::I32(0),
                    Arg::I32(act.num_len),
                    Arg::I32(act.den_len),
                    Arg::I32(act.groups),
                    Arg::Ptr(st.u.ptr),
                ],
            )
        }
    }

    /// Queues down- and up-projection of `layer`, writing m x d f32 at `out`, then waits and
    /// reports a non-finite score.
    ///
    /// # Safety
    /// `out` points to m x d writable f32 of this runtime's device, not used by anything else
    /// until this returns.
    unsafe fn run_finish(&self, a: &GpuAdapter, st: &GpuSeqState, layer: usize, out: u64) -> Result<(), GpuError> {
        if st.rows_seen[layer] == 0 {
            return Err(GpuError::NoRows { layer });
        }
        self.launch_down(a, st, layer)?;
        let (m, d, r) = (a.m, a.d, a.r);
        let lay = &a.layers[layer];
        let per_block = (self.block / GROUP) as usize;
        let (bu, bu_dt) = lay.up_bias.as_ref().map_or((0, 0), |b| (b.buf.ptr, dtype_code(b.dtype)));
        let bad = st.bad.at(layer * 4);
        // SAFETY: arguments match `iapt_up_*` for W_up's dtype; U is m x r f64 written by the down
        // launch queued before; W_up is d x r, b_up d values or null; `out` is m x d f32 (this
        // function's contract); `bad` is this layer's error word; one group per output column.
        unsafe {
            self.backend.launch(
                Kernel::Up(lay.up.dtype),
                (d.div_ceil(per_block) as u32, 1),
                self.block,
                &[
                    Arg::Ptr(st.u.ptr),
                    Arg::I32(m as i32),
                    Arg::I32(r as i32),
                    Arg::Ptr(lay.up.buf.ptr),
                    Arg::Ptr(bu),
                    Arg::I32(bu_dt),
                    Arg::I32(d as i32),
                    Arg::Ptr(out),
                    Arg::Ptr(bad),
                ],
            )?;
        }
        let mut word = [0i32];
        // SAFETY: `bad` is 4 bytes inside the state's error-word allocation.
        unsafe { self.backend.dtoh(bad, as_bytes_mut(&mut word))? };
        self.sync()?;
        if word[0] != NO_BAD_ROW {
            return Err(GpuError::NonFiniteInput { layer, row: word[0].max(0) as usize });
        }
        Ok(())
    }

    /// The m x n_embd soft tokens of `layer` into `out` (host). Waits for the queued work. The
    /// state is not consumed: feeding more rows and finishing again is allowed.
    pub fn finish_host(&self, a: &GpuAdapter, st: &mut GpuSeqState, layer: usize, out: &mut [f32]) -> Result<(), GpuError> {
        self.check(a, st, layer)?;
        let expected = a.m * a.d;
        if out.len() != expected {
            return Err(GpuError::OutputSize { len: out.len(), expected });
        }
        // SAFETY: the state's `out` scratch holds m x d f32 and is used by nothing else.
        unsafe { self.run_finish(a, st, layer, st.out.ptr)? };
        // SAFETY: reads exactly the m x d f32 of the `out` scratch.
        unsafe { self.backend.dtoh(st.out.ptr, as_bytes_mut(out)) }
    }

    /// Writes the m soft tokens of `layer` straight into `dst` (m rows of n_embd in device memory,
    /// e.g. llama.cpp's residual-stream rows) and waits for it. On error nothing is written.
    pub fn finish_device(&self, a: &GpuAdapter, st: &mut GpuSeqState, layer: usize, dst: DevRowsMut<'_>) -> Result<(), GpuError> {
        self.check(a, st, layer)?;
        if dst.n_rows != a.m || dst.n_embd != a.d {
            return Err(GpuError::OutputRows { n_rows: dst.n_rows, n_embd: dst.n_embd, m: a.m, d: a.d });
        }
        self.check_origin(dst.origin)?;
        self.backend.check_ptr(dst.ptr, a.m * a.d * 4)?;
        // SAFETY: `DevRowsMut`'s contract makes `dst` m x d writable f32 of this device, used by
        // nothing else until we return; `check_ptr` verified what the driver knows.
        unsafe { self.run_finish(a, st, layer, dst.ptr) }
    }

    /// Waits for all work queued on the runtime's stream and reports an asynchronous driver error.
    /// (Non-finite inputs are reported by `finish_*`, which synchronise too.)
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.sync()
    }

    /// Whether work queued by [`GpuRuntime::feed_device`] may still be reading its rows (no
    /// synchronisation since). A caller that lends device rows checks this before giving them back.
    pub fn has_unsynchronized_work(&self) -> bool {
        self.unsynced.load(Ordering::SeqCst)
    }

    fn sync(&self) -> Result<(), GpuError> {
        self.backend.synchronize()?;
        self.unsynced.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// `n_rows` x `n_embd` zeroed f32 in this runtime's device memory.
    pub fn alloc_rows(&self, n_rows: usize, n_embd: usize) -> Result<GpuRows, GpuError> {
        let bytes = n_rows
            .checked_mul(n_embd)
            .and_then(|x| x.checked_mul(4))
            .ok_or_else(|| GpuError::Unsupported { detail: format!("{n_rows} x {n_embd} rows are too large") })?;
        Ok(GpuRows { buf: self.backend.alloc_zeroed(bytes)?, runtime_id: self.id, n_rows, n_embd })
    }

    /// Copies `values` (whole rows) into `rows` from row `row0` (waits for queued work first).
    pub fn write_rows(&self, rows: &mut GpuRows, row0: usize, values: &[f32]) -> Result<(), GpuError> {
        self.check_origin(rows.runtime_id)?;
        if values.len() % rows.n_embd.max(1) != 0 {
            return Err(GpuError::RowsNotMultiple { len: values.len(), n_embd: rows.n_embd });
        }
        rows.check_range(row0, values.len() / rows.n_embd.max(1))?;
        self.sync()?;
        // SAFETY: the range was checked to lie inside `rows`' allocation.
        unsafe { self.backend.htod(rows.buf.at(row0 * rows.n_embd * 4), as_bytes(values)) }
    }

    /// Copies whole rows from `rows` (from row `row0`) into `out` after all queued work.
    pub fn read_rows(&self, rows: &GpuRows, row0: usize, out: &mut [f32]) -> Result<(), GpuError> {
        self.check_origin(rows.runtime_id)?;
        if out.len() % rows.n_embd.max(1) != 0 {
            return Err(GpuError::RowsNotMultiple { len: out.len(), n_embd: rows.n_embd });
        }
        rows.check_range(row0, out.len() / rows.n_embd.max(1))?;
        // SAFETY: the range was checked to lie inside `rows`' allocation.
        unsafe { self.backend.dtoh(rows.buf.at(row0 * rows.n_embd * 4), as_bytes_mut(out)) }
    }

    // -- for the benchmark ---------------------------------------------------------------------

    /// Milliseconds of device time `f`'s queued work takes (events around it; host time for the
    /// emulator, whose work is synchronous).
    pub(crate) fn time_ms(&self, f: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
        let a = self.backend.mark()?;
        f()?;
        let b = self.backend.mark()?;
        self.backend.elapsed_ms(&a, &b)
    }

    /// Queues the down-projection kernel of `layer` alone (the state must have rows).
    pub(crate) fn bench_down(&self, a: &GpuAdapter, st: &GpuSeqState, layer: usize) -> Result<(), GpuError> {
        self.check(a, st, layer)?;
        if st.rows_seen[layer] == 0 {
            return Err(GpuError::NoRows { layer });
        }
        self.launch_down(a, st, layer)
    }

    /// Queues a device-to-device copy of `src` into `dst` (same size).
    pub(crate) fn copy_rows(&self, dst: &mut GpuRows, src: &GpuRows) -> Result<(), GpuError> {
        self.check_origin(dst.runtime_id)?;
        self.check_origin(src.runtime_id)?;
        if dst.buf.bytes != src.buf.bytes {
            return Err(GpuError::OutputSize { len: dst.buf.bytes / 4, expected: src.buf.bytes / 4 });
        }
        // SAFETY: two distinct live allocations (`&mut` and `&` borrows) of equal size.
        unsafe { self.backend.dtod(dst.buf.ptr, src.buf.ptr, src.buf.bytes) }
    }
}

/// Refuses shapes outside what the kernels index: 1..=8 soft tokens, and d r, d m within 32-bit
/// indices of f64 elements.
fn check_kernel_limits(d: usize, r: usize, m: usize) -> Result<(), GpuError> {
    if m == 0 || m > GPU_MAX_SOFT_TOKENS {
        return Err(GpuError::Unsupported { detail: format!("{m} soft tokens (the kernels take 1 to {GPU_MAX_SOFT_TOKENS})") });
    }
    let limit = i32::MAX as usize / 8;
    if d == 0 || r == 0 || d.checked_mul(r).is_none_or(|x| x > limit) || d.checked_mul(m).is_none_or(|x| x > limit) {
        return Err(GpuError::Unsupported { detail: format!("n_embd {d} x bottleneck {r} is too large for 32-bit kernel indices") });
    }
    Ok(())
}

/// One adapter's upload in progress: tensors already on the device by name (a shared tensor is
/// uploaded once), host f32 copies of W_down and Q kept while a later layer may share them, and
/// K^T per (W_down, Q) pair.
struct Uploader<'a> {
    rt: &'a GpuRuntime,
    adapter: &'a Adapter,
    cache: HashMap<TensorName, Arc<DevTensor>>,
    host: HashMap<TensorName, Arc<Vec<f32>>>,
    kt_cache: HashMap<(TensorName, TensorName), Arc<DevTensor>>,
    device_bytes: usize,
}

impl Uploader<'_> {
    /// Layer `l`'s device tensors.
    fn layer(&mut self, l: u32) -> Result<GpuLayer, GpuError> {
        let rational = self.adapter.config().activation.rational().is_some();
        let down = self.required(l, Role::DownWeight, false)?;
        let down_bias = self.tensor(l, Role::DownBias, false)?;
        let up = self.required(l, Role::UpWeight, false)?;
        let up_bias = self.tensor(l, Role::UpBias, false)?;
        let (num, den) = if rational {
            (Some(self.required(l, Role::ActNum, true)?), Some(self.required(l, Role::ActDen, true)?))
        } else {
            (None, None)
        };
        let kt = self.score_keys(l)?;
        Ok(GpuLayer { down, down_bias, up, up_bias, num, den, kt })
    }

    /// The (layer, role) tensor on the device, or `None` for an absent optional one; `as_f32`
    /// converts it first (else its stored bytes go up as they are).
    fn tensor(&mut self, l: u32, role: Role, as_f32: bool) -> Result<Option<Arc<DevTensor>>, GpuError> {
        let cfg = self.adapter.config();
        let Some(t) = self.adapter.tensor(l, role) else {
            return if role.is_required(cfg) { Err(GpuError::MissingTensor { layer: l, role }) } else { Ok(None) };
        };
        if let Some(v) = self.cache.get(&t.name()) {
            return Ok(Some(v.clone()));
        }
        let expected = role.expected_shape(cfg);
        if t.shape() != expected.as_slice() {
            return Err(GpuError::TensorShape { name: t.name().to_string(), expected, got: t.shape().to_vec() });
        }
        let read = |e| GpuError::TensorRead { name: t.name().to_string(), source: e };
        // Q8_0 matrices go up widened to f32 (exact): the kernels read F32, F16 or BF16 rows.
        let (buf, dtype) = if as_f32 || t.dtype() == DType::Q8_0 {
            (self.rt.upload_bytes(as_bytes(&t.to_f32().map_err(read)?))?, DType::F32)
        } else {
            (self.rt.upload_bytes(&t.bytes().map_err(read)?)?, t.dtype())
        };
        self.device_bytes += buf.bytes;
        let v = Arc::new(DevTensor { buf, dtype });
        self.cache.insert(t.name(), v.clone());
        Ok(Some(v))
    }

    fn required(&mut self, l: u32, role: Role, as_f32: bool) -> Result<Arc<DevTensor>, GpuError> {
        self.tensor(l, role, as_f32)?.ok_or(GpuError::MissingTensor { layer: l, role })
    }

    /// K^T = Q W_down of layer `l` on the device, from host copies of both (a shared pair once).
    fn score_keys(&mut self, l: u32) -> Result<Arc<DevTensor>, GpuError> {
        let (adapter, cfg) = (self.adapter, self.adapter.config());
        let (dt, qt) = match (adapter.tensor(l, Role::DownWeight), adapter.tensor(l, Role::PoolQuery)) {
            (Some(a), Some(b)) => (a, b),
            (_, None) => return Err(GpuError::MissingTensor { layer: l, role: Role::PoolQuery }),
            (None, _) => return Err(GpuError::MissingTensor { layer: l, role: Role::DownWeight }),
        };
        let q_expected = Role::PoolQuery.expected_shape(cfg);
        if qt.shape() != q_expected.as_slice() {
            return Err(GpuError::TensorShape { name: qt.name().to_string(), expected: q_expected, got: qt.shape().to_vec() });
        }
        let key = (dt.name(), qt.name());
        let kt = match self.kt_cache.get(&key) {
            Some(k) => k.clone(),
            None => {
                let (w, q) = (self.host_f32(dt)?, self.host_f32(qt)?);
                let (d, r, m) = (cfg.n_embd as usize, cfg.bottleneck as usize, cfg.n_soft_tokens as usize);
                let buf = self.rt.upload_bytes(as_bytes(&score_matrix(&w, &q, d, r, m)))?;
                self.device_bytes += buf.bytes;
                let k = Arc::new(DevTensor { buf, dtype: DType::F32 });
                self.kt_cache.insert(key, k.clone());
                k
            }
        };
        // Host copies are only needed while a later layer may share them.
        if !adapter.is_shared(Role::DownWeight) {
            self.host.remove(&dt.name());
        }
        if !adapter.is_shared(Role::PoolQuery) {
            self.host.remove(&qt.name());
        }
        Ok(kt)
    }

    fn host_f32(&mut self, t: &iapt_format::Tensor) -> Result<Arc<Vec<f32>>, GpuError> {
        if let Some(v) = self.host.get(&t.name()) {
            return Ok(v.clone());
        }
        let v = Arc::new(t.to_f32().map_err(|e| GpuError::TensorRead { name: t.name().to_string(), source: e })?);
        self.host.insert(t.name(), v.clone());
        Ok(v)
    }
}

/// K^T = Q W_down (m x d): `down` is r x d, `query` m x r; summed in f64, rounded once.
fn score_matrix(down: &[f32], query: &[f32], d: usize, r: usize, m: usize) -> Vec<f32> {
    let mut k = vec![0.0f64; m * d];
    for (kk, krow) in k.chunks_exact_mut(d).enumerate() {
        for c in 0..r {
            let q = f64::from(query[kk * r + c]);
            for (acc, &w) in krow.iter_mut().zip(&down[c * d..(c + 1) * d]) {
                *acc += q * f64::from(w);
            }
        }
    }
    k.iter().map(|&v| v as f32).collect()
}

/// Compiles the kernel source with NVRTC for `arch` (e.g. `compute_90`) and returns the PTX, with
/// no device needed (for tests and diagnostics). Errors if NVRTC cannot be loaded.
pub fn compile_kernels_ptx(arch: &str) -> Result<String, GpuError> {
    #[cfg(feature = "cuda")]
    return cuda::compile(arch);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = arch;
        Err(GpuError::CudaNotCompiled)
    }
}

/// `None` if NVRTC can be loaded; else why not.
pub fn nvrtc_unavailable_reason() -> Option<String> {
    #[cfg(feature = "cuda")]
    return cuda::nvrtc_unavailable_reason();
    #[cfg(not(feature = "cuda"))]
    Some(GpuError::CudaNotCompiled.to_string())
}
