//! The injection hook: several sequences per decode, each with its own adapter, prompts prefilled
//! in chunks over any number of decodes.
//!
//! A decode (of the engine, or of a C application through libiapt) holds, in batch order, one
//! token for each decoding sequence and one chunk of each sequence in prefill. The hook only
//! touches the rows of chunks of sequences with an adapter ([`Segment`]); every other row passes
//! through. A sequence's pooling state ([`Prefill`]: the CPU generator's streaming state per layer,
//! or one GPU generator state, and the soft tokens once known) lives in the sequence between
//! decodes and is lent to the hook for each decode, so a prompt prefilled in chunks over several
//! decodes is pooled exactly as in one. At each layer the instruction rows of a chunk are fed to
//! the layer's state; the soft-slot rows (after the instruction) are written with P_l, computed
//! once all instruction rows of that layer have been fed, in the decode that holds them.
//!
//! **Where the generator reads and writes.** On the CPU, rows of a node in host memory are read in
//! place ([`LayerRows::host_rows`]), others are copied out and back through the backend. On a GPU
//! runtime, when the node lives in the runtime's device memory (llama.cpp's CUDA backend with the
//! layers offloaded), the kernels read the instruction rows and write the soft rows in place in
//! llama.cpp's tensor ([`LayerRows::device_rows`]), with no host round trip of
//! hidden states; a node elsewhere (the token embeddings, computed on the CPU) goes through the
//! host. Before the callback returns, the runtime is synchronised, so llama.cpp's next node sees the
//! soft rows and no queued read outlives the node's data.
//!
//! **Ubatches.** The callback does not see llama.cpp's ubatches, so the caller says how llama.cpp
//! splits the batch ([`Split`]) and the hook follows the ubatches, each running layers 0..L. With
//! one KV stream (a unified cache) they are contiguous runs of `n_ubatch` rows in batch order (a
//! caller that does not know `n_ubatch` arms with 0: the first ubatch's row count is then taken as
//! `n_ubatch`, and every later ubatch must agree with it); with one stream per sequence each
//! ubatch holds the same number of rows of several sequences, and the caller gives the batch rows
//! of each ubatch in graph order (`iapt_llama::split`). A layer-0 node with another row count than
//! expected is an error, and after such an error of the whole decode the hook stops touching the
//! graph.
//!
//! **Failures stay with their sequence.** An error that belongs to one segment (its generator
//! failed, its soft tokens are not finite or out of range) stops the hook touching that segment's
//! rows only; the others go on, and [`HookError::segment`] tells the caller which sequence to fail.
//! Soft tokens are checked before they are written ([`SOFT_TOKEN_LIMIT`]), so no value that is not
//! finite, or that would overflow the next layer's norm, ever enters llama.cpp's graph or its KV
//! cache, where another sequence's attention could read it.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iapt_generator::{Generator, LayerState};
use iapt_generator_cuda::{GpuAdapter, GpuError, GpuRuntime, GpuSeqState};

use crate::arch::ArchSpec;
use crate::device::{self, LayerRows};
use crate::error::{HookError, NodeFailure};

/// The largest magnitude a soft-token value may have. P_l replaces the residual stream of its rows
/// and the layer's first step is an RMS norm, whose sum of squares must stay finite in f32
/// (3.4e38): at this limit it does for every width up to 2^20 (2^20 x 1e30 ~ 1e36). A generator
/// that produces more (weights scaled far beyond training, an overflow) fails its own sequence.
pub const SOFT_TOKEN_LIMIT: f32 = 1.0e15;

/// Where one sequence's pooling runs: the CPU generator's streaming states (one per layer), or a
/// device state of the GPU generator.
enum Pooling {
    Cpu { gen: Arc<Generator>, states: Vec<LayerState> },
    Gpu { rt: Arc<GpuRuntime>, adapter: Arc<GpuAdapter>, state: Box<GpuSeqState> },
}

/// The pooling state of one sequence's prefill, kept across decodes.
pub struct Prefill {
    pooling: Pooling,
    /// Instruction rows of the whole prompt.
    n_instr: usize,
    /// Soft tokens (m).
    m: usize,
    /// P_l (m x n_embd) once computed on the host.
    soft: Vec<Option<Vec<f32>>>,
    /// Layers whose m soft rows were written in place in device memory.
    in_place: Vec<bool>,
    /// Each layer's instruction rows as pooled, kept for the prefix cache when asked for
    /// ([`Prefill::capture_inputs`]; CPU pooling only).
    captured: Option<Vec<Vec<f32>>>,
}

