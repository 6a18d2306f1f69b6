//! The injection hook: an [`EvalCallback`] that, while armed with a [`Plan`] for one decode, claims
//! the residual-stream node entering every layer, streams each sequence's instruction rows into
//! that sequence's generator and overwrites its soft-token rows with P_l before layer l runs.
//!
//! One decode may hold several sequences ([`SeqPlan`]), each laid out contiguously in the batch
//! (instruction, then its m soft slots) and each with its own adapter out of the hook's resident
//! set (or none). Several adapters therefore share one base model and one forward pass.
//!
//! Where each adapter's generator runs is a [`HookAdapter`]: on the CPU (hidden-state rows copied
//! out of the node through ggml's backend API, soft rows copied back), or on a [`GpuRuntime`]. On
//! the GPU, when the node lives in the runtime's device memory (llama.cpp's CUDA backend with the
//! layers offloaded), the kernels read the instruction rows and write the soft rows in place in
//! llama.cpp's tensor: no host round trip of hidden states. A node in host memory (e.g. the token
//! embeddings, computed on the CPU) is uploaded first. Before the callback returns, the runtime's
//! stream is synchronised, so llama.cpp's next node sees the soft rows.
//!
//! The callback does not see llama.cpp's ubatches, so the hook follows them: with a unified KV
//! cache llama.cpp splits a batch into contiguous ubatches of `n_ubatch` tokens in batch order
//! (`split_simple`), each computing layers 0..L in order. Layer 0's node starts a new ubatch; its
//! row count (`ne[1]`) must be the planned ubatch length, or the hook records an error and stops
//! touching the graph. Errors cannot abort a decode from inside the callback, so they are collected
//! and reported by [`IaptHook::finish`] after `llama_decode` returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iapt_generator::{Generator, LayerState};
use iapt_generator_cuda::{GpuAdapter, GpuError, GpuRuntime, GpuSeqState};

use crate::error::{HookError, LlamaError};
use crate::ffi::{EvalCallback, NodeData, NodeInfo};
use iapt_hook::ArchSpec;

/// One resident adapter of a hook and where its generator runs.
#[derive(Debug, Clone)]
pub enum HookAdapter {
    /// The CPU generator.
    Cpu(Arc<Generator>),
    /// Weights resident on the hook's [`GpuRuntime`].
    Gpu(Arc<GpuAdapter>),
}

impl HookAdapter {
    fn shape(&self) -> (usize, usize, usize) {
        match self {
            HookAdapter::Cpu(g) => (g.n_layer(), g.n_embd(), g.n_soft_tokens()),
            HookAdapter::Gpu(g) => (g.n_layer(), g.n_embd(), g.n_soft_tokens()),
        }
    }
}

/// One sequence of a decode: its instruction starts at batch row `row0` and is followed by the
/// soft slots of its adapter (none without an adapter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqPlan {
    /// Index of the sequence's adapter in the hook's set, or `None` for the plain base model.
    pub adapter: Option<usize>,
    /// Batch row of the first instruction token.
    pub row0: usize,
    /// Instruction rows n.
    pub n_instr: usize,
}

/// What the next decode contains: the sequences, in batch order, without gaps or overlaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The sequences.
    pub seqs: Vec<SeqPlan>,
    /// Tokens in the batch.
    pub batch_len: usize,
    /// The context's `n_ubatch`.
    pub n_ubatch: usize,
}

impl Plan {
    /// One sequence with adapter 0: the instruction at rows `0..n_instr`, the soft slots after it.
    pub fn single(n_instr: usize, batch_len: usize, n_ubatch: usize) -> Plan {
        Plan { seqs: vec![SeqPlan { adapter: Some(0), row0: 0, n_instr }], batch_len, n_ubatch }
    }
}

/// One claimed node, for tests and diagnostics.
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
    /// Whether the node lives where the hook's GPU runtime computes (device memory; host memory
    /// for the emulator), so that GPU adapters read and write its rows in place.
    pub on_device: bool,
}

