//! The CUDA backend of the GPU generator, through `cudarc` with dynamic loading: availability
//! checks that never panic, the device's primary context and one stream, raw-address copies and
//! launches, pointer checks, timing events, and the kernels' PTX (NVRTC, compiled once per process
//! and architecture, also cached on disk under `$XDG_CACHE_HOME/iapt/kernels` or
//! `~/.cache/iapt/kernels`; the disk cache fails soft).

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use super::{Arg, DevBuf, Kernel, Mark, Mem};
use crate::error::GpuError;

/// The kernel source, compiled at run time.
pub(super) const KERNELS: &str = include_str!("kernels.cu");

fn drv(op: &'static str) -> impl Fn(result::DriverError) -> GpuError {
    move |e| {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        GpuError::Driver { op, detail: format!("{name}: {text}") }
    }
}

/// Whether libcuda can be loaded (cudarc panics on first use otherwise).
fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to open the candidate library names with
    // libloading and closes them again; it has no preconditions beyond being allowed to run a
    // library's initialisers, which loading the NVIDIA driver library is designed for.
    unsafe { sys::is_culib_present() }
}

/// `None` if NVRTC can be loaded; else why not.
pub(super) fn nvrtc_unavailable_reason() -> Option<String> {
    // SAFETY: as in `driver_present`, for libnvrtc.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        None
    } else {
        Some(
            "libnvrtc (CUDA 13 NVRTC) cannot be loaded: install the CUDA toolkit's NVRTC or `pip install nvidia-cuda-nvrtc` and add its \
             lib directory to LD_LIBRARY_PATH"
                .to_owned(),
        )
    }
}

/// `None` if device `ordinal` can be opened and the kernels compiled; else why not.
pub(super) fn unavailable_reason(ordinal: usize) -> Option<String> {
    if !driver_present() {
        return Some(
            "libcuda (the NVIDIA driver library) cannot be loaded: no NVIDIA driver installed, or it is not on the library path".to_owned(),
        );
    }
    if let Err(e) = result::init() {
        return Some(format!("cuInit failed ({}); is a GPU visible to this process (CUDA_VISIBLE_DEVICES)?", drv("initialising")(e)));
    }
    match result::device::get_count() {
        Ok(0) => return Some("the driver reports no CUDA device".to_owned()),
        Ok(n) if ordinal >= n as usize => return Some(format!("CUDA device {ordinal} does not exist ({n} devices)")),
        Ok(_) => {}
        Err(e) => return Some(format!("cannot count CUDA devices: {}", drv("counting devices")(e))),
    }
    let mut version = 0i32;
    // SAFETY: `version` is a valid, writable int for the call's duration.
    if unsafe { sys::cuDriverGetVersion(&mut version) }.result().is_ok() && version < 12_000 {
        return Some(format!(
            "the NVIDIA driver supports CUDA {}.{}; the IAPT kernels need a CUDA 12 or newer driver",
            version / 1000,
            (version % 1000) / 10
        ));
    }
    nvrtc_unavailable_reason()
}

/// Process-wide PTX cache, keyed by architecture.
static PTX: Mutex<Option<HashMap<String, Arc<str>>>> = Mutex::new(None);

/// Compiles the kernels for `arch` (e.g. `compute_90`).
pub(super) fn compile(arch: &str) -> Result<String, GpuError> {
    if let Some(reason) = nvrtc_unavailable_reason() {
        return Err(GpuError::CudaUnavailable { reason });
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("iapt_kernels.cu".to_owned()),
        ..Default::default()
    };
    match compile_ptx_with_opts(KERNELS, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            Err(GpuError::Compile { arch: arch.to_owned(), log: log.to_string_lossy().into_owned() })
        }
        Err(e) => Err(GpuError::Compile { arch: arch.to_owned(), log: e.to_string() }),
    }
}

/// FNV-1a 64: a stable hash for the disk cache's file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("iapt").join("kernels"))
}

fn cache_path(arch: &str) -> Option<PathBuf> {
    let h = fnv1a(&[KERNELS.as_bytes(), arch.as_bytes(), b"cudarc-0.19.10"]);
    Some(cache_dir()?.join(format!("{h:016x}.ptx")))
}

/// Writes `ptx` atomically to the disk cache; any failure is ignored (the cache is an optimisation).
fn store_on_disk(arch: &str, ptx: &str) {
    let Some(path) = cache_path(arch) else { return };
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("k"), std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The PTX for `arch`: from the process cache, else the disk cache (`fresh == false`), else NVRTC.
fn kernels_ptx(arch: &str, fresh: bool) -> Result<Arc<str>, GpuError> {
    let mut guard = PTX.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if !fresh {
        if let Some(p) = map.get(arch) {
            return Ok(p.clone());
        }
        if let Some(src) = cache_path(arch).and_then(|p| std::fs::read_to_string(p).ok()) {
            if src.contains(".entry iapt_scores") && !src.contains('\0') {
                let p: Arc<str> = src.into();
                map.insert(arch.to_owned(), p.clone());
                return Ok(p);
            }
        }
    }
    let p: Arc<str> = compile(arch)?.into();
    store_on_disk(arch, &p);
    map.insert(arch.to_owned(), p.clone());
    Ok(p)
}

/// The CUDA side of a [`super::GpuRuntime`].
pub(super) struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: Vec<CudaFunction>,
    ordinal: usize,
}