impl Prefill {
    /// A prefill on the CPU generator for a prompt of `n_instr` instruction tokens.
    pub fn cpu(gen: Arc<Generator>, n_instr: usize) -> Prefill {
        let (l, m) = (gen.n_layer(), gen.n_soft_tokens());
        let states = (0..l).map(|i| gen.begin(i)).collect();
        Prefill::with(Pooling::Cpu { gen, states }, n_instr, l, m)
    }

    /// A prefill over `pooling` (started, or restored from a snapshot), nothing computed yet.
    fn with(pooling: Pooling, n_instr: usize, n_layer: usize, m: usize) -> Prefill {
        Prefill { pooling, n_instr, m, soft: vec![None; n_layer], in_place: vec![false; n_layer], captured: None }
    }

    /// A prefill on the GPU generator (allocates the device state).
    pub fn gpu(rt: Arc<GpuRuntime>, adapter: Arc<GpuAdapter>, n_instr: usize) -> Result<Prefill, GpuError> {
        let (l, m) = (adapter.n_layer(), adapter.n_soft_tokens());
        let state = Box::new(rt.new_state(&adapter)?);
        Ok(Prefill::with(Pooling::Gpu { rt, adapter, state }, n_instr, l, m))
    }

    /// Instruction rows of the prompt.
    pub fn n_instr(&self) -> usize {
        self.n_instr
    }

    /// Soft tokens (m).
    pub fn n_soft_tokens(&self) -> usize {
        self.m
    }

    /// Rows of the whole prompt: instruction plus soft slots.
    pub fn total(&self) -> usize {
        self.n_instr + self.m
    }

    fn n_layer(&self) -> usize {
        self.soft.len()
    }

    fn rows_seen(&self, layer: usize) -> usize {
        match &self.pooling {
            Pooling::Cpu { states, .. } => states[layer].rows_seen(),
            Pooling::Gpu { state, .. } => state.rows_seen(layer),
        }
    }
}

/// Whose pooling a [`PoolSnapshot`] holds: a loaded CPU generator ([`Generator::id`]) or an adapter
/// uploaded to a GPU runtime ([`GpuAdapter::id`]); each id is unique per load, so a replaced or
/// reloaded adapter never matches an old snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKey {
    /// A CPU generator.
    Cpu(u64),
    /// An adapter on a GPU runtime.
    Gpu(u64),
}

/// A copy of a prefill's pooling after its first [`PoolSnapshot::rows`] instruction rows, at every
/// layer, from which another prefill of the same generator can start (the prefix cache): the
/// streaming states are online softmaxes, so going on from a copy equals pooling every row in
/// one go. A GPU prefill's copy is taken to host memory.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    key: PoolKey,
    rows: usize,
    saved: Saved,
}

#[derive(Debug, Clone)]
enum Saved {
    Cpu(Vec<LayerState>),
    Gpu(iapt_generator_cuda::GpuStateCopy),
}

impl PoolSnapshot {
    /// Instruction rows pooled.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The generator it belongs to.
    pub fn key(&self) -> PoolKey {
        self.key
    }

    /// Bytes it holds (its running sums).
    pub fn bytes(&self) -> usize {
        match &self.saved {
            Saved::Cpu(states) => states.iter().map(LayerState::bytes).sum(),
            Saved::Gpu(copy) => copy.bytes(),
        }
    }
}

impl Prefill {
    /// The key of its generator's pooling snapshots.
    pub fn pool_key(&self) -> PoolKey {
        match &self.pooling {
            Pooling::Cpu { gen, .. } => PoolKey::Cpu(gen.id()),
            Pooling::Gpu { adapter, .. } => PoolKey::Gpu(adapter.id()),
        }
    }

    /// A copy of the pooling so far, when every layer has seen the same rows (between decodes);
    /// `None` when they have not, or when a GPU state cannot be copied to the host.
    pub fn snapshot(&self) -> Option<PoolSnapshot> {
        let rows = self.rows_seen(0);
        if (1..self.n_layer()).any(|l| self.rows_seen(l) != rows) {
            return None;
        }
        let saved = match &self.pooling {
            Pooling::Cpu { states, .. } => Saved::Cpu(states.clone()),
            Pooling::Gpu { rt, state, .. } => Saved::Gpu(rt.save_state(state).ok()?),
        };
        Some(PoolSnapshot { key: self.pool_key(), rows, saved })
    }