/// One sequence while armed.
struct SeqRun {
    plan: SeqPlan,
    /// The adapter's generator (None: the sequence runs without adapter).
    generator: Option<HookAdapter>,
    m: usize,
    /// CPU streaming states, one per layer (CPU adapters).
    states: Vec<LayerState>,
    /// The device state (GPU adapters).
    gpu: Option<GpuSeqState>,
    soft: Vec<Option<Vec<f32>>>,
    /// Soft rows written per layer.
    written: Vec<usize>,
}

struct Armed {
    plan: Plan,
    seqs: Vec<SeqRun>,
    /// Current ubatch index, start row and length (None before the first layer-0 node).
    ubatch: Option<(usize, usize, usize)>,
    /// Next layer expected within the current ubatch.
    next_layer: usize,
    failed: bool,
}

struct Inner {
    armed: Option<Armed>,
    errors: Vec<HookError>,
    claims: Vec<Claim>,
    buf: Vec<f32>,
    /// Device states of finished decodes, by adapter index, for reuse.
    gpu_pool: Vec<(usize, GpuSeqState)>,
    /// Where the time handling claimed nodes went in the last armed decode.
    times: HookTimes,
    /// Row copies (reads and writes) through the backend API of nodes outside host memory (a GPU
    /// without the zero-copy path, an RPC worker: one round trip each) in the last armed decode.
    remote_copies: usize,
}

/// The IAPT injection hook for one context, holding a resident set of adapters.
pub struct IaptHook {
    arch: ArchSpec,
    n_layer: usize,
    n_embd: usize,
    adapters: Vec<HookAdapter>,
    gpu: Option<Arc<GpuRuntime>>,
    /// Whether a decode is armed and not failed: read first by `wants`, which llama.cpp calls for
    /// every node of every graph, so that a disarmed hook (every decode step) costs one atomic load.
    live: AtomicBool,
    inner: Mutex<Inner>,
}

impl IaptHook {
    /// A hook for a model of `arch` with one adapter (index 0).
    pub fn new(arch: ArchSpec, generator: Generator) -> IaptHook {
        let (n_layer, n_embd) = (generator.n_layer(), generator.n_embd());
        IaptHook::build(arch, n_layer, n_embd, vec![HookAdapter::Cpu(Arc::new(generator))], None)
    }

    /// A hook for a model of `arch` (`n_layer` layers of width `n_embd`) with a resident set of
    /// adapters, addressed by their index in `adapters`; GPU adapters run on `gpu`, which must be
    /// the runtime they were uploaded to. Fails if an adapter has another shape, or a GPU adapter
    /// comes without a runtime.
    pub fn with_adapters(
        arch: ArchSpec,
        n_layer: usize,
        n_embd: usize,
        adapters: Vec<HookAdapter>,
        gpu: Option<Arc<GpuRuntime>>,
    ) -> Result<IaptHook, LlamaError> {
        for (i, a) in adapters.iter().enumerate() {
            let (l, d, _) = a.shape();
            if l != n_layer || d != n_embd {
                return Err(LlamaError::Incompatible {
                    detail: format!("adapter {i} has {l} layers of width {d}, the model {n_layer} layers of width {n_embd}"),
                });
            }
            if matches!(a, HookAdapter::Gpu(_)) && gpu.is_none() {
                return Err(LlamaError::Gpu(GpuError::Unsupported {
                    detail: format!("adapter {i} is on a GPU but the hook has no GPU runtime"),
                }));
            }
        }
        Ok(IaptHook::build(arch, n_layer, n_embd, adapters, gpu))
    }