impl CudaBackend {
    /// Opens device `ordinal` (the caller has checked [`unavailable_reason`]). Returns the backend,
    /// the multiprocessor count and a description.
    pub(super) fn open(ordinal: usize) -> Result<(CudaBackend, u32, String), GpuError> {
        let ctx = CudaContext::new(ordinal).map_err(drv("retaining the device's primary context"))?;
        // SAFETY: event tracking orders uses of one buffer across streams. Every buffer of this
        // runtime is used on its one stream only (allocation, copies, launches, stream-ordered
        // frees), so stream order already serialises every access; buffers are created only after
        // this call, so none of them relies on tracking.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let (major, minor) = ctx.compute_capability().map_err(drv("querying the compute capability"))?;
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv("querying the SM count"))?;
        let name = ctx.name().map_err(drv("querying the device name"))?;
        let mut version = 0i32;
        // SAFETY: `version` is a valid, writable int for the call's duration.
        let driver = match unsafe { sys::cuDriverGetVersion(&mut version) }.result() {
            Ok(()) => format!("{}.{}", version / 1000, (version % 1000) / 10),
            Err(_) => "unknown".to_owned(),
        };
        let arch = format!("compute_{major}{minor}");
        let load = |ptx: &str| -> Result<Vec<CudaFunction>, GpuError> {
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(drv("loading the kernels' PTX"))?;
            Kernel::NAMES.iter().map(|n| module.load_function(n).map_err(drv("looking up a kernel"))).collect()
        };
        // A PTX from the disk cache may come from a newer NVRTC than the driver accepts: recompile.
        let funcs = match load(&kernels_ptx(&arch, false)?) {
            Ok(f) => f,
            Err(_) => load(&kernels_ptx(&arch, true)?)?,
        };
        let description = format!("CUDA device {ordinal}: {name} (sm_{major}{minor}, {sms} SMs), driver {driver}");
        Ok((CudaBackend { ctx, stream, funcs, ordinal }, sms.max(1) as u32, description))
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(drv("binding the context to this thread"))
    }

    pub(super) fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf, GpuError> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(drv("allocating device memory"))?;
        // With event tracking off the guard records nothing; the address is all we keep.
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(DevBuf { ptr, bytes, _mem: Mem::Cuda(slice) })
    }

    /// # Safety
    /// See `Backend::htod`.
    pub(super) unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `dst` has room for `src.len()` bytes (caller); from pageable memory the driver
        // copies `src` to staging memory before returning, so `src` may be reused afterwards.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(drv("copying to the device"))
    }

    /// # Safety
    /// See `Backend::dtoh`.
    pub(super) unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `src` holds `dst.len()` readable bytes (caller); `dst` is writable host memory,
        // and the stream is synchronised before `dst` is used again.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(drv("copying from the device"))?;
        self.synchronize()
    }

    /// # Safety
    /// See `Backend::dtod`.
    pub(super) unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: both ranges are valid device memory of this context (caller).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv("copying on the device"))
    }

    /// # Safety
    /// See `Backend::memset0`.
    pub(super) unsafe fn memset0(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `dst .. dst + bytes` is valid device memory of this context (caller).
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }.map_err(drv("clearing device memory"))
    }

    /// # Safety
    /// See `Backend::launch`.
    pub(super) unsafe fn launch(&self, kernel: Kernel, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<(), GpuError> {
        self.bind()?;
        let f = &self.funcs[kernel.index()];
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's parameters and every pointer is valid for
        // the kernel's accesses (caller); the argument values outlive the call (borrowed `args`).
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(drv("launching a kernel"))
    }

    pub(super) fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(drv("synchronising the stream"))
    }

    /// Asks the driver which device `ptr` belongs to and whether `ptr + bytes` stays in its
    /// allocation.
    pub(super) fn check_ptr(&self, ptr: u64, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        let not_device = |e: result::DriverError| GpuError::NotDeviceMemory {
            ptr,
            bytes,
            detail: match drv("querying a pointer")(e) {
                GpuError::Driver { detail, .. } => detail,
                other => other.to_string(),
            },
        };
        let mut ordinal: i32 = -1;
        // SAFETY: `ordinal` is a writable int, the size DEVICE_ORDINAL returns; the driver only
        // inspects `ptr` (any value is allowed and yields an error if unknown).
        unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        }
        .result()
        .map_err(not_device)?;
        if ordinal < 0 || ordinal as usize != self.ordinal {
            return Err(GpuError::WrongDevice { ptr, ptr_device: ordinal, runtime_device: self.ordinal });
        }
        let (mut start, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: RANGE_START_ADDR writes a CUdeviceptr and RANGE_SIZE a size_t into the given,
        // writable locations of those types.
        unsafe {
            sys::cuPointerGetAttribute(
                (&mut start as *mut sys::CUdeviceptr).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                ptr,
            )
            .result()
            .map_err(not_device)?;
            sys::cuPointerGetAttribute(
                (&mut size as *mut usize).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                ptr,
            )
            .result()
            .map_err(not_device)?;
        }
        let end = ptr.checked_add(bytes as u64);
        if end.is_none_or(|e| e > start.saturating_add(size as u64)) {
            return Err(GpuError::NotDeviceMemory { ptr, bytes, detail: format!("the allocation is {start:#x} + {size} bytes") });
        }
        Ok(())
    }

    pub(super) fn mark(&self) -> Result<Mark, GpuError> {
        let ev = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("creating an event"))?;
        ev.record(&self.stream).map_err(drv("recording an event"))?;
        Ok(Mark::Cuda(ev))
    }
}

/// Milliseconds between two recorded events (waits for both).
pub(super) fn elapsed_ms(a: &CudaEvent, b: &CudaEvent) -> Result<f64, GpuError> {
    a.elapsed_ms(b).map(f64::from).map_err(drv("reading event times"))
}