    /// From now on, keeps a copy of every instruction row pooled, per layer (the prefix cache
    /// stores them so that another adapter can pool a shared prefix without a forward pass).
    /// CPU pooling only (a GPU reads the rows in device memory, where copying them out would cost
    /// a transfer per layer); `false` on the GPU.
    pub fn capture_inputs(&mut self) -> bool {
        let Pooling::Cpu { gen, .. } = &self.pooling else { return false };
        self.captured = Some(vec![Vec::new(); gen.n_layer()]);
        true
    }

    /// The rows kept since [`Prefill::capture_inputs`], per layer (each `rows x n_embd`).
    pub fn take_inputs(&mut self) -> Option<Vec<Vec<f32>>> {
        self.captured.take()
    }

    /// Pools `rows` (`k x n_embd` layer-`layer` inputs of the next instruction rows) without a
    /// forward pass: rows a prefix cache kept from another sequence's prefill of the same prompt
    /// (on a GPU runtime, uploaded and fed there). On error the state is unchanged (CPU) or
    /// unusable (GPU), and `false` is returned: start the prefill cold.
    pub fn pool_rows(&mut self, layer: usize, rows: &[f32]) -> bool {
        match &mut self.pooling {
            Pooling::Cpu { gen, states } => states.get_mut(layer).is_some_and(|s| s.feed(gen, rows).is_ok()),
            Pooling::Gpu { rt, adapter, state } => rt.feed_host(adapter, state, layer, rows).is_ok(),
        }
    }

    /// A prefill on the CPU generator for a prompt of `n_instr` instruction tokens whose first
    /// `snap.rows()` rows are already pooled in `snap`. `None` when `snap` belongs to another
    /// generator (another adapter, or this one loaded again) or covers more rows than the prompt.
    pub fn cpu_from(gen: Arc<Generator>, n_instr: usize, snap: &PoolSnapshot) -> Option<Prefill> {
        let l = gen.n_layer();
        let Saved::Cpu(states) = &snap.saved else { return None };
        if snap.key != PoolKey::Cpu(gen.id()) || snap.rows > n_instr || states.len() != l {
            return None;
        }
        let (m, states) = (gen.n_soft_tokens(), states.clone());
        Some(Prefill::with(Pooling::Cpu { gen, states }, n_instr, l, m))
    }

    /// As [`Prefill::cpu_from`], on a GPU runtime: the copy is loaded into a new device state.
    pub fn gpu_from(rt: Arc<GpuRuntime>, adapter: Arc<GpuAdapter>, n_instr: usize, snap: &PoolSnapshot) -> Option<Prefill> {
        let Saved::Gpu(copy) = &snap.saved else { return None };
        if snap.key != PoolKey::Gpu(adapter.id()) || snap.rows > n_instr {
            return None;
        }
        let state = Box::new(rt.load_state(&adapter, copy).ok()?);
        let (l, m) = (adapter.n_layer(), adapter.n_soft_tokens());
        Some(Prefill::with(Pooling::Gpu { rt, adapter, state }, n_instr, l, m))
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

/// How llama.cpp splits a decode's batch into ubatches (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// Consecutive runs of `n_ubatch` rows in batch order (one KV stream); `n_ubatch` 0: learned
    /// from the first ubatch.
    Simple {
        /// Rows in the batch.
        batch_len: usize,
        /// Rows per ubatch (the last may have fewer).
        n_ubatch: usize,
    },
    /// Each ubatch's batch rows, in the order of the graph's rows.
    Planned(Vec<Vec<Range<usize>>>),
}

impl Split {
    /// Rows in the batch.
    pub fn batch_len(&self) -> usize {
        match self {
            Split::Simple { batch_len, .. } => *batch_len,
            Split::Planned(u) => u.iter().flatten().map(|r| r.len()).sum(),
        }
    }

    /// The most rows one ubatch holds (0 where not known yet).
    fn n_ubatch(&self) -> usize {
        match self {
            Split::Simple { n_ubatch, .. } => *n_ubatch,
            Split::Planned(u) => u.iter().map(|p| p.iter().map(|r| r.len()).sum()).max().unwrap_or(0),
        }
    }
}

/// One claimed node, for tests and diagnostics ([`StreamHook::claims`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Ubatch index within the decode.
    pub ubatch: usize,
    /// Layer whose input the node holds.
    pub layer: usize,
    /// The node's name.
    pub node: String,
    /// The node's row count (`ne[1]`).
    pub rows: usize,
    /// Whether the node lives where the decode's GPU runtime computes (device memory; host memory
    /// for the emulator), so that GPU segments read and write its rows in place there.
    pub on_device: bool,
}

