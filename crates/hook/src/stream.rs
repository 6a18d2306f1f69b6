//! The multi-sequence injection hook: streaming prefill across decodes.
//!
//! A decode (of the engine, or of a C application through libiapt) holds, in batch order, one token for each decoding sequence and one chunk
//! of each sequence in prefill. The hook only touches the rows of chunks of sequences with an
//! adapter ([`Segment`]); every other row passes through. A sequence's pooling state
//! ([`Prefill`]: one CPU generator [`LayerState`] per layer, or one GPU generator state, and the
//! soft tokens once known) lives in
//! the sequence between decodes and is lent to the hook for each decode, so a prompt prefilled in
//! chunks over several decodes is pooled exactly as in one. At each layer the instruction rows of a
//! chunk are fed to the layer's state; the soft-slot rows (after the instruction) are written with
//! P_l, computed once all instruction rows of that layer have been fed, in the decode that holds them.
//!
//! As in `iapt_llama`'s own hook, the callback follows llama.cpp's ubatches: with a unified KV cache
//! a batch is split into contiguous ubatches of `n_ubatch` rows in batch order, each running layers
//! 0..L (a caller that does not know `n_ubatch` arms with 0: the first ubatch's row count is then
//! taken as `n_ubatch`, and every later ubatch must agree with it); a layer-0 node with another row
//! count than planned is an error, and after one error the
//! hook stops touching the graph. Errors are reported by [`StreamHook::finish`]. GPU states are fed
//! and finished through host copies; work a feed queued on the runtime is synchronised before the
//! callback returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iapt_generator::{Generator, LayerState};
use iapt_generator_cuda::{GpuAdapter, GpuError, GpuRuntime, GpuSeqState};

use crate::arch::ArchSpec;

/// A graph node in the data phase of llama.cpp's `cb_eval`, as the hook sees it: its name, its
/// extents, and copies of its rows in and out. Implemented by `iapt_llama::NodeData` and by
/// libiapt's raw ggml tensors.
pub trait LayerRows {
    /// Why a row copy failed.
    type Error: std::fmt::Display;
    /// The node's name (e.g. `l_out-3`).
    fn name(&self) -> &str;
    /// ggml's `ne`: `[n_embd, n_tokens, 1, 1]` for the residual stream.
    fn ne(&self) -> [i64; 4];
    /// Copies rows `row0 .. row0 + out.len() / ne[0]` into `out` (row-major, `ne[0]` per row).
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), Self::Error>;
    /// Overwrites rows `row0 .. row0 + values.len() / ne[0]` with `values`.
    fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), Self::Error>;
}

/// Where one sequence's pooling runs: the CPU generator's streaming states (one per layer), or a
/// device state of the GPU generator (fed and finished through host copies).
enum Pooling {
    Cpu { gen: Arc<Generator>, states: Vec<LayerState> },
    Gpu { rt: Arc<GpuRuntime>, adapter: Arc<GpuAdapter>, state: Box<GpuSeqState> },
}

/// The pooling state of one sequence's prefill, kept across decodes.
pub struct Prefill {
    pooling: Pooling,
    /// Instruction rows of the whole prompt.
    pub n_instr: usize,
    /// Soft tokens (m).
    m: usize,
    /// P_l (m x n_embd) once computed.
    soft: Vec<Option<Vec<f32>>>,
}

impl Prefill {
    /// A prefill on the CPU generator.
    pub fn cpu(gen: Arc<Generator>, n_instr: usize) -> Prefill {
        let (l, m) = (gen.n_layer(), gen.n_soft_tokens());
        let states = (0..l).map(|i| gen.begin(i)).collect();
        Prefill { pooling: Pooling::Cpu { gen, states }, n_instr, m, soft: vec![None; l] }
    }

    /// A prefill on the GPU generator (allocates the device state).
    pub fn gpu(rt: Arc<GpuRuntime>, adapter: Arc<GpuAdapter>, n_instr: usize) -> Result<Prefill, GpuError> {
        let (l, m) = (adapter.n_layer(), adapter.n_soft_tokens());
        let state = Box::new(rt.new_state(&adapter)?);
        Ok(Prefill { pooling: Pooling::Gpu { rt, adapter, state }, n_instr, m, soft: vec![None; l] })
    }

    fn feed(&mut self, layer: usize, rows: &[f32]) -> Result<(), String> {
        match &mut self.pooling {
            Pooling::Cpu { gen, states } => states[layer].feed(gen, rows).map_err(|e| e.to_string()),
            Pooling::Gpu { rt, adapter, state } => rt.feed_host(adapter, state, layer, rows).map_err(|e| e.to_string()),
        }
    }

    fn rows_seen(&self, layer: usize) -> usize {
        match &self.pooling {
            Pooling::Cpu { states, .. } => states[layer].rows_seen(),
            Pooling::Gpu { state, .. } => state.rows_seen(layer),
        }
    }

