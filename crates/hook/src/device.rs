//! How the hook reaches a graph node's rows ([`LayerRows`]), and the GPU generator reading and
//! writing them in place: the only `unsafe` of the crate, the trait's two device accessors and
//! the hook's calls to them, whose promise (no queued work reads the rows after the callback
//! returns) the hook keeps by synchronising the runtime before every return from its data phase
//! (`stream::SyncOnExit`, and `finish_device`, which synchronises itself).

use iapt_generator_cuda::{DevRows, DevRowsMut, GpuAdapter, GpuError, GpuRuntime, GpuSeqState};

/// A graph node in the data phase of llama.cpp's `cb_eval`, as the hook sees it: its name, its
/// extents, and access to its rows. Implemented by `iapt_llama::NodeData` and by libiapt's raw
/// ggml tensors.
pub trait LayerRows {
    /// Why a row access failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The node's name (e.g. `l_out-3`).
    fn name(&self) -> &str;
    /// ggml's `ne`: `[n_embd, n_tokens, 1, 1]` for the residual stream.
    fn ne(&self) -> [i64; 4];
    /// Whether the node's data is in host memory (a copy of a node elsewhere is a round trip to
    /// its device or RPC worker).
    fn is_host(&self) -> bool;
    /// Copies rows `row0 .. row0 + out.len() / ne[0]` into `out` (row-major, `ne[0]` per row).
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), Self::Error>;
    /// Overwrites rows `row0 .. row0 + values.len() / ne[0]` with `values`.
    fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), Self::Error>;
    /// Rows `row0 .. row0 + n` viewed in place, when the node's data is in host memory and can be
    /// read without a copy; `None` otherwise (then [`LayerRows::read_rows`] copies).
    fn host_rows(&self, row0: usize, n: usize) -> Option<Result<&[f32], Self::Error>> {
        let _ = (row0, n);
        None
    }
    /// Rows `row0 .. row0 + n` as device rows of a GPU runtime that computes where the node lives
    /// (device memory for CUDA, `emulated == false`; host memory for the emulator), or `Ok(None)`
    /// when it lives elsewhere or the node type offers no device access.
    ///
    /// # Safety
    /// The caller must make sure that no work queued with the returned rows on a runtime is still
    /// running when the data phase of this node ends (the callback returns): synchronise the runtime
    /// first. The node's data is only guaranteed to stay allocated and unwritten until then.
    unsafe fn device_rows(&self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRows<'_>>, Self::Error> {
        let _ = (emulated, row0, n);
        Ok(None)
    }
    /// As [`LayerRows::device_rows`], writable (where the soft tokens go).
    ///
    /// # Safety
    /// As [`LayerRows::device_rows`].
    unsafe fn device_rows_mut(&mut self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRowsMut<'_>>, Self::Error> {
        let _ = (emulated, row0, n);
        Ok(None)
    }
}

/// Why an in-place step failed: the node's row access or the GPU generator.
pub(crate) enum Failure<E> {
    Node(E),
    Gpu(GpuError),
}

/// Whether the runtime may read or write this node in place: a node in another kind of memory
/// (host for CUDA, device for the emulator) or on another device goes through the host instead.
fn elsewhere(e: &GpuError) -> bool {
    matches!(e, GpuError::WrongDevice { .. } | GpuError::NotDeviceMemory { .. })
}

/// Feeds node rows `row0..row0 + n` to `state` in place when the node lives where `rt` computes.
/// `Ok(false)`: it does not (feed through the host instead); nothing was queued.
pub(crate) fn feed_in_place<N: LayerRows>(
    node: &N,
    rt: &GpuRuntime,
    adapter: &GpuAdapter,
    state: &mut GpuSeqState,
    layer: usize,
    row0: usize,
    n: usize,
) -> Result<bool, Failure<N::Error>> {
    // SAFETY: the hook calls this only from its data phase, after registering `rt` in the
    // `SyncOnExit` guard of the node's handling (`Ctx::feed`), which synchronises `rt` on every
    // return from `StreamHook::handle`, including early error returns and unwinding; so no work
    // queued here with the rows runs after the callback returns.
    let rows = unsafe { node.device_rows(rt.is_emulated(), row0, n) }.map_err(Failure::Node)?;
    let Some(rows) = rows else { return Ok(false) };
    match rt.feed_device(adapter, state, layer, rows) {
        Err(e) if elsewhere(&e) => Ok(false),
        r => r.map(|()| true).map_err(Failure::Gpu),
    }
}

/// Writes P_l into node rows `row0..row0 + m` in place when the node lives where `rt` computes.
/// `Ok(false)`: it does not (finish through the host instead).
pub(crate) fn finish_in_place<N: LayerRows>(
    node: &mut N,
    rt: &GpuRuntime,
    adapter: &GpuAdapter,
    state: &mut GpuSeqState,
    layer: usize,
    row0: usize,
    m: usize,
) -> Result<bool, Failure<N::Error>> {
    // SAFETY: `finish_device` synchronises the runtime before it returns (and the hook's
    // `SyncOnExit` guard, registered for `rt` before this call, synchronises again on every return
    // from the data phase), so no write queued with these rows outlives the callback.
    let dst = unsafe { node.device_rows_mut(rt.is_emulated(), row0, m) }.map_err(Failure::Node)?;
    let Some(dst) = dst else { return Ok(false) };
    match rt.finish_device(adapter, state, layer, dst) {
        Err(e) if elsewhere(&e) => Ok(false),
        r => r.map(|()| true).map_err(Failure::Gpu),
    }
}

/// Whether the node's data lives where `rt` computes (device memory for CUDA, host memory for the
/// emulator), for [`crate::Claim::on_device`].
pub(crate) fn in_runtime_memory<N: LayerRows>(node: &N, rt: &GpuRuntime) -> bool {
    // SAFETY: a view of zero rows, dropped at once: no work is queued with it.
    matches!(unsafe { node.device_rows(rt.is_emulated(), 0, 0) }, Ok(Some(_)))
}