/// Where the hook's time went during the last armed decode: copying instruction rows out of
/// nodes not viewable in place, running the generators, writing the soft rows; `total` is the
/// whole time inside the callback's data phase, so [`HookTimes::rest`] is ubatch tracking, claims,
/// and the GPU paths' launches and synchronisation outside these three.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HookTimes {
    /// All time in the data phase of claimed nodes.
    pub total: Duration,
    /// Copying instruction rows out of the nodes.
    pub read: Duration,
    /// The generators' feeding and finishing.
    pub generate: Duration,
    /// Writing the soft rows into the nodes.
    pub write: Duration,
}

impl HookTimes {
    /// `total` minus the three parts.
    pub fn rest(&self) -> Duration {
        self.total.saturating_sub(self.read + self.generate + self.write)
    }
}

struct Armed {
    segs: Vec<Segment>,
    /// Rows handled per segment and layer (instruction rows fed plus soft rows written).
    done: Vec<Vec<usize>>,
    /// Segments that failed in this decode (their rows are no longer touched).
    seg_failed: Vec<bool>,
    split: Split,
    /// Current ubatch: its index and its batch rows in graph order.
    ubatch: Option<(usize, Vec<Range<usize>>)>,
    next_layer: usize,
    /// The whole decode failed: the hook stops touching the graph.
    failed: bool,
}

struct Inner {
    armed: Option<Armed>,
    errors: Vec<HookError>,
    claims: Vec<Claim>,
    times: HookTimes,
    remote_copies: usize,
    buf: Vec<f32>,
}

/// The hook installed in a llama.cpp context (see the module documentation).
pub struct StreamHook {
    arch: ArchSpec,
    n_layer: usize,
    n_embd: usize,
    /// Armed and not failed: what `wants` reads first, so a disarmed hook costs one atomic load per
    /// node (every decode step without a prefill chunk).
    live: AtomicBool,
    inner: Mutex<Inner>,
}

impl StreamHook {
    /// A disarmed hook for a model of architecture `arch` with `n_layer` layers of width `n_embd`.
    pub fn new(arch: ArchSpec, n_layer: usize, n_embd: usize) -> StreamHook {
        let inner =
            Inner { armed: None, errors: Vec::new(), claims: Vec::new(), times: HookTimes::default(), remote_copies: 0, buf: Vec::new() };
        StreamHook { arch, n_layer, n_embd, live: AtomicBool::new(false), inner: Mutex::new(inner) }
    }