    /// P_l into `out`; waits for the device's queued work.
    fn finish(&mut self, layer: usize, out: &mut [f32]) -> Result<(), String> {
        match &mut self.pooling {
            Pooling::Cpu { gen, states } => states[layer].finish(gen, out).map_err(|e| e.to_string()),
            Pooling::Gpu { rt, adapter, state } => rt.finish_host(adapter, state, layer, out).map_err(|e| e.to_string()),
        }
    }

    /// The GPU runtime with work queued by `feed`, if any.
    fn runtime(&self) -> Option<&Arc<GpuRuntime>> {
        match &self.pooling {
            Pooling::Cpu { .. } => None,
            Pooling::Gpu { rt, .. } => Some(rt),
        }
    }
}

/// The rows of one sequence's prefill chunk in a decode.
pub struct Segment {
    /// Batch row of the chunk's first row.
    pub row0: usize,
    /// Sequence position of that row (instruction positions come first, then the m soft slots).
    pub first: usize,
    /// Rows in the chunk.
    pub len: usize,
    /// The sequence's state, lent for the decode.
    pub prefill: Prefill,
}

struct Armed {
    segs: Vec<Segment>,
    /// Rows handled per segment and layer (instruction rows fed plus soft rows written).
    done: Vec<Vec<usize>>,
    batch_len: usize,
    n_ubatch: usize,
    /// Current ubatch: index, first row, length.
    ubatch: Option<(usize, usize, usize)>,
    next_layer: usize,
    failed: bool,
}

struct Inner {
    armed: Option<Armed>,
    errors: Vec<String>,
    buf: Vec<f32>,
}

/// The hook installed in the engine's context (see the module documentation).
pub struct StreamHook {
    arch: ArchSpec,
    n_layer: usize,
    n_embd: usize,
    /// Armed and not failed: what `wants` reads first, so a disarmed hook costs one atomic load per node.
    live: AtomicBool,
    inner: Mutex<Inner>,
}

