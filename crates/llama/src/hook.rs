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

use crate::arch::ArchSpec;
use crate::error::LlamaError;
use crate::ffi::gpu::{GpuAdapter, GpuRuntime, GpuSeqState};
use crate::ffi::{EvalCallback, NodeData, NodeInfo};
use crate::GpuError;

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
    errors: Vec<String>,
    claims: Vec<Claim>,
    buf: Vec<f32>,
    /// Device states of finished decodes, by adapter index, for reuse.
    gpu_pool: Vec<(usize, GpuSeqState)>,
    /// Wall time spent handling claimed nodes (reading, generating, writing) in the last armed decode.
    busy: Duration,
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
                busy: Duration::ZERO,
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
                    return Err(LlamaError::Hook {
                        messages: vec![format!("sequence {i}: no adapter {a} (the hook holds {})", self.adapters.len())],
                    });
                }
            }
            if s.row0 != next || s.n_instr == 0 {
                return Err(LlamaError::Hook {
                    messages: vec![format!(
                        "sequence {i}: starts at row {} with {} instruction rows; expected a non-empty instruction at row {next}",
                        s.row0, s.n_instr
                    )],
                });
            }
            next = s.row0 + s.n_instr + self.soft_tokens_of(s.adapter);
        }
        if next > plan.batch_len || plan.n_ubatch == 0 {
            return Err(LlamaError::Hook { messages: vec![format!("the sequences need {next} rows; the batch has {}", plan.batch_len)] });
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
        inner.busy = Duration::ZERO;
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
        let l = self.n_layer;
        let mut inner = self.lock();
        self.live.store(false, Ordering::SeqCst);
        let Some(a) = inner.armed.take() else {
            return Err(LlamaError::Hook { messages: vec!["the hook was not armed".to_owned()] });
        };
        let mut errors = std::mem::take(&mut inner.errors);
        if !a.failed {
            match a.ubatch {
                None => errors.push(format!(
                    "node {:?} (layer 0 input) never appeared in the graph: this llama.cpp names its nodes differently",
                    self.arch.layer0_node
                )),
                Some((_, start, len)) => {
                    if start + len != a.plan.batch_len {
                        errors.push(format!("saw ubatches covering {} of {} batch rows", start + len, a.plan.batch_len));
                    }
                    if a.next_layer != l {
                        errors.push(format!(
                            "node {:?} (layer {} input) never appeared in the last ubatch",
                            self.arch.layer_input_node(a.next_layer),
                            a.next_layer
                        ));
                    }
                }
            }
            for (i, s) in a.seqs.iter().enumerate() {
                if let Some(layer) = s.written.iter().position(|&w| w != s.m) {
                    errors.push(format!("sequence {i}, layer {layer}: {} of {} soft rows written", s.written[layer], s.m));
                }
            }
        }
        Self::recycle(&mut inner.gpu_pool, a);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LlamaError::Hook { messages: errors })
        }
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
        self.lock().busy
    }

    /// The nodes claimed during the last armed decode, in order.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().claims.clone()
    }

    /// Handles one claimed node; errors are returned to be recorded.
    fn handle(&self, inner: &mut Inner, node: &NodeData<'_>, layer: usize) -> Result<(), String> {
        let n_layer = self.n_layer;
        let d = self.n_embd;
        let Inner { armed, claims, buf, .. } = inner;
        let Some(a) = armed.as_mut() else { return Ok(()) };
        if a.failed {
            return Ok(());
        }
        let ne = node.ne();
        let rows = ne[1].max(0) as usize;
        if layer == 0 {
            // A new ubatch starts.
            let (idx, start) = match a.ubatch {
                None => (0, 0),
                Some((i, s, len)) => {
                    if a.next_layer != n_layer {
                        return Err(format!("ubatch {i}: layer {} input never appeared before the next ubatch", a.next_layer));
                    }
                    (i + 1, s + len)
                }
            };
            if start >= a.plan.batch_len {
                return Err(format!("a ubatch beyond the planned batch of {} rows", a.plan.batch_len));
            }
            let want = a.plan.n_ubatch.min(a.plan.batch_len - start);
            if rows != want {
                return Err(format!(
                    "ubatch {idx} has {rows} rows but the plan expects {want} (batch {}, n_ubatch {}): llama.cpp split the batch differently",
                    a.plan.batch_len, a.plan.n_ubatch
                ));
            }
            a.ubatch = Some((idx, start, rows));
            a.next_layer = 0;
        }
        let Some((idx, start, len)) = a.ubatch else {
            return Err(format!("layer {layer} input seen before layer 0 input"));
        };
        if layer != a.next_layer {
            return Err(format!("ubatch {idx}: layer {layer} input seen when layer {} was expected", a.next_layer));
        }
        a.next_layer = layer + 1;
        let on_device = match &self.gpu {
            Some(rt) => node.gpu_rows(rt.is_emulated(), 0, 0)?.is_some(),
            None => false,
        };
        claims.push(Claim { ubatch: idx, layer, node: node.name().to_owned(), rows, on_device });
        if ne[0] as usize != d || rows != len || ne[2] != 1 || ne[3] != 1 {
            return Err(format!("node {} has shape {:?}, expected [{d}, {len}, 1, 1]", node.name(), ne));
        }
        let end = start + len;
        let mut queued = false;
        for (si, s) in a.seqs.iter_mut().enumerate() {
            let at = |e: &dyn std::fmt::Display| format!("sequence {si}, layer {layer}: {e}");
            let (row0, n, m) = (s.plan.row0, s.plan.n_instr, s.m);
            let (i0, i1) = (start.max(row0), end.min(row0 + n));
            let (s0, s1) = (start.max(row0 + n), end.min(row0 + n + m));
            match (&s.generator, s.gpu.as_mut(), self.gpu.as_deref()) {
                (None, ..) => {}
                (Some(HookAdapter::Cpu(g)), ..) => {
                    // This sequence's instruction rows in this ubatch: stream them into the layer's state.
                    if i0 < i1 {
                        let k = (i1 - i0) * d;
                        buf.resize(k, 0.0);
                        node.read_rows(i0 - start, &mut buf[..k])?;
                        s.states[layer].feed(g, &buf[..k]).map_err(|e| at(&e))?;
                    }
                    // Its soft rows in this ubatch: finish the layer's state once, then write the rows here.
                    if s0 < s1 && s.soft[layer].is_none() {
                        if s.states[layer].rows_seen() != n {
                            return Err(at(&format!("{} instruction rows seen, expected {n}", s.states[layer].rows_seen())));
                        }
                        let mut p = vec![0.0f32; m * d];
                        s.states[layer].finish(g, &mut p).map_err(|e| at(&e))?;
                        s.soft[layer] = Some(p);
                    }
                }
                (Some(HookAdapter::Gpu(g)), Some(st), Some(rt)) => {
                    let emulated = rt.is_emulated();
                    if i0 < i1 {
                        let fed = match node.gpu_rows(emulated, i0 - start, i1 - i0)? {
                            Some(rows) => match rt.feed_device(g, st, layer, rows) {
                                // Memory of another device (a model split over GPUs): go through the host.
                                Err(GpuError::WrongDevice { .. } | GpuError::NotDeviceMemory { .. }) => false,
                                r => r.map(|()| true).map_err(|e| at(&e))?,
                            },
                            None => false,
                        };
                        if !fed {
                            let k = (i1 - i0) * d;
                            buf.resize(k, 0.0);
                            node.read_rows(i0 - start, &mut buf[..k])?;
                            rt.feed_host(g, st, layer, &buf[..k]).map_err(|e| at(&e))?;
                        }
                        queued = true;
                    }
                    if s0 < s1 && s.soft[layer].is_none() && s.written[layer] == 0 {
                        if st.rows_seen(layer) != n {
                            return Err(at(&format!("{} instruction rows seen, expected {n}", st.rows_seen(layer))));
                        }
                        // All m soft rows in this ubatch and in device memory: written in place.
                        if s1 - s0 == m {
                            if let Some(dst) = node.gpu_rows_mut(emulated, s0 - start, m)? {
                                match rt.finish_device(g, st, layer, dst) {
                                    Err(GpuError::WrongDevice { .. } | GpuError::NotDeviceMemory { .. }) => {}
                                    r => {
                                        r.map_err(|e| at(&e))?;
                                        s.written[layer] = m;
                                        queued = false;
                                        continue;
                                    }
                                }
                            }
                        }
                        // Otherwise (host memory, or soft rows split over ubatches): through the host.
                        let mut p = vec![0.0f32; m * d];
                        rt.finish_host(g, st, layer, &mut p).map_err(|e| at(&e))?;
                        queued = false;
                        s.soft[layer] = Some(p);
                    }
                }
                (Some(HookAdapter::Gpu(_)), ..) => return Err(at(&"a GPU adapter without a device state")),
            }
            if s0 < s1 {
                if let Some(p) = s.soft[layer].as_ref() {
                    let first = s0 - (row0 + n);
                    node.write_rows(s0 - start, &p[first * d..(first + s1 - s0) * d])?;
                    s.written[layer] += s1 - s0;
                }
            }
        }
        if queued {
            // Queued reads of this node must end before llama.cpp runs its consumers.
            if let Some(rt) = &self.gpu {
                rt.synchronize().map_err(|e| format!("layer {layer}: {e}"))?;
            }
        }
        Ok(())
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

    fn on_data(&self, node: &NodeData<'_>) {
        let Some(layer) = self.arch.layer_of(node.name(), self.n_layer) else { return };
        let t0 = Instant::now();
        let mut inner = self.lock();
        let res = self.handle(&mut inner, node, layer);
        inner.busy += t0.elapsed();
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