    /// The architecture's node table.
    pub fn arch(&self) -> &ArchSpec {
        &self.arch
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a callback panicked (caught at the FFI boundary); arm resets the state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms the hook for the next decode, whose batch llama.cpp splits as `split` says. The
    /// segments must lie in the batch in order; a segment whose prefill was made for another model
    /// shape fails alone.
    pub fn arm(&self, segs: Vec<Segment>, split: Split) {
        let done = segs.iter().map(|_| vec![0; self.n_layer]).collect();
        let seg_failed = vec![false; segs.len()];
        let mut inner = self.lock();
        inner.errors.clear();
        inner.claims.clear();
        inner.times = HookTimes::default();
        inner.remote_copies = 0;
        let mut a = Armed { segs, done, seg_failed, split, ubatch: None, next_layer: 0, failed: false };
        for (i, s) in a.segs.iter().enumerate() {
            if s.first + s.len > s.prefill.total() {
                let e = HookError::PastPrompt { seg: i, first: s.first, end: s.first + s.len, total: s.prefill.total() };
                inner.errors.push(e);
                a.seg_failed[i] = true;
            } else if s.prefill.n_layer() != self.n_layer {
                let e = HookError::RowsMissing { seg: i, layer: s.prefill.n_layer().min(self.n_layer), handled: 0, len: s.len };
                inner.errors.push(e);
                a.seg_failed[i] = true;
            }
        }
        inner.armed = Some(a);
        self.live.store(true, Ordering::SeqCst);
    }

    /// Disarms the hook and gives the lent states back, in the order armed, with every error of the
    /// decode: `Ok` only if every ubatch and layer was seen and every row of every segment was
    /// handled at every layer. An error with a [`HookError::segment`] concerns that segment alone.
    pub fn finish(&self) -> (Vec<Prefill>, Result<(), Vec<HookError>>) {
        let mut inner = self.lock();
        self.live.store(false, Ordering::SeqCst);
        let mut errors = std::mem::take(&mut inner.errors);
        let Some(a) = inner.armed.take() else {
            return (Vec::new(), Err(vec![HookError::NotArmed]));
        };
        if !a.failed {
            errors.extend(self.coverage_errors(&a));
        }
        let states = a.segs.into_iter().map(|s| s.prefill).collect();
        (states, if errors.is_empty() { Ok(()) } else { Err(errors) })
    }

    /// What a decode that raised no error of its own still missed: ubatches, layers, rows.
    fn coverage_errors(&self, a: &Armed) -> Vec<HookError> {
        let mut errors = Vec::new();
        match &a.ubatch {
            None => errors.push(HookError::Layer0Missing { node: self.arch.layer0_node.to_owned() }),
            Some((idx, rows)) => {
                let idx = *idx;
                let covered = match &a.split {
                    Split::Simple { .. } => rows.last().map_or(0, |r| r.end),
                    Split::Planned(u) => u[..=idx].iter().flatten().map(|r| r.len()).sum(),
                };
                if covered != a.split.batch_len() {
                    errors.push(HookError::UbatchesIncomplete { covered, batch_len: a.split.batch_len() });
                }
                if a.next_layer != self.n_layer {
                    let layer = a.next_layer;
                    errors.push(HookError::LayerMissing { ubatch: idx, node: self.arch.layer_input_node(layer), layer });
                }
            }
        }
        for (seg, (s, done)) in a.segs.iter().zip(&a.done).enumerate() {
            if a.seg_failed[seg] {
                continue;
            }
            if let Some(layer) = done.iter().position(|&d| d != s.len) {
                errors.push(HookError::RowsMissing { seg, layer, handled: done[layer], len: s.len });
            }
        }
        errors
    }

    /// Where the time went in the last armed decode.
    pub fn times(&self) -> HookTimes {
        self.lock().times
    }

    /// Row copies (reads and writes) of nodes outside host memory in the last armed decode: with
    /// the model's layers on an RPC worker, one network round trip each.
    pub fn remote_copies(&self) -> usize {
        self.lock().remote_copies
    }

    /// The nodes claimed during the last armed decode, in order.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().claims.clone()
    }

    /// Ask phase: whether the node named `name` is a layer input this hook handles (only while armed
    /// and not failed).
    pub fn wants(&self, name: &str) -> bool {
        self.live.load(Ordering::SeqCst) && self.arch.layer_of(name, self.n_layer).is_some()
    }