impl StreamHook {
    /// A disarmed hook for a model of architecture `arch` with `n_layer` layers of width `n_embd`.
    pub fn new(arch: ArchSpec, n_layer: usize, n_embd: usize) -> StreamHook {
        StreamHook {
            arch,
            n_layer,
            n_embd,
            live: AtomicBool::new(false),
            inner: Mutex::new(Inner { armed: None, errors: Vec::new(), buf: Vec::new() }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a callback panicked (caught at the FFI boundary); arm resets the state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms the hook for the next decode of `batch_len` rows split into ubatches of `n_ubatch`
    /// (0: not known, learned from the first ubatch).
    pub fn arm(&self, segs: Vec<Segment>, batch_len: usize, n_ubatch: usize) {
        let done = segs.iter().map(|_| vec![0; self.n_layer]).collect();
        let mut inner = self.lock();
        inner.errors.clear();
        inner.armed = Some(Armed { segs, done, batch_len, n_ubatch, ubatch: None, next_layer: 0, failed: false });
        self.live.store(true, Ordering::SeqCst);
    }

    /// Disarms the hook and gives the lent states back, in the order armed, with `Ok` only if every
    /// ubatch and layer was seen and every row of every segment was handled at every layer.
    pub fn finish(&self) -> (Vec<Prefill>, Result<(), Vec<String>>) {
        let mut inner = self.lock();
        self.live.store(false, Ordering::SeqCst);
        let mut errors = std::mem::take(&mut inner.errors);
        let Some(a) = inner.armed.take() else {
            return (Vec::new(), Err(vec!["the hook was not armed".to_owned()]));
        };
        if !a.failed {
            match a.ubatch {
                None => errors.push(format!("node {:?} (layer 0 input) never appeared in the graph", self.arch.layer0_node)),
                Some((_, start, len)) if start + len != a.batch_len || a.next_layer != self.n_layer => errors.push(format!(
                    "the decode ended after {} of {} rows, at layer {} of {}",
                    start + len,
                    a.batch_len,
                    a.next_layer,
                    self.n_layer
                )),
                Some(_) => {}
            }
            for (seg, done) in a.segs.iter().zip(&a.done) {
                if let Some(l) = done.iter().position(|&d| d != seg.len) {
                    errors.push(format!("chunk at batch row {}, layer {l}: {} of {} rows handled", seg.row0, done[l], seg.len));
                }
            }
        }
        let states = a.segs.into_iter().map(|s| s.prefill).collect();
        (states, if errors.is_empty() { Ok(()) } else { Err(errors) })
    }

    /// Tracks ubatches and layers; returns the current ubatch's first row and length.
    fn follow(&self, a: &mut Armed, rows: usize, layer: usize) -> Result<(usize, usize), String> {
        if layer == 0 {
            let (idx, start) = match a.ubatch {
                None => (0, 0),
                Some((i, s, len)) if a.next_layer == self.n_layer => (i + 1, s + len),
                Some((i, ..)) => return Err(format!("ubatch {i}: layer {} input never appeared", a.next_layer)),
            };
            let left = a.batch_len.saturating_sub(start);
            if a.n_ubatch == 0 && idx == 0 && rows > 0 {
                // Not told: llama.cpp's first ubatch has n_ubatch rows, or the whole batch.
                a.n_ubatch = rows;
            }
            let want = a.n_ubatch.min(left);
            if rows != want || want == 0 {
                return Err(format!("ubatch {idx} has {rows} rows, the plan expects {want}: llama.cpp split the batch differently"));
            }
            a.ubatch = Some((idx, start, rows));
            a.next_layer = 0;
        }
        let Some((idx, start, len)) = a.ubatch else { return Err(format!("layer {layer} input before layer 0 input")) };
        if layer != a.next_layer {
            return Err(format!("ubatch {idx}: layer {layer} input when layer {} was expected", a.next_layer));
        }
        a.next_layer = layer + 1;
        Ok((start, len))
    }

    /// Handles one claimed node (the residual stream entering `layer`).
    fn handle<N: LayerRows>(&self, inner: &mut Inner, node: &mut N, layer: usize) -> Result<(), String> {
        let d = self.n_embd;
        let Inner { armed, buf, .. } = inner;
        let Some(a) = armed.as_mut() else { return Ok(()) };
        if a.failed {
            return Ok(());
        }
        let ne = node.ne();
        let (start, len) = self.follow(a, ne[1].max(0) as usize, layer)?;
        if ne[0] as usize != d || ne[2] != 1 || ne[3] != 1 {
            return Err(format!("node {} has shape {ne:?}, expected [{d}, {len}, 1, 1]", node.name()));
        }
        let end = start + len;
        let mut queued: Option<Arc<GpuRuntime>> = None;
        for (seg, done) in a.segs.iter_mut().zip(a.done.iter_mut()) {
            let (r0, r1) = (start.max(seg.row0), end.min(seg.row0 + seg.len));
            if r0 >= r1 {
                continue;
            }
            let p = &mut seg.prefill;
            let n = p.n_instr;
            // Sequence positions of this ubatch's rows of the chunk; instruction part, soft part.
            let (q0, q1) = (seg.first + r0 - seg.row0, seg.first + r1 - seg.row0);
            let at = |e: &dyn std::fmt::Display| format!("chunk at batch row {}, layer {layer}: {e}", seg.row0);
            if q0 < n {
                let k = (q1.min(n) - q0) * d;
                buf.resize(k, 0.0);
                node.read_rows(r0 - start, &mut buf[..k]).map_err(|e| e.to_string())?;
                p.feed(layer, &buf[..k]).map_err(|e| at(&e))?;
                queued = queued.or_else(|| p.runtime().cloned());
            }
            let (s0, s1) = (q0.max(n), q1);
            if s0 < s1 {
                if p.soft[layer].is_none() {
                    if p.rows_seen(layer) != n {
                        return Err(at(&format!("{} of {n} instruction rows seen before the soft slots", p.rows_seen(layer))));
                    }
                    let mut out = vec![0.0f32; p.m * d];
                    p.finish(layer, &mut out).map_err(|e| at(&e))?;
                    p.soft[layer] = Some(out);
                }
                let soft = p.soft[layer].as_ref().expect("computed above");
                if s1 > n + p.m {
                    return Err(at(&"the chunk runs past the soft slots"));
                }
                node.write_rows(r0 - start + (s0 - q0), &soft[(s0 - n) * d..(s1 - n) * d]).map_err(|e| e.to_string())?;
            }
            done[layer] += r1 - r0;
        }
        if let Some(rt) = queued {
            // Work queued by a GPU feed ends before the callback returns.
            rt.synchronize().map_err(|e| format!("layer {layer}: {e}"))?;
        }
        Ok(())
    }

    /// Ask phase: whether the node named `name` is a layer input this hook handles (only while armed
    /// and not failed).
    pub fn wants(&self, name: &str) -> bool {
        self.live.load(Ordering::SeqCst) && self.arch.layer_of(name, self.n_layer).is_some()
    }

    /// Data phase: feeds the node's instruction rows and writes its soft rows. Errors are recorded
    /// for [`StreamHook::finish`] (a callback cannot fail a decode) and stop the hook touching the
    /// graph until the next [`StreamHook::arm`].
    pub fn on_data<N: LayerRows>(&self, node: &mut N) {
        let Some(layer) = self.arch.layer_of(node.name(), self.n_layer) else { return };
        let mut inner = self.lock();
        if let Err(e) = self.handle(&mut inner, node, layer) {
            inner.errors.push(e);
            if let Some(a) = inner.armed.as_mut() {
                // Stop touching the graph; `finish` reports the error and the caller drops the chunks' sequences.
                a.failed = true;
                self.live.store(false, Ordering::SeqCst);
            }
        }
    }
}