    fn build(arch: ArchSpec, n_layer: usize, n_embd: usize, adapters: Vec<HookAdapter>, gpu: Option<Arc<GpuRuntime>>) -> IaptHook {
        IaptHook {
            arch,
            n_layer,
            n_embd,
            adapters,
            gpu,
            live: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                armed: None,
                errors: Vec::new(),
                claims: Vec::new(),
                buf: Vec::new(),
                gpu_pool: Vec::new(),
                times: HookTimes::default(),
                remote_copies: 0,
            }),
        }
    }

    /// Number of resident adapters.
    pub fn n_adapters(&self) -> usize {
        self.adapters.len()
    }

    /// Where each resident adapter runs.
    pub fn adapters(&self) -> &[HookAdapter] {
        &self.adapters
    }

    /// Soft tokens of adapter `adapter` (m), 0 for `None` or an unknown index.
    pub fn soft_tokens_of(&self, adapter: Option<usize>) -> usize {
        adapter.and_then(|i| self.adapters.get(i)).map_or(0, |a| a.shape().2)
    }

    /// Soft tokens of adapter 0 (m), 0 without adapters.
    pub fn n_soft_tokens(&self) -> usize {
        self.soft_tokens_of(Some(0))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means an earlier callback panicked; the state is reset on arm.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `plan` lays its sequences out in batch order without gaps or overlaps, within
    /// the batch, with known adapters.
    fn check_plan(&self, plan: &Plan) -> Result<(), LlamaError> {
        let mut next = 0usize;
        for (i, s) in plan.seqs.iter().enumerate() {
            if let Some(a) = s.adapter {
                if a >= self.adapters.len() {
                    let e = HookError::NoSuchAdapter { seq: i, adapter: a, n_adapters: self.adapters.len() };
                    return Err(LlamaError::Hook { errors: vec![e] });
                }
            }
            if s.row0 != next || s.n_instr == 0 {
                let e = HookError::PlanLayout { seq: i, row0: s.row0, n_instr: s.n_instr, expected_row0: next };
                return Err(LlamaError::Hook { errors: vec![e] });
            }
            next = s.row0 + s.n_instr + self.soft_tokens_of(s.adapter);
        }
        if next > plan.batch_len || plan.n_ubatch == 0 {
            let e = HookError::PlanTooLong { needed: next, batch_len: plan.batch_len, n_ubatch: plan.n_ubatch };
            return Err(LlamaError::Hook { errors: vec![e] });
        }
        Ok(())
    }

    /// Arms the hook for the next decode. Fails (without arming) on an inconsistent plan or when
    /// a device state cannot be allocated.
    pub fn arm(&self, plan: Plan) -> Result<(), LlamaError> {
        self.check_plan(&plan)?;
        let l = self.n_layer;
        let mut inner = self.lock();
        // Device states of an earlier decode that was never finished go back to the pool.
        if let Some(old) = inner.armed.take() {
            Self::recycle(&mut inner.gpu_pool, old);
        }
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        for s in &plan.seqs {
            let generator = s.adapter.map(|a| self.adapters[a].clone());
            let mut run = SeqRun {
                plan: *s,
                m: generator.as_ref().map_or(0, |g| g.shape().2),
                states: Vec::new(),
                gpu: None,
                soft: vec![None; l],
                written: vec![0; l],
                generator: None,
            };
            match &generator {
                Some(HookAdapter::Cpu(g)) => run.states = (0..l).map(|i| g.begin(i)).collect(),
                Some(HookAdapter::Gpu(g)) => {
                    let rt = self.gpu.as_ref().expect("checked in with_adapters");
                    let idx = s.adapter.expect("a generator comes from an adapter index");
                    let st = match inner.gpu_pool.iter().position(|(a, _)| *a == idx) {
                        Some(p) => {
                            let mut st = inner.gpu_pool.swap_remove(p).1;
                            rt.reset(&mut st)?;
                            st
                        }
                        None => rt.new_state(g)?,
                    };
                    run.gpu = Some(st);
                }
                None => {}
            }
            run.generator = generator;
            seqs.push(run);
        }
        inner.errors.clear();
        inner.claims.clear();
        inner.times = HookTimes::default();
        inner.remote_copies = 0;
        inner.armed = Some(Armed { plan, seqs, ubatch: None, next_layer: 0, failed: false });
        self.live.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Puts the device states of a disarmed decode back into the pool.
    fn recycle(pool: &mut Vec<(usize, GpuSeqState)>, armed: Armed) {
        for s in armed.seqs {
            if let (Some(a), Some(st)) = (s.plan.adapter, s.gpu) {
                pool.push((a, st));
            }
        }
    }

    /// Disarms the hook and reports what happened: `Ok` only if every ubatch of the planned batch
    /// was seen, every layer's input node was found in every ubatch, and all m soft rows of every
    /// sequence with an adapter were written at every layer.
    pub fn finish(&self) -> Result<(), LlamaError> {
        let mut inner = self.lock();
        self.live.store(false, Ordering::SeqCst);
        let Some(a) = inner.armed.take() else {
            return Err(LlamaError::Hook { errors: vec![HookError::NotArmed] });
        };
        let mut errors = std::mem::take(&mut inner.errors);
        if !a.failed {
            errors.extend(self.coverage_errors(&a));
        }
        Self::recycle(&mut inner.gpu_pool, a);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LlamaError::Hook { errors })
        }
    }

    /// What a decode that raised no error still missed: ubatches, layers, soft rows.
    fn coverage_errors(&self, a: &Armed) -> Vec<HookError> {
        let mut errors = Vec::new();
        match a.ubatch {
            None => errors.push(HookError::Layer0Missing { node: self.arch.layer0_node.to_owned() }),
            Some((idx, start, len)) => {
                if start + len != a.plan.batch_len {
                    errors.push(HookError::UbatchesIncomplete { covered: start + len, batch_len: a.plan.batch_len });
                }
                if a.next_layer != self.n_layer {
                    let layer = a.next_layer;
                    errors.push(HookError::LayerMissing { ubatch: idx, node: self.arch.layer_input_node(layer), layer });
                }
            }
        }
        for (seq, s) in a.seqs.iter().enumerate() {
            if let Some(layer) = s.written.iter().position(|&w| w != s.m) {
                errors.push(HookError::SoftRowsMissing { seq, layer, written: s.written[layer], m: s.m });
            }
        }
        errors
    }

    /// Disarms without checking (after a failed decode).
    pub fn disarm(&self) {
        let mut inner = self.lock();
        self.live.store(false, Ordering::SeqCst);
        if let Some(a) = inner.armed.take() {
            Self::recycle(&mut inner.gpu_pool, a);
        }
    }

    /// Wall time the hook spent in the data phase of the last armed decode (reading the instruction
    /// rows, running the generator, writing the soft rows): the cost IAPT adds to a prefill.
    pub fn busy_time(&self) -> Duration {
        self.lock().times.total
    }

    /// The hook's time in the last armed decode, split into reading rows, generating and writing.
    pub fn times(&self) -> HookTimes {
        self.lock().times
    }

    /// Row copies through the backend API of nodes that are not in host memory during the last
    /// armed decode: with the model's layers on an RPC worker, one network round trip each.
    pub fn remote_copies(&self) -> usize {
        self.lock().remote_copies
    }

    /// The nodes claimed during the last armed decode, in order.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().claims.clone()
    }

    /// Handles one claimed node: follows the ubatches, records the claim, then lets every
    /// sequence with an adapter stream its instruction rows and write its soft rows. Any GPU work
    /// still reading the node is waited for before this returns, on every path (see [`SyncOnExit`]).
    fn handle(&self, inner: &mut Inner, node: &mut NodeData<'_>, layer: usize) -> Result<(), HookError> {
        let Inner { armed, claims, buf, remote_copies, times, .. } = inner;
        let Some(a) = armed.as_mut() else { return Ok(()) };
        if a.failed {
            return Ok(());
        }
        let rows = node.ne()[1].max(0) as usize;
        let (idx, start, len) = self.follow_ubatch(a, layer, rows)?;
        let on_device = match &self.gpu {
            Some(rt) => node.gpu_rows(rt.is_emulated(), 0, 0).map_err(|source| HookError::Node { layer, source })?.is_some(),
            None => false,
        };
        claims.push(Claim { ubatch: idx, layer, node: node.name().to_owned(), rows, on_device });
        let ne = node.ne();
        if ne[0] as usize != self.n_embd || rows != len || ne[2] != 1 || ne[3] != 1 {
            return Err(HookError::NodeShape { node: node.name().to_owned(), ne, n_embd: self.n_embd, rows: len });
        }
        let sync = SyncOnExit(self.gpu.as_deref());
        let ub = Ubatch { start, end: start + len };
        for (seq, s) in a.seqs.iter_mut().enumerate() {
            let mut step =
                SeqStep { seq, layer, ub, node: &mut *node, buf: &mut *buf, remote_copies: &mut *remote_copies, times: &mut *times };
            match (s.generator.clone(), self.gpu.as_deref()) {
                (None, _) => continue,
                (Some(HookAdapter::Cpu(g)), _) => step.cpu(&g, s)?,
                (Some(HookAdapter::Gpu(g)), Some(rt)) => step.gpu(rt, &g, s)?,
                (Some(HookAdapter::Gpu(_)), None) => unreachable!("`with_adapters` refuses GPU adapters without a runtime"),
            }
            step.write_soft(s)?;
        }
        sync.done().map_err(|source| HookError::Gpu { seq: None, layer, source })
    }

    /// Follows llama.cpp's ubatches: layer 0's node starts the next one, whose row count must be
    /// the planned one, and layers come in order. Returns the ubatch's index, first row and length.
    fn follow_ubatch(&self, a: &mut Armed, layer: usize, rows: usize) -> Result<(usize, usize, usize), HookError> {
        if layer == 0 {
            let (idx, start) = match a.ubatch {
                None => (0, 0),
                Some((i, s, len)) => {
                    if a.next_layer != self.n_layer {
                        let next = a.next_layer;
                        return Err(HookError::LayerMissing { ubatch: i, node: self.arch.layer_input_node(next), layer: next });
                    }
                    (i + 1, s + len)
                }
            };
            let batch_len = a.plan.batch_len;
            if start >= batch_len {
                return Err(HookError::BeyondBatch { batch_len });
            }
            let want = a.plan.n_ubatch.min(batch_len - start);
            if rows != want {
                return Err(HookError::UbatchRows { ubatch: idx, rows, want, batch_len, n_ubatch: a.plan.n_ubatch });
            }
            a.ubatch = Some((idx, start, rows));
            a.next_layer = 0;
        }
        let Some((idx, start, len)) = a.ubatch else {
            return Err(HookError::LayerOrder { ubatch: None, layer, expected: 0 });
        };
        if layer != a.next_layer {
            return Err(HookError::LayerOrder { ubatch: Some(idx), layer, expected: a.next_layer });
        }
        a.next_layer = layer + 1;
        Ok((idx, start, len))
    }
}