    /// Data phase: feeds the node's instruction rows and writes its soft rows. Errors are recorded
    /// for [`StreamHook::finish`] (a callback cannot fail a decode).
    pub fn on_data<N: LayerRows>(&self, node: &mut N) {
        let Some(layer) = self.arch.layer_of(node.name(), self.n_layer) else { return };
        let t0 = Instant::now();
        let mut inner = self.lock();
        let res = self.handle(&mut inner, node, layer);
        inner.times.total += t0.elapsed();
        if let Err(e) = res {
            inner.errors.push(e);
            if let Some(a) = inner.armed.as_mut() {
                // Stop touching the graph; `finish` reports the error and the caller drops the chunks' sequences.
                a.failed = true;
                self.live.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Tracks ubatches and layers: layer 0's node starts the next ubatch, whose row count must be
    /// the expected one, and layers come in order. Returns the ubatch's index and batch rows.
    fn follow(&self, a: &mut Armed, rows: usize, layer: usize) -> Result<(usize, Vec<Range<usize>>), HookError> {
        if layer == 0 {
            let idx = match &a.ubatch {
                None => 0,
                Some((i, _)) if a.next_layer == self.n_layer => i + 1,
                Some((i, _)) => {
                    let next = a.next_layer;
                    return Err(HookError::LayerMissing { ubatch: *i, node: self.arch.layer_input_node(next), layer: next });
                }
            };
            let batch_len = a.split.batch_len();
            let ranges = match &mut a.split {
                Split::Simple { n_ubatch, batch_len } => {
                    let start = a.ubatch.as_ref().and_then(|(_, r)| r.last()).map_or(0, |r| r.end);
                    if start >= *batch_len {
                        return Err(HookError::BeyondBatch { batch_len: *batch_len });
                    }
                    if *n_ubatch == 0 && idx == 0 && rows > 0 {
                        // Not told: llama.cpp's first ubatch has n_ubatch rows, or the whole batch.
                        *n_ubatch = rows;
                    }
                    std::iter::once(start..start + (*n_ubatch).min(*batch_len - start)).collect()
                }
                Split::Planned(u) => match u.get(idx) {
                    Some(r) => r.clone(),
                    None => return Err(HookError::BeyondBatch { batch_len }),
                },
            };
            let want: usize = ranges.iter().map(|r| r.len()).sum();
            if rows != want {
                return Err(HookError::UbatchRows { ubatch: idx, rows, want, batch_len, n_ubatch: a.split.n_ubatch() });
            }
            a.ubatch = Some((idx, ranges));
            a.next_layer = 0;
        }
        let Some((idx, ranges)) = &a.ubatch else { return Err(HookError::LayerOrder { ubatch: None, layer, expected: 0 }) };
        if layer != a.next_layer {
            return Err(HookError::LayerOrder { ubatch: Some(*idx), layer, expected: a.next_layer });
        }
        a.next_layer = layer + 1;
        Ok((*idx, ranges.clone()))
    }

    /// Handles one claimed node (the residual stream entering `layer`): every live segment with
    /// rows in this ubatch feeds its instruction rows and writes its soft rows. A segment's own
    /// failure is recorded and fails that segment alone; the `Err` is a failure of the decode. GPU
    /// work that reads the node is waited for before this returns, on every path ([`SyncOnExit`]).
    fn handle<N: LayerRows>(&self, inner: &mut Inner, node: &mut N, layer: usize) -> Result<(), HookError> {
        let Inner { armed, errors, claims, times, remote_copies, buf } = inner;
        let Some(a) = armed.as_mut() else { return Ok(()) };
        if a.failed {
            return Ok(());
        }
        let ne = node.ne();
        let rows = ne[1].max(0) as usize;
        let (idx, ranges) = self.follow(a, rows, layer)?;
        if ne[0] as usize != self.n_embd || ne[2] != 1 || ne[3] != 1 {
            return Err(HookError::NodeShape { node: node.name().to_owned(), ne, n_embd: self.n_embd, rows });
        }
        let mut ctx = Ctx { layer, d: self.n_embd, buf, times, remote_copies, sync: SyncOnExit(None) };
        let mut fatal = None;
        // Node row of each range's first batch row.
        let offsets = ranges.iter().scan(0, |at, r| {
            let o = *at;
            *at += r.len();
            Some(o)
        });
        'ranges: for (range, node_row) in ranges.iter().zip(offsets) {
            for (seg, s) in a.segs.iter_mut().enumerate() {
                if a.seg_failed[seg] {
                    continue;
                }
                let (r0, r1) = (range.start.max(s.row0), range.end.min(s.row0 + s.len));
                if r0 >= r1 {
                    continue;
                }
                match ctx.segment(node, s, seg, r0, r1, node_row + (r0 - range.start)) {
                    Ok(()) => a.done[seg][layer] += r1 - r0,
                    Err(SegFail::Seg(e)) => {
                        errors.push(e);
                        a.seg_failed[seg] = true;
                    }
                    Err(SegFail::Decode(e)) => {
                        fatal = Some(e);
                        break 'ranges;
                    }
                }
            }
        }
        // Where the node lives, seen from the first GPU runtime of the decode (if any).
        let gpu = a.segs.iter().find_map(|s| match &s.prefill.pooling {
            Pooling::Gpu { rt, .. } => Some(rt),
            Pooling::Cpu { .. } => None,
        });
        let on_device = gpu.is_some_and(|rt| device::in_runtime_memory(&*node, rt));
        let synced = ctx.sync.done();
        claims.push(Claim { ubatch: idx, layer, node: node.name().to_owned(), rows, on_device });
        if let Some(e) = fatal {
            return Err(e);
        }
        synced.map_err(|source| HookError::Gpu { seg: None, layer, source })
    }
}

/// A segment's failure: its own, or one that fails the whole decode (a node that cannot be read).
enum SegFail {
    Seg(HookError),
    Decode(HookError),
}

/// Waits for a GPU runtime's work that reads llama.cpp's node before the callback returns, on every
/// exit: [`SyncOnExit::done`] on the normal path (reporting a failure), `Drop` on an early return or
/// a panic (the decode has failed then, so a failure there adds nothing). llama.cpp runs the
/// node's consumers as soon as the callback returns, and may then overwrite the rows being read.
struct SyncOnExit(Option<Arc<GpuRuntime>>);

impl SyncOnExit {
    fn done(mut self) -> Result<(), GpuError> {
        match self.0.take() {
            Some(rt) => rt.synchronize(),
            None => Ok(()),
        }
    }
}

impl Drop for SyncOnExit {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            let _ = rt.synchronize();
        }
    }
}

