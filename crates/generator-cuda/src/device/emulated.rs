//! The emulated backend of the GPU generator: "device memory" is aligned host memory, copies are
//! `memcpy`, and launches run the kernels of `kernels.cu`, compiled as C++ by build.rs, on CPU
//! threads through `iapt_emu_launch` (see `emulate.h` for the execution model). Everything is
//! synchronous, so there is nothing to wait for.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr::NonNull;

use super::{Arg, DevBuf, Kernel, Mem};
use crate::error::GpuError;

extern "C" {
    /// emulate.cpp: runs kernel `name` over grid (gx, gy, gz) with bx threads per block;
    /// `args[i]` points to the i-th argument's value. Returns 0, or a negative code.
    fn iapt_emu_launch(name: *const c_char, gx: u32, gy: u32, gz: u32, bx: u32, args: *mut *mut c_void, nargs: c_int) -> c_int;
}

/// Alignment of emulated allocations (as cudaMalloc's, at least 256 bytes).
const ALIGN: usize = 256;

/// A zeroed host allocation standing in for device memory. It is only ever accessed through raw
/// pointers (by the kernels and the copy functions), never through Rust references.
pub(super) struct HostMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `HostMem` owns its allocation exclusively (like a `Box<[u8]>`); the address may be used
// from any thread, and concurrent kernel accesses are serialised by the launcher's mutex.
unsafe impl Send for HostMem {}
// SAFETY: `&HostMem` exposes no access to the bytes at all.
unsafe impl Sync for HostMem {}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(self.layout)` and is freed exactly once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The emulator (stateless: the kernels' block-shared statics live in the C++ library).
pub(super) struct EmuBackend;

impl EmuBackend {
    pub(super) fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf, GpuError> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|_| GpuError::Unsupported { detail: format!("an allocation of {bytes} bytes") })?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| GpuError::Unsupported { detail: format!("out of host memory for {bytes} bytes") })?;
        Ok(DevBuf { ptr: ptr.as_ptr() as u64, bytes, _mem: Mem::Host(HostMem { ptr, layout }) })
    }

    /// # Safety
    /// See `Backend::htod` (device memory is host memory here).
    pub(super) unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        // SAFETY: `dst` has room for `src.len()` bytes (caller) and is a distinct allocation from
        // the borrowed `src`; no kernel runs concurrently (launches are synchronous).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    /// # Safety
    /// See `Backend::dtoh`.
    pub(super) unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        // SAFETY: `src` holds `dst.len()` readable bytes (caller), not overlapping the borrowed `dst`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// # Safety
    /// See `Backend::dtod`.
    pub(super) unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: both ranges are valid and disjoint (caller).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// # Safety
    /// See `Backend::memset0`.
    pub(super) unsafe fn memset0(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: `dst .. dst + bytes` is writable (caller).
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    /// # Safety
    /// See `Backend::launch`.
    pub(super) unsafe fn launch(&self, kernel: Kernel, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<(), GpuError> {
        let name = CString::new(kernel.name()).map_err(|_| GpuError::Emulator { kernel: kernel.name(), code: -1 })?;
        let mut params: Vec<*mut c_void> = args.iter().map(Arg::as_param).collect();
        // SAFETY: `name` is NUL-terminated; `params` holds `args.len()` pointers to the argument
        // values, alive (borrowed) across the call, in the kernel's parameter order and types
        // (caller), which the launcher checks by count; every pointer argument is valid for the
        // kernel's accesses (caller). The launcher returns only when every block has run.
        let code = unsafe { iapt_emu_launch(name.as_ptr(), grid.0, grid.1, 1, block, params.as_mut_ptr(), params.len() as c_int) };
        if code != 0 {
            return Err(GpuError::Emulator { kernel: kernel.name(), code });
        }
        Ok(())
    }
}