/// Where the hook's time went during one armed decode: copying instruction rows out of nodes not
/// in host memory (in host memory they are read in place, at no cost), running the generator,
/// writing the soft rows; `total` is the whole time inside the callback's data phase, so
/// `total - read - generate - write` is the rest (ubatch tracking, claims, GPU paths' launches
/// and synchronisation outside these three).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HookTimes {
    /// All time in the data phase of claimed nodes.
    pub total: Duration,
    /// Copying instruction rows out of the nodes.
    pub read: Duration,
    /// The CPU generator's feeding and finishing.
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

/// Batch rows `start..end` of the current ubatch.
#[derive(Debug, Clone, Copy)]
struct Ubatch {
    start: usize,
    end: usize,
}

/// One sequence's work on one claimed node.
struct SeqStep<'n, 'd, 'b> {
    seq: usize,
    layer: usize,
    ub: Ubatch,
    node: &'n mut NodeData<'d>,
    buf: &'b mut Vec<f32>,
    remote_copies: &'b mut usize,
    times: &'b mut HookTimes,
}

impl SeqStep<'_, '_, '_> {
    /// The sequence's instruction rows in this ubatch, as batch rows `i0..i1` (empty if none).
    fn instruction(&self, s: &SeqRun) -> (usize, usize) {
        let (row0, n) = (s.plan.row0, s.plan.n_instr);
        (self.ub.start.max(row0), self.ub.end.min(row0 + n))
    }

    /// The sequence's soft rows in this ubatch, as batch rows `s0..s1` (empty if none).
    fn soft(&self, s: &SeqRun) -> (usize, usize) {
        let first = s.plan.row0 + s.plan.n_instr;
        (self.ub.start.max(first), self.ub.end.min(first + s.m))
    }

    /// Counts a row copy of a node outside host memory (a round trip to its device or worker).
    fn count_copy(&mut self) {
        if !self.node.is_host() {
            *self.remote_copies += 1;
        }
    }

    fn node_err(&self) -> impl Fn(crate::error::NodeError) -> HookError {
        let layer = self.layer;
        move |source| HookError::Node { layer, source }
    }

    /// Copies batch rows `i0..i1` of the node into the scratch buffer.
    /// Batch rows `i0..i1` of the node: viewed in place when the node is in host memory (the CPU
    /// backend), else copied into the scratch buffer through the backend API.
    fn read(&mut self, i0: usize, i1: usize, d: usize) -> Result<&[f32], HookError> {
        let (row0, n) = (i0 - self.ub.start, i1 - i0);
        if self.node.rows_in_host_memory() {
            return self.node.host_rows(row0, n).map_err(self.node_err());
        }
        let t0 = Instant::now();
        let k = n * d;
        self.buf.resize(k, 0.0);
        self.node.read_rows(row0, &mut self.buf[..k]).map_err(self.node_err())?;
        self.count_copy();
        self.times.read += t0.elapsed();
        Ok(&self.buf[..k])
    }

    /// CPU generator: streams the instruction rows of this ubatch into the layer's state, and when
    /// the soft rows start here, finishes the layer once into `s.soft`.
    fn cpu(&mut self, g: &Generator, s: &mut SeqRun) -> Result<(), HookError> {
        let (seq, layer) = (self.seq, self.layer);
        let gen_err = |source| HookError::Generator { seq, layer, source };
        let (i0, i1) = self.instruction(s);
        if i0 < i1 {
            let rows = self.read(i0, i1, g.n_embd())?;
            let t0 = Instant::now();
            s.states[layer].feed(g, rows).map_err(gen_err)?;
            self.times.generate += t0.elapsed();
        }
        let (s0, s1) = self.soft(s);
        if s0 < s1 && s.soft[layer].is_none() {
            let seen = s.states[layer].rows_seen();
            if seen != s.plan.n_instr {
                return Err(HookError::RowsSeen { seq, layer, seen, expected: s.plan.n_instr });
            }
            let t0 = Instant::now();
            let mut p = vec![0.0f32; s.m * g.n_embd()];
            s.states[layer].finish(g, &mut p).map_err(gen_err)?;
            s.soft[layer] = Some(p);
            self.times.generate += t0.elapsed();
        }
        Ok(())
    }

    /// GPU generator: feeds the instruction rows in place when the node lives in the runtime's
    /// memory (else through the host); when the soft rows start here, writes all m of them in place
    /// if they are all in this ubatch and in device memory, else finishes into `s.soft`.
    fn gpu(&mut self, rt: &GpuRuntime, g: &GpuAdapter, s: &mut SeqRun) -> Result<(), HookError> {
        let (seq, layer) = (self.seq, self.layer);
        let gpu_err = |source| HookError::Gpu { seq: Some(seq), layer, source };
        let emulated = rt.is_emulated();
        let ((i0, i1), (s0, s1)) = (self.instruction(s), self.soft(s));
        let Some(st) = s.gpu.as_mut() else { unreachable!("`arm` gives every GPU sequence a device state") };
        if i0 < i1 {
            let fed = match self.node.gpu_rows(emulated, i0 - self.ub.start, i1 - i0).map_err(self.node_err())? {
                Some(rows) => match rt.feed_device(g, st, layer, rows) {
                    // Memory of another device (a model split over GPUs): go through the host.
                    Err(GpuError::WrongDevice { .. } | GpuError::NotDeviceMemory { .. }) => false,
                    r => r.map(|()| true).map_err(gpu_err)?,
                },
                None => false,
            };
            if !fed {
                let rows = self.read(i0, i1, g.n_embd())?;
                rt.feed_host(g, st, layer, rows).map_err(gpu_err)?;
            }
        }
        if s0 >= s1 || s.soft[layer].is_some() || s.written[layer] != 0 {
            return Ok(());
        }
        let seen = st.rows_seen(layer);
        if seen != s.plan.n_instr {
            return Err(HookError::RowsSeen { seq, layer, seen, expected: s.plan.n_instr });
        }
        if s1 - s0 == s.m {
            let node_err = self.node_err();
            if let Some(dst) = self.node.gpu_rows_mut(emulated, s0 - self.ub.start, s.m).map_err(node_err)? {
                match rt.finish_device(g, st, layer, dst) {
                    Err(GpuError::WrongDevice { .. } | GpuError::NotDeviceMemory { .. }) => {}
                    r => {
                        r.map_err(gpu_err)?;
                        s.written[layer] = s.m;
                        return Ok(());
                    }
                }
            }
        }
        // Host memory, or soft rows split over ubatches: through the host.
        let mut p = vec![0.0f32; s.m * g.n_embd()];
        rt.finish_host(g, st, layer, &mut p).map_err(gpu_err)?;
        s.soft[layer] = Some(p);
        Ok(())
    }

    /// Writes the sequence's soft rows that fall in this ubatch from `s.soft`, if finished there.
    fn write_soft(&mut self, s: &mut SeqRun) -> Result<(), HookError> {
        let (s0, s1) = self.soft(s);
        let Some(p) = s.soft[self.layer].as_ref().filter(|_| s0 < s1) else { return Ok(()) };
        let d = p.len() / s.m;
        let first = s0 - (s.plan.row0 + s.plan.n_instr);
        let t0 = Instant::now();
        self.node.write_rows(s0 - self.ub.start, &p[first * d..(first + s1 - s0) * d]).map_err(self.node_err())?;
        self.times.write += t0.elapsed();
        self.count_copy();
        s.written[self.layer] += s1 - s0;
        Ok(())
    }
}