/// What one claimed node's handling shares across its segments.
struct Ctx<'a> {
    layer: usize,
    d: usize,
    buf: &'a mut Vec<f32>,
    times: &'a mut HookTimes,
    remote_copies: &'a mut usize,
    /// The runtime with work queued on this node, if any.
    sync: SyncOnExit,
}

fn node_err<E: std::error::Error + Send + Sync + 'static>(layer: usize) -> impl Fn(E) -> SegFail {
    move |e| SegFail::Decode(HookError::Node { layer, source: Box::new(e) as NodeFailure })
}

/// Whether every value is finite and within [`SOFT_TOKEN_LIMIT`].
fn bounded(values: &[f32]) -> bool {
    values.iter().all(|v| v.abs() <= SOFT_TOKEN_LIMIT)
}

/// `k` rows of the node from its row `row0` on: viewed in place in host memory, else copied into
/// `buf` (then `true`).
fn read<'n, N: LayerRows>(node: &'n N, buf: &'n mut Vec<f32>, row0: usize, k: usize, d: usize) -> Result<(&'n [f32], bool), N::Error> {
    if let Some(view) = node.host_rows(row0, k) {
        return Ok((view?, false));
    }
    buf.resize(k * d, 0.0);
    node.read_rows(row0, &mut buf[..])?;
    Ok((&buf[..], true))
}