/// Waits for the GPU runtime's work that reads llama.cpp's node before the callback returns, on
/// every exit: [`SyncOnExit::done`] on success (reporting a failure), `Drop` on an early error
/// return (the decode has failed already, so a failure there adds nothing). llama.cpp runs the
/// node's consumers as soon as the callback returns, and may then overwrite the rows being read.
struct SyncOnExit<'r>(Option<&'r GpuRuntime>);

impl SyncOnExit<'_> {
    fn done(mut self) -> Result<(), GpuError> {
        match self.0.take() {
            Some(rt) if rt.has_unsynchronized_work() => rt.synchronize(),
            _ => Ok(()),
        }
    }
}

impl Drop for SyncOnExit<'_> {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            let _ = rt.synchronize();
        }
    }
}

impl EvalCallback for IaptHook {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        if !self.live.load(Ordering::SeqCst) {
            return false;
        }
        let inner = self.lock();
        match &inner.armed {
            Some(a) if !a.failed => self.arch.layer_of(node.name(), self.n_layer).is_some(),
            _ => false,
        }
    }

    fn on_data(&self, node: &mut NodeData<'_>) {
        let Some(layer) = self.arch.layer_of(node.name(), self.n_layer) else { return };
        let t0 = Instant::now();
        let mut inner = self.lock();
        let res = self.handle(&mut inner, node, layer);
        inner.times.total += t0.elapsed();
        if let Err(e) = res {
            inner.errors.push(e);
            if let Some(a) = inner.armed.as_mut() {
                // Stop touching the graph: the decode's results are discarded by `finish`.
                a.failed = true;
                self.live.store(false, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use iapt_format::Activation;
    use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};

    use super::*;

    /// Queues a device-row read on `rt` (as the hook does with a node in device memory).
    fn queue_read(rt: &GpuRuntime) -> GpuAdapter {
        let a = random_adapter(&AdapterSpec::small(1, 16, 2, 4, Activation::Gelu), &mut Rng::new(3)).unwrap();
        let ga = rt.upload(&a).unwrap();
        let mut st = rt.new_state(&ga).unwrap();
        let mut rows = rt.alloc_rows(3, 16).unwrap();
        rt.write_rows(&mut rows, 0, &[0.25; 48]).unwrap();
        rt.feed_device(&ga, &mut st, 0, rows.rows(0, 3).unwrap()).unwrap();
        assert!(rt.has_unsynchronized_work());
        ga
    }

    #[test]
    fn sync_guard_waits_on_an_early_return_and_on_success() {
        let rt = GpuRuntime::emulated();
        let early = |rt: &GpuRuntime| -> Result<(), HookError> {
            let _sync = SyncOnExit(Some(rt));
            queue_read(rt);
            Err(HookError::NotArmed)
        };
        assert!(early(&rt).is_err());
        assert!(!rt.has_unsynchronized_work(), "an early return left queued reads of the caller's rows running");
        let sync = SyncOnExit(Some(&rt));
        queue_read(&rt);
        sync.done().unwrap();
        assert!(!rt.has_unsynchronized_work());
    }
}