impl Ctx<'_> {
    /// Counts a copy of the node's rows (a round trip when the node is not in host memory).
    fn copied<N: LayerRows>(&mut self, node: &N, t0: Instant, read: bool) {
        if !node.is_host() {
            *self.remote_copies += 1;
        }
        if read {
            self.times.read += t0.elapsed();
        } else {
            self.times.write += t0.elapsed();
        }
    }

    /// Batch rows `r0..r1` of segment `s` (number `seg`), node rows from `node_r0` on: the
    /// instruction part is fed, the soft part written.
    fn segment<N: LayerRows>(
        &mut self,
        node: &mut N,
        s: &mut Segment,
        seg: usize,
        r0: usize,
        r1: usize,
        node_r0: usize,
    ) -> Result<(), SegFail> {
        let layer = self.layer;
        let n = s.prefill.n_instr;
        // Sequence positions of these rows; instruction part q0..min(q1, n), soft part max(q0, n)..q1.
        let (q0, q1) = (s.first + r0 - s.row0, s.first + r1 - s.row0);
        if q0 < n {
            self.feed(node, &mut s.prefill, seg, node_r0, q1.min(n) - q0)?;
        }
        let (s0, s1) = (q0.max(n), q1);
        if s0 < s1 {
            let seen = s.prefill.rows_seen(layer);
            if seen != n {
                return Err(SegFail::Seg(HookError::RowsSeen { seg, layer, seen, expected: n }));
            }
            // Node row of soft slot s0.
            let row0 = node_r0 + (s0 - q0);
            self.soft(node, &mut s.prefill, seg, row0, s0 - n, s1 - s0)?;
        }
        Ok(())
    }

    /// Feeds instruction rows `row0..row0 + k` of the node to the segment's state for this layer.
    fn feed<N: LayerRows>(&mut self, node: &mut N, p: &mut Prefill, seg: usize, row0: usize, k: usize) -> Result<(), SegFail> {
        let (layer, d) = (self.layer, self.d);
        match &mut p.pooling {
            Pooling::Cpu { gen, states } => {
                let t0 = Instant::now();
                let (rows, copied) = read(&*node, &mut *self.buf, row0, k, d).map_err(node_err(layer))?;
                let t1 = Instant::now();
                let r = states[layer].feed(gen, rows);
                if let Some(kept) = p.captured.as_mut().and_then(|c| c.get_mut(layer)).filter(|_| r.is_ok()) {
                    kept.extend_from_slice(rows);
                }
                self.times.generate += t1.elapsed();
                if copied {
                    self.copied(&*node, t0, true);
                }
                r.map_err(|source| SegFail::Seg(HookError::Generator { seg, layer, source }))
            }
            Pooling::Gpu { rt, adapter, state } => {
                let gpu_err = |source| SegFail::Seg(HookError::Gpu { seg: Some(seg), layer, source });
                // Whatever happens next may queue work that reads the node.
                self.sync.0 = Some(rt.clone());
                match device::feed_in_place(node, rt, adapter, state, layer, row0, k) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(device::Failure::Node(e)) => return Err(node_err(layer)(e)),
                    Err(device::Failure::Gpu(e)) => return Err(gpu_err(e)),
                }
                let t0 = Instant::now();
                let (rows, copied) = read(&*node, &mut *self.buf, row0, k, d).map_err(node_err(layer))?;
                let r = rt.feed_host(adapter, state, layer, rows);
                if copied {
                    self.copied(&*node, t0, true);
                }
                r.map_err(gpu_err)
            }
        }
    }

    /// Writes soft slots `k0..k0 + k` of the segment to node rows `row0..row0 + k` for this layer:
    /// in place on the device when all m fall in this ubatch and the node lives there, else from
    /// P_l computed on the host (once per layer).
    fn soft<N: LayerRows>(&mut self, node: &mut N, p: &mut Prefill, seg: usize, row0: usize, k0: usize, k: usize) -> Result<(), SegFail> {
        let (layer, d, m) = (self.layer, self.d, p.m);
        if p.soft[layer].is_none() && !p.in_place[layer] {
            let t0 = Instant::now();
            if let Pooling::Gpu { rt, adapter, state } = &mut p.pooling {
                if k0 == 0 && k == m {
                    self.sync.0 = Some(rt.clone());
                    match device::finish_in_place(node, rt, adapter, state, layer, row0, m) {
                        Ok(true) => {
                            self.times.generate += t0.elapsed();
                            p.in_place[layer] = true;
                            return self.check_in_place(node, seg, row0, m);
                        }
                        Ok(false) => {}
                        Err(device::Failure::Node(e)) => return Err(node_err(layer)(e)),
                        Err(device::Failure::Gpu(e)) => return Err(SegFail::Seg(HookError::Gpu { seg: Some(seg), layer, source: e })),
                    }
                }
            }
            let mut out = vec![0.0f32; m * d];
            let r = match &mut p.pooling {
                Pooling::Cpu { gen, states } => {
                    states[layer].finish(gen, &mut out).map_err(|source| SegFail::Seg(HookError::Generator { seg, layer, source }))
                }
                Pooling::Gpu { rt, adapter, state } => rt
                    .finish_host(adapter, state, layer, &mut out)
                    .map_err(|source| SegFail::Seg(HookError::Gpu { seg: Some(seg), layer, source })),
            };
            self.times.generate += t0.elapsed();
            r?;
            if !bounded(&out) {
                return Err(SegFail::Seg(HookError::NonFinite { seg, layer }));
            }
            p.soft[layer] = Some(out);
        }
        let Some(soft) = p.soft[layer].as_ref() else {
            // All m were written in place when the first of them came; a second write is a bug.
            return Err(SegFail::Seg(HookError::RowsMissing { seg, layer, handled: 0, len: k }));
        };
        let t0 = Instant::now();
        node.write_rows(row0, &soft[k0 * d..(k0 + k) * d]).map_err(node_err(layer))?;
        self.copied(&*node, t0, false);
        Ok(())
    }

    /// Checks the m soft rows the GPU wrote in place at `row0` (a copy of m rows, before any
    /// consumer runs); out-of-range values are replaced by zeros, so they never reach the graph.
    fn check_in_place<N: LayerRows>(&mut self, node: &mut N, seg: usize, row0: usize, m: usize) -> Result<(), SegFail> {
        let layer = self.layer;
        self.buf.resize(m * self.d, 0.0);
        node.read_rows(row0, &mut self.buf[..]).map_err(node_err(layer))?;
        if bounded(&self.buf[..]) {
            return Ok(());
        }
        self.buf.iter_mut().for_each(|v| *v = 0.0);
        node.write_rows(row0, &self.buf[..]).map_err(node_err(layer))?;
        Err(SegFail::Seg(HookError::NonFinite { seg, layer }))
    }
}
