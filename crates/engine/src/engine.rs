//! The engine: one llama.cpp context, continuous batching across adapters (see the crate docs).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iapt_format::Adapter;
use iapt_generator_cuda::GpuRuntime;
use iapt_llama::{arch_spec, Batch, Context, ContextParams, EvalCallback, KvType, Model, SamplerChain, SamplerSettings, Token};

use crate::constraint::{Constraint, Vocab};
use crate::error::EngineError;
use crate::output::{logprobs, Pushed, StopMatcher};
use crate::registry::{AdapterCache, AdapterInfo, InsertOptions, Inserted, Prep, Registry, Resident, Unloaded};
use crate::request::{Completion, Event, EventKind, FinishReason, Finished, Request, SeqId, TokenOut, MAX_LOGPROBS};
use iapt_hook::prefix::{self, CacheStats, PrefixCache, Rows, CHECKPOINT};
use iapt_hook::{Claim, HookError, HookTimes, PoolSnapshot, Prefill, Segment, StreamHook};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences running at once (llama.cpp sequence slots); 1..=256.
    pub parallel: usize,
    /// Context budget of one sequence in tokens (prompt + soft tokens + generated); the KV cache
    /// holds `parallel * seq_ctx` cells, so admitted sequences never run out of cells.
    pub seq_ctx: usize,
    /// Tokens one step decodes at most (decode tokens first, then prefill chunks); >= `parallel`.
    pub batch_tokens: usize,
    /// A step in which a prompt's prefill completes ends right after that prompt once it holds at
    /// least this many rows (decode tokens included), instead of filling up to `batch_tokens` with
    /// other prompts' chunks: that prompt's first token is not held back by work that gains
    /// little from riding in the same step (short prefills, such as prefix-cache hits, complete
    /// one after another instead of in bursts of a full step). Long prompts, which complete
    /// rarely, still run in full steps. 0: steps always fill up to `batch_tokens`.
    pub min_step_rows: usize,
    /// llama.cpp's physical micro-batch size.
    pub n_ubatch: usize,
    /// Requests that may wait for a slot; more are refused with [`EngineError::QueueFull`].
    pub queue_capacity: usize,
    /// llama.cpp threads (0: its default).
    pub n_threads: i32,
    /// KV cache element type.
    pub kv_type: KvType,
    /// Flash attention (`None`: llama.cpp's choice).
    pub flash_attn: Option<bool>,
    /// One KV cache shared by all sequences (`true`), or one stream of `seq_ctx` cells per
    /// sequence (`false`, the default, as llama-server's): a decoding sequence's attention then
    /// reads its own cells only, not every running sequence's.
    pub kv_unified: bool,
    /// Threads of each CPU generator call.
    pub generator_threads: usize,
    /// Bounds on the resident adapters (least recently used evicted first; default unbounded).
    pub adapter_cache: AdapterCache,
    /// Run the adapters' generators on this GPU runtime (adapters with more soft tokens than the
    /// kernels take stay on the CPU); `None`: on the CPU. Nodes in the runtime's device memory
    /// are read and written in place; others go through host copies.
    pub gpu: Option<Arc<GpuRuntime>>,
    /// Bytes the prefix cache may hold (`crate::prefix`: instruction KV shared by every tenant,
    /// and each adapter's pooling of it); 0 turns it off.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            parallel: 4,
            seq_ctx: 1024,
            batch_tokens: 512,
            min_step_rows: 128,
            n_ubatch: 512,
            queue_capacity: 256,
            n_threads: 0,
            kv_type: KvType::F16,
            flash_attn: None,
            kv_unified: false,
            generator_threads: 1,
            adapter_cache: AdapterCache::default(),
            gpu: None,
            prefix_cache_bytes: 0,
        }
    }
}

impl EngineConfig {
    fn check(&self) -> Result<(), EngineError> {
        let bad = |detail: String| Err(EngineError::Config { detail });
        if !(1..=256).contains(&self.parallel) {
            return bad(format!("parallel = {}: must be 1..=256 (llama.cpp's sequence limit)", self.parallel));
        }
        if self.batch_tokens < self.parallel {
            return bad(format!(
                "batch_tokens = {} must be >= parallel = {} (one decode token per running sequence)",
                self.batch_tokens, self.parallel
            ));
        }
        if !self.kv_unified && self.n_ubatch < self.parallel {
            return bad(format!(
                "n_ubatch = {} must be >= parallel = {} with one KV stream per sequence (a ubatch may hold a row of each), or use a unified KV cache",
                self.n_ubatch, self.parallel
            ));
        }
        if self.seq_ctx < 2 || self.n_ubatch == 0 || self.queue_capacity == 0 {
            return bad("seq_ctx must be >= 2, n_ubatch and queue_capacity >= 1".to_owned());
        }
        if u32::try_from(self.seq_ctx.saturating_mul(self.parallel)).is_err() || u32::try_from(self.batch_tokens).is_err() {
            return bad("seq_ctx x parallel and batch_tokens must fit in u32".to_owned());
        }
        Ok(())
    }
}

/// Counters since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Steps that decoded something.
    pub steps: u64,
    /// Prompt rows decoded (instruction and soft slots).
    pub prefill_rows: u64,
    /// Tokens generated (sampled).
    pub generated: u64,
    /// Steps with decode tokens only (no prefill rows), their tokens and wall time: the aggregate
    /// decode throughput is `decode_only_tokens / decode_only_time`.
    pub decode_only_steps: u64,
    /// See `decode_only_steps`.
    pub decode_only_tokens: u64,
    /// See `decode_only_steps`.
    pub decode_only_time: Duration,
    /// Of `decode_only_time`: inside llama.cpp's `llama_decode` (the graph); the rest is the
    /// engine's own (filling the batch, sampling, stop rules, events).
    pub decode_only_llama_time: Duration,
    /// Wall time of all steps.
    pub step_time: Duration,
    /// The prefix cache's counters.
    pub cache: CacheStats,
}

/// A queued request, validated.
struct Pending {
    id: SeqId,
    req: Request,
    gen: Option<Resident>,
    chain: SamplerChain,
    /// Choices 1.. ([`Request::n`]): their ids and sampler chains.
    forks: Vec<(SeqId, SamplerChain)>,
    /// The structured-output matcher ([`Request::structured`]), copied for each choice.
    constraint: Option<Constraint>,
}

/// A running sequence in its slot.
struct Seq {
    id: SeqId,
    prompt: Vec<Token>,
    n_soft: usize,
    /// Rows of the prompt: instruction plus soft slots.
    total: usize,
    /// Positions in the KV cache (prompt rows prefilled, then decoded tokens).
    done: usize,
    /// The pooling state while prefilling with an adapter.
    prefill: Option<Prefill>,
    /// The last sampled token, to decode next.
    next: Option<Token>,
    chain: SamplerChain,
    stop: StopMatcher,
    generated: usize,
    max_tokens: usize,
    stop_at_eog: bool,
    logprobs: Option<usize>,
    /// Keep each token's logits row ([`Request::logits`]).
    keep_logits: bool,
    /// The adapter's name, for errors that concern it.
    adapter: Option<String>,
    /// Wall time of the steps that held this sequence's prefill rows, and of those that held
    /// its decode tokens.
    prefill_time: Duration,
    decode_time: Duration,
    /// Admission order (prefill chunks are scheduled oldest first).
    admitted: u64,
    /// The slots of the choices waiting for this sequence's prefill ([`Request::n`]).
    forks: Vec<usize>,
    /// A choice waiting for another slot's prefill: it takes no part in a step until then.
    waits: bool,
    /// Its structured-output matcher.
    constraint: Option<Constraint>,
    /// Prompt tokens reused from the prefix cache.
    cached: usize,
    /// Pooling snapshots taken at checkpoints, for the prefix cache.
    snaps: Vec<PoolSnapshot>,
    /// When its prefill keeps its input rows for the prefix cache: the cached runs of rows
    /// `0..cached` its entry starts with, and the bytes it will keep.
    capture: Option<(Vec<Arc<Rows>>, usize)>,
}

/// What one step put in the batch for one slot.
struct Planned {
    slot: usize,
    rows: usize,
    /// Batch row whose logits give the next token, if any.
    out_row: Option<usize>,
}

/// The multi-tenant engine over one model and one llama.cpp context (see the crate docs). All
/// calls run on the caller's thread; [`crate::EngineHandle`] runs one on its own thread.
pub struct Engine<'m> {
    model: &'m Model,
    ctx: Context<'m>,
    hook: Option<Arc<StreamHook>>,
    registry: Registry,
    cfg: EngineConfig,
    batch: Batch,
    slots: Vec<Option<Seq>>,
    queue: VecDeque<Pending>,
    next_id: u64,
    admitted: u64,
    stats: EngineStats,
    /// Steps that decoded something (or tried to), for the failpoints (`crate::fault`).
    step_no: u64,
    /// The vocabulary indexed for structured output, on the first request that asks for it.
    vocab: Option<Vocab>,
    cache: PrefixCache,
}

impl<'m> Engine<'m> {
    /// An engine on `model` with no adapters loaded.
    pub fn new(model: &'m Model, cfg: EngineConfig) -> Result<Engine<'m>, EngineError> {
        cfg.check()?;
        let hook = arch_spec(&model.arch()).map(|a| Arc::new(StreamHook::new(*a, model.n_layer(), model.n_embd())));
        let params = ContextParams {
            n_ctx: (cfg.seq_ctx * cfg.parallel) as u32,
            n_batch: cfg.batch_tokens as u32,
            n_ubatch: cfg.n_ubatch.min(cfg.batch_tokens) as u32,
            n_threads: cfg.n_threads,
            flash_attn: cfg.flash_attn,
            kv_type: cfg.kv_type,
            n_seq_max: cfg.parallel as u32,
            kv_unified: cfg.kv_unified,
        };
        let callback = hook.clone().map(|h| h as Arc<dyn EvalCallback>);
        let ctx = Context::new(model, &params, callback)?;
        Ok(Engine {
            model,
            ctx,
            hook,
            registry: Registry::new(Arc::new(Prep::new(model, cfg.generator_threads, cfg.gpu.clone())), cfg.adapter_cache),
            batch: Batch::new(cfg.batch_tokens),
            slots: (0..cfg.parallel).map(|_| None).collect(),
            queue: VecDeque::new(),
            next_id: 0,
            admitted: 0,
            stats: EngineStats::default(),
            step_no: 0,
            vocab: None,
            cache: PrefixCache::new(cfg.prefix_cache_bytes),
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The base model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Makes `adapter` resident as `name`, after checking it against the base model (evicting
    /// least recently used adapters where [`EngineConfig::adapter_cache`] requires).
    pub fn load_adapter(&mut self, name: &str, adapter: &Adapter) -> Result<AdapterInfo, EngineError> {
        self.load_adapter_with(name, adapter, InsertOptions::default()).map(|i| i.info)
    }

    /// As [`Engine::load_adapter`], pinned or replacing a resident one, saying what was evicted.
    pub fn load_adapter_with(&mut self, name: &str, adapter: &Adapter, opts: InsertOptions) -> Result<Inserted, EngineError> {
        let inserted = self.registry.load(name, adapter, opts)?;
        crate::registry::release_evicted(&inserted);
        Ok(inserted)
    }

    /// Pins `name` (never evicted) or unpins it.
    pub fn pin_adapter(&mut self, name: &str, pinned: bool) -> Result<AdapterInfo, EngineError> {
        self.registry.pin(name, pinned)
    }

    /// What preparing an adapter off the engine's thread takes ([`crate::EngineHandle`]).
    pub(crate) fn adapter_prep(&self) -> Arc<Prep> {
        self.registry.prep()
    }

    /// Makes an adapter prepared elsewhere resident as `name`.
    pub(crate) fn insert_adapter(&mut self, name: &str, resident: Resident, opts: InsertOptions) -> Result<Inserted, EngineError> {
        self.registry.insert(name, resident, opts)
    }

    /// Opens an adapter file (either container; validated against the spec) and loads it as `name`.
    pub fn load_adapter_file(&mut self, name: &str, path: &Path) -> Result<AdapterInfo, EngineError> {
        let adapter = Adapter::open(path).map_err(|e| EngineError::AdapterFile { path: path.to_owned(), detail: e.to_string() })?;
        self.load_adapter(name, &adapter)
    }

    /// Unloads `name`: at once when unused, else deferred until its last user ends (see [`Unloaded`]).
    pub fn unload_adapter(&mut self, name: &str) -> Result<Unloaded, EngineError> {
        self.registry.unload(name)
    }

    /// The resident adapters, by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.registry.list()
    }

    /// Counters since the engine started.
    pub fn stats(&self) -> EngineStats {
        EngineStats { cache: self.cache.stats.clone(), ..self.stats.clone() }
    }

    /// Where the injection hook's time went in the last step that held prefill rows of a sequence
    /// with an adapter (zeros before any).
    pub fn hook_times(&self) -> HookTimes {
        self.hook.as_ref().map(|h| h.times()).unwrap_or_default()
    }

    /// Row copies of nodes outside host memory in that step (with layers on RPC workers: round trips).
    pub fn hook_remote_copies(&self) -> usize {
        self.hook.as_ref().map_or(0, |h| h.remote_copies())
    }

    /// The graph nodes the hook claimed in that step, in order (for tests and diagnostics).
    pub fn hook_claims(&self) -> Vec<Claim> {
        self.hook.as_ref().map(|h| h.claims()).unwrap_or_default()
    }

    /// Requests running (in a slot).
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Nothing running and nothing queued.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running() == 0
    }

    /// KV cells in the context (llama.cpp may round `parallel * seq_ctx` up).
    pub fn kv_cells(&self) -> usize {
        self.ctx.n_ctx()
    }

    /// KV cells held by running sequences, as llama.cpp's cache reports them (positions 0..=max).
    pub fn cells_in_use(&self) -> usize {
        (0..self.slots.len()).filter_map(|s| self.ctx.seq_pos_max(s as i32)).map(|p| p as usize + 1).sum()
    }

    /// Validates `req` and queues it. Every bad input is refused here with its own error.
    pub fn submit(&mut self, req: Request) -> Result<SeqId, EngineError> {
        let gen = req.adapter.as_deref().map(|n| self.registry.get(n)).transpose()?;
        let n_vocab = self.model.n_vocab();
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&token) = req.prompt.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(EngineError::TokenOutOfVocab { token, n_vocab });
        }
        if req.max_tokens == 0 {
            return Err(EngineError::MaxTokensZero);
        }
        let n_soft = gen.as_ref().map_or(0, |g| g.n_soft_tokens());
        if req.prompt.len().saturating_add(n_soft).saturating_add(req.max_tokens) > self.cfg.seq_ctx {
            return Err(EngineError::TooLong { n_prompt: req.prompt.len(), n_soft, max_tokens: req.max_tokens, seq_ctx: self.cfg.seq_ctx });
        }
        if let Some(n) = req.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(EngineError::TooManyLogprobs { n, max: MAX_LOGPROBS });
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::EmptyStop);
        }
        if req.n == 0 || req.n > self.cfg.parallel {
            return Err(EngineError::TooManyChoices { n: req.n, parallel: self.cfg.parallel });
        }
        if self.queue.len() >= self.cfg.queue_capacity {
            return Err(EngineError::QueueFull { capacity: self.cfg.queue_capacity });
        }
        let mut chains = (0..req.n)
            .map(|i| {
                let settings = SamplerSettings { seed: req.sampling.seed.wrapping_add(i as u32), ..req.sampling.clone() };
                let mut chain = SamplerChain::new(n_vocab, &settings)?;
                // As llama-server does: the penalties see the prompt.
                for &t in &req.prompt {
                    chain.accept(t)?;
                }
                Ok(chain)
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let constraint = match &req.structured {
            Some(what) => {
                if self.vocab.is_none() {
                    self.vocab = Some(Vocab::new(self.model)?);
                }
                Some(self.vocab.as_ref().expect("indexed above").matcher(what)?)
            }
            None => None,
        };
        let id = SeqId(self.next_id);
        self.next_id += req.n as u64;
        let forks = chains.drain(1..).enumerate().map(|(i, c)| (SeqId(id.0 + 1 + i as u64), c)).collect();
        let chain = chains.pop().expect("n >= 1 chains");
        self.queue.push_back(Pending { id, req, gen, chain, forks, constraint });
        Ok(id)
    }

    /// Cancels a queued or running request: it is dropped and its KV cells are freed at once. No
    /// event follows. `false` when the id is not queued or running (already finished, unknown).
    /// Choices share their first choice's prefill: cancelling a queued request, or a first choice
    /// still in prefill, cancels the choices waiting for it too.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.queue.iter().position(|p| p.id == id || p.forks.iter().any(|(f, _)| *f == id)) {
            let p = &mut self.queue[i];
            if p.id == id {
                self.queue.remove(i);
            } else {
                // The first choice keeps its place; one waiting choice fewer.
                p.forks.retain(|(f, _)| *f != id);
            }
            return true;
        }
        match self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id)) {
            Some(slot) => {
                let forks = self.free(slot).map(|s| s.forks).unwrap_or_default();
                for f in forks {
                    self.free(f);
                }
                true
            }
            None => false,
        }
    }

    /// Empties slot `slot` and frees its KV cells; a choice waiting for it is told to stop waiting
    /// for it (see [`Engine::fail`] for the choices of a failed prefill).
    fn free(&mut self, slot: usize) -> Option<Seq> {
        self.ctx.seq_rm(slot as i32);
        let s = self.slots[slot].take()?;
        for p in self.slots.iter_mut().flatten() {
            p.forks.retain(|&f| f != slot);
        }
        Some(s)
    }

    /// Moves queued requests into free slots, oldest first (a request of n choices waits until n
    /// slots are free); a request whose pooling state cannot be made (device memory) fails.
    fn admit(&mut self) -> Vec<Event> {
        let mut failed = Vec::new();
        loop {
            let free: Vec<usize> = self.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i).collect();
            match self.queue.front() {
                Some(p) if p.forks.len() < free.len() => {}
                _ => break,
            }
            let Some(p) = self.queue.pop_front() else { break };
            let n_soft = p.gen.as_ref().map_or(0, |g| g.n_soft_tokens());
            let (cached, restored, cached_runs) = self.restore(free[0], &p);
            let prefill = match restored.map(Ok).or_else(|| p.gen.as_ref().map(|g| g.begin(p.req.prompt.len()))).transpose() {
                Ok(prefill) => prefill,
                Err(error) => {
                    let detail = error.to_string();
                    failed.push(Event { id: p.id, kind: EventKind::Failed(error) });
                    let shared = |id| Event { id, kind: EventKind::Failed(EngineError::SharedPrefillFailed { detail: detail.clone() }) };
                    failed.extend(p.forks.iter().map(|(id, _)| shared(*id)));
                    continue;
                }
            };
            self.admitted += 1;
            let mut prefill = prefill;
            let capture = self.capture(&mut prefill, p.req.prompt.len(), cached, cached_runs);
            let seq = |id, chain, prefill, constraint, req: &Request, admitted| Seq {
                id,
                n_soft,
                total: req.prompt.len() + n_soft,
                done: cached,
                prefill,
                next: None,
                chain,
                stop: StopMatcher::new(&req.stop),
                generated: 0,
                max_tokens: req.max_tokens,
                stop_at_eog: req.stop_at_eog,
                logprobs: req.logprobs,
                keep_logits: req.logits,
                adapter: req.adapter.clone(),
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
                admitted,
                prompt: req.prompt.clone(),
                forks: Vec::new(),
                waits: false,
                constraint,
                cached,
                snaps: Vec::new(),
                capture: None,
            };
            let fork_slots = free[1..1 + p.forks.len()].to_vec();
            for ((id, chain), &slot) in p.forks.into_iter().zip(&fork_slots) {
                let constraint = p.constraint.as_ref().map(Constraint::fork);
                self.slots[slot] = Some(Seq { waits: true, ..seq(id, chain, None, constraint, &p.req, self.admitted) });
            }
            self.slots[free[0]] =
                Some(Seq { forks: fork_slots, capture, ..seq(p.id, p.chain, prefill, p.constraint, &p.req, self.admitted) });
        }
        failed
    }

    /// Loads what the prefix cache holds for `p` into slot `slot`: the prompt tokens reused, with
    /// an adapter its pooling after them (from a snapshot, or pooled now from the cached input
    /// rows), and the input runs of those rows when the cache has them. `(0, None, None)` (a cold
    /// start, the slot left empty) when nothing fits or llama.cpp cannot load the copy.
    fn restore(&mut self, slot: usize, p: &Pending) -> (usize, Option<Prefill>, Option<Vec<Arc<Rows>>>) {
        let cold = (0, None, None);
        let key = p.gen.as_ref().map(|g| g.pool_key());
        let Some(hit) = self.cache.lookup(&p.req.prompt, key) else { return cold };
        let n_instr = p.req.prompt.len();
        let prefill = match &p.gen {
            None => None,
            // Its own snapshot, then the input rows another prefill left: pooled now, no forward
            // pass.
            Some(g) => match hit.resume(|snap| snap.map_or_else(|| g.begin(n_instr).ok(), |s| g.begin_from(n_instr, s))) {
                Some(prefill) => Some(prefill),
                None => return cold,
            },
        };
        let (reuse, runs) = (hit.reuse, hit.inputs);
        if !self.ctx.set_seq_state(slot as i32, hit.payload) || !self.ctx.seq_rm_from(slot as i32, reuse as i32) {
            self.ctx.seq_rm(slot as i32);
            return cold;
        }
        (reuse, prefill, runs)
    }

    /// Whether a prefill keeps its input rows for the prefix cache: with the cache on, an adapter
    /// pooled on the CPU, the rows before `cached` known to the cache (`runs`), and the rows that
    /// prefills in flight keep within half the cache. Returns what its entry will start with.
    fn capture(
        &self,
        prefill: &mut Option<Prefill>,
        n_instr: usize,
        cached: usize,
        runs: Option<Vec<Arc<Rows>>>,
    ) -> Option<(Vec<Arc<Rows>>, usize)> {
        let base = match runs {
            Some(r) => r,
            None if cached == 0 => Vec::new(),
            None => return None,
        };
        let bytes = self.model.n_layer() * (n_instr - cached) * self.model.n_embd() * 4;
        let kept: usize = self.slots.iter().flatten().filter_map(|s| s.capture.as_ref()).map(|(_, b)| b).sum();
        if !self.cache.may_capture(kept, bytes) {
            return None;
        }
        let capturing = prefill.as_mut().is_some_and(Prefill::capture_inputs);
        capturing.then_some((base, bytes))
    }

    /// Runs one step: admits queued requests, then one decode with every running sequence's next
    /// token and prefill chunks up to the token budget, then samples. Returns what happened; an
    /// empty list when idle. A failing sequence is reported as [`EventKind::Failed`] and dropped;
    /// the engine stays usable.
    pub fn step(&mut self) -> Vec<Event> {
        let t0 = Instant::now();
        let mut events = self.admit();
        let plan = match self.fill_batch() {
            Ok(p) => p,
            Err(e) => {
                events.extend(self.fail_all(&[], &e.to_string()));
                return events;
            }
        };
        if plan.is_empty() {
            return events;
        }
        let prefill_rows: usize =
            plan.iter().filter(|p| self.slots[p.slot].as_ref().is_some_and(|s| s.next.is_none())).map(|p| p.rows).sum();
        let (segs, seg_slots) = self.lend_prefills(&plan);
        let armed = !segs.is_empty();
        if let (Some(h), true) = (&self.hook, armed) {
            h.arm(segs, self.ctx.split(&self.batch));
        }
        self.step_no += 1;
        if crate::fault::hit("panic", self.step_no) {
            panic!("failpoint panic@{}", self.step_no);
        }
        let t_decode = Instant::now();
        let res = match crate::fault::hit("decode", self.step_no) {
            true => Err(iapt_llama::LlamaError::Decode { code: -1, detail: format!("failpoint decode@{}", self.step_no) }),
            false => self.ctx.decode(&self.batch),
        };
        let llama_time = t_decode.elapsed();
        if armed {
            events.extend(self.take_back(&seg_slots));
        }
        if let Err(e) = res {
            events.extend(self.recover(&plan, &e.to_string()));
            return events;
        }
        let dt = t0.elapsed();
        for p in &plan {
            if let Some(s) = self.slots[p.slot].as_mut() {
                if s.next.is_some() {
                    s.decode_time += dt;
                } else {
                    s.prefill_time += dt;
                }
            }
        }
        for p in &plan {
            events.extend(self.advance(p));
        }
        // The whole step, sampling and events included.
        let step_dt = t0.elapsed();
        self.stats.steps += 1;
        self.stats.step_time += step_dt;
        self.stats.prefill_rows += prefill_rows as u64;
        if prefill_rows == 0 {
            self.stats.decode_only_steps += 1;
            self.stats.decode_only_tokens += plan.len() as u64;
            self.stats.decode_only_time += step_dt;
            self.stats.decode_only_llama_time += llama_time;
        }
        events
    }

    /// Runs one request to its end on an idle engine: submits it, steps until it is done, calls
    /// `on_token` with each token as soon as it is sampled, and returns every token and how it
    /// ended (a single request is a batch of one: `iapt run`, `eval`, `demo`). Fails with
    /// [`EngineError::Busy`] when other requests are queued or running, and with the request's
    /// own error when it is refused or fails.
    pub fn complete(&mut self, req: Request, on_token: &mut dyn FnMut(&TokenOut)) -> Result<Completion, EngineError> {
        if !self.is_idle() {
            return Err(EngineError::Busy { running: self.running(), queued: self.queued() });
        }
        let id = self.submit(req)?;
        let mut tokens = Vec::new();
        loop {
            for ev in self.step() {
                debug_assert_eq!(ev.id, id, "an idle engine runs only this request");
                match ev.kind {
                    EventKind::Token(t) => {
                        on_token(&t);
                        tokens.push(t);
                    }
                    EventKind::Done(finished) => return Ok(Completion { tokens, finished }),
                    EventKind::Failed(e) => return Err(e),
                }
            }
        }
    }

    /// Steps until nothing is running or queued, passing every event to `on_event`.
    pub fn run_until_idle(&mut self, on_event: &mut dyn FnMut(Event)) {
        while !self.is_idle() {
            for e in self.step() {
                on_event(e);
            }
        }
    }

    /// Fills the batch: decode tokens first (one per sequence that has one), then prefill chunks,
    /// oldest admission first, within the token budget.
    fn fill_batch(&mut self) -> Result<Vec<Planned>, EngineError> {
        self.batch.clear();
        let mut plan = Vec::new();
        for (slot, s) in self.slots.iter().enumerate() {
            if let Some((s, tok)) = s.as_ref().and_then(|s| s.next.map(|t| (s, t))) {
                self.batch.push_seq(tok, s.done as i32, slot as i32, true)?;
                plan.push(Planned { slot, rows: 1, out_row: Some(self.batch.len() - 1) });
            }
        }
        let mut order: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| s.done < s.total && !s.waits).map(|s| (s.admitted, i)))
            .collect();
        order.sort_unstable();
        for (_, slot) in order {
            let budget = self.cfg.batch_tokens - self.batch.len();
            if budget == 0 {
                break;
            }
            let s = self.slots[slot].as_ref().expect("listed above");
            let mut k = (s.total - s.done).min(budget);
            // With the prefix cache, an adapter's prefill chunk ends at each checkpoint of its
            // instruction, where its pooling is copied (`advance`).
            let next_cp = (s.done / CHECKPOINT + 1) * CHECKPOINT;
            if self.cache.enabled() && s.prefill.is_some() && next_cp < s.prompt.len() {
                k = k.min(next_cp - s.done);
            }
            for p in s.done..s.done + k {
                // Soft slots get a placeholder id: their rows are replaced at every layer, layer 0 included.
                let tok = s.prompt.get(p).copied().unwrap_or(s.prompt[0]);
                self.batch.push_seq(tok, p as i32, slot as i32, p + 1 == s.total)?;
            }
            let out_row = (s.done + k == s.total).then(|| self.batch.len() - 1);
            plan.push(Planned { slot, rows: k, out_row });
            // A prompt's last rows are in: its first token comes at the end of this step, so the
            // step ends here once it is large enough (`EngineConfig::min_step_rows`).
            if out_row.is_some() && self.cfg.min_step_rows > 0 && self.batch.len() >= self.cfg.min_step_rows {
                break;
            }
        }
        Ok(plan)
    }

    /// Lends the pooling state of every planned prefill chunk with an adapter to the hook.
    fn lend_prefills(&mut self, plan: &[Planned]) -> (Vec<Segment>, Vec<usize>) {
        let (mut segs, mut slots) = (Vec::new(), Vec::new());
        let mut row0 = 0;
        for p in plan {
            let s = self.slots[p.slot].as_mut().expect("planned slots are running");
            if s.next.is_none() {
                if let Some(prefill) = s.prefill.take() {
                    segs.push(Segment { row0, first: s.done, len: p.rows, prefill });
                    slots.push(p.slot);
                }
            }
            row0 += p.rows;
        }
        (segs, slots)
    }

    /// Disarms the hook and gives the lent pooling states back to their sequences. An error of
    /// one segment (its adapter overflowed, its generator failed) fails that sequence alone; an
    /// error of the whole decode fails every sequence that had a segment in it (their prefill
    /// cannot be trusted), never the decode tokens of the others.
    fn take_back(&mut self, seg_slots: &[usize]) -> Vec<Event> {
        let Some(h) = self.hook.clone() else { return Vec::new() };
        let (states, res) = h.finish();
        for (&slot, st) in seg_slots.iter().zip(states) {
            if let Some(s) = self.slots[slot].as_mut() {
                s.prefill = Some(st);
            }
        }
        let Err(errors) = res else { return Vec::new() };
        let mut failed: Vec<(usize, EngineError)> = Vec::new();
        let (own, whole): (Vec<HookError>, Vec<HookError>) = errors.into_iter().partition(|e| e.segment().is_some());
        for e in own {
            let Some(&slot) = e.segment().and_then(|i| seg_slots.get(i)) else { continue };
            if failed.iter().all(|(s, _)| *s != slot) {
                let adapter = self.slots[slot].as_ref().and_then(|s| s.adapter.clone()).unwrap_or_default();
                failed.push((slot, EngineError::AdapterFailed { adapter, reason: adapter_reason(&e) }));
            }
        }
        if !whole.is_empty() {
            let detail = whole.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            for &slot in seg_slots {
                if failed.iter().all(|(s, _)| *s != slot) {
                    failed.push((slot, EngineError::Injection { detail: detail.clone() }));
                }
            }
        }
        failed.into_iter().flat_map(|(slot, e)| self.fail(slot, e)).collect()
    }

    /// After a successful decode: moves the slot's positions on and samples where it has logits.
    /// A prefill that ends hands its KV cells to the choices waiting for it, which draw their first
    /// token from the same logits row.
    fn advance(&mut self, p: &Planned) -> Vec<Event> {
        let Some(s) = self.slots[p.slot].as_mut() else { return Vec::new() };
        let prefilling = s.done < s.total;
        s.done += p.rows;
        s.next = None;
        let mut forks = Vec::new();
        let caching = self.cache.enabled();
        if caching && prefilling && PrefixCache::is_checkpoint(s.done, s.prompt.len()) {
            if let Some(snap) = s.prefill.as_ref().and_then(Prefill::snapshot) {
                s.snaps.push(snap);
            }
        }
        if prefilling && s.done >= s.total {
            // The instruction's KV, its pooling at the end and its input rows, for later requests
            // (with the cache off, no copy of the pooling is made).
            if let Some(snap) = s.prefill.as_ref().filter(|_| caching).and_then(Prefill::snapshot) {
                s.snaps.push(snap);
            }
            let kept = s.prefill.as_mut().and_then(Prefill::take_inputs);
            s.prefill = None;
            forks = std::mem::take(&mut s.forks);
            if caching {
                let (tokens, snaps) = (s.prompt.clone(), std::mem::take(&mut s.snaps));
                let inputs = match (s.capture.take(), kept) {
                    (Some((mut runs, _)), Some(rows)) => {
                        runs.extend(prefix::runs(s.cached, self.model.n_embd(), rows));
                        runs
                    }
                    _ => Vec::new(),
                };
                // A prompt reused whole whose entry is cached: its KV is there already (no copy of
                // the sequence's KV again), only this adapter's pooling may be new.
                let reused_whole = s.cached == tokens.len() && self.cache.holds(&tokens);
                if reused_whole {
                    self.cache.add_pooling(&tokens, snaps);
                } else if let Some(kv) = self.ctx.seq_state(p.slot as i32) {
                    self.cache.store(tokens, kv, snaps, inputs);
                }
            }
        }
        let Some(s) = self.slots[p.slot].as_mut() else { return Vec::new() };
        let (done, prefill_time, cached) = (s.done, s.prefill_time, s.cached);
        let Some(row) = p.out_row else { return Vec::new() };
        let mut events = Vec::new();
        for f in forks {
            if !self.ctx.seq_cp(p.slot as i32, f as i32) {
                let detail = format!("llama.cpp could not copy sequence {} to {f}", p.slot);
                events.extend(self.fail(f, EngineError::SharedPrefillFailed { detail }));
                continue;
            }
            if let Some(c) = self.slots[f].as_mut() {
                c.waits = false;
                c.done = done;
                c.prefill_time = prefill_time;
                c.cached = cached;
            }
            events.extend(self.sample(f, row));
        }
        events.extend(self.sample(p.slot, row));
        events
    }

    /// Samples slot `slot`'s next token from batch row `row` and applies the stop rules.
    fn sample(&mut self, slot: usize, row: usize) -> Vec<Event> {
        let s = self.slots[slot].as_mut().expect("sampled slots are running");
        let id = s.id;
        let Some(logits) = self.ctx.logits(row) else {
            return self.fail(slot, EngineError::DecodeFailed { detail: format!("no logits for batch row {row}") });
        };
        let drawn = match s.constraint.as_mut() {
            None => s.chain.sample(logits),
            Some(c) => match c.masked(logits) {
                Ok(masked) => s.chain.sample(&masked),
                Err(detail) => return self.fail(slot, EngineError::Constraint { detail }),
            },
        };
        let token = match drawn {
            Ok(Some(t)) => t,
            Ok(None) => return self.fail(slot, EngineError::NothingSampled),
            Err(e) => return self.fail(slot, EngineError::Llama(e)),
        };
        // A complete document takes no more tokens: the one drawn then is end-of-sequence.
        if let Some(c) = s.constraint.as_mut().filter(|c| !c.is_done()) {
            if let Err(detail) = c.accept(token) {
                return self.fail(slot, EngineError::Constraint { detail });
            }
        }
        // A complete document ends the answer, whatever `stop_at_eog` says.
        let document_done = s.constraint.as_ref().is_some_and(Constraint::is_done);
        if (s.stop_at_eog || document_done) && self.model.is_eog(token) {
            // Bytes held back as a possible start of a stop string are output after all.
            let tail = s.stop.flush();
            return self.finish(slot, FinishReason::Eog, tail);
        }
        let (logprob, top_logprobs) = match s.logprobs {
            Some(n) => {
                let (lp, top) = logprobs(logits, token, n);
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };
        let kept = s.keep_logits.then(|| logits.to_vec());
        s.generated += 1;
        self.stats.generated += 1;
        match s.stop.push(&self.model.token_bytes(token)) {
            Pushed::Stop(text, index) => self.finish(slot, FinishReason::Stop { index }, text),
            Pushed::Release(text) => {
                let mut events = vec![Event { id, kind: EventKind::Token(TokenOut { token, text, logprob, top_logprobs, logits: kept }) }];
                if s.generated >= s.max_tokens {
                    let tail = s.stop.flush();
                    events.extend(self.finish(slot, FinishReason::Length, tail));
                } else {
                    s.next = Some(token);
                }
                events
            }
        }
    }

    fn finish(&mut self, slot: usize, reason: FinishReason, text: Vec<u8>) -> Vec<Event> {
        let Some(s) = self.free(slot) else { return Vec::new() };
        let done = Finished {
            reason,
            text,
            n_prompt: s.prompt.len(),
            n_soft: s.n_soft,
            n_generated: s.generated,
            n_cached: s.cached,
            prefill_time: s.prefill_time,
            decode_time: s.decode_time,
        };
        vec![Event { id: s.id, kind: EventKind::Done(done) }]
    }

    /// Fails slot `slot`'s sequence, and the choices waiting for its prefill
    /// ([`EngineError::SharedPrefillFailed`]).
    fn fail(&mut self, slot: usize, error: EngineError) -> Vec<Event> {
        let Some(s) = self.free(slot) else { return Vec::new() };
        let detail = error.to_string();
        let mut events = vec![Event { id: s.id, kind: EventKind::Failed(error) }];
        for f in s.forks {
            if let Some(c) = self.free(f) {
                events.push(Event { id: c.id, kind: EventKind::Failed(EngineError::SharedPrefillFailed { detail: detail.clone() }) });
            }
        }
        events
    }

    /// After a failed decode: the sequences that had prefill rows in it fail (the new input is what
    /// a decode of running sequences did not have before); the ones that only decoded a token are
    /// kept, their cells at and after the failed position removed, and retried in the next step.
    /// A decode of decode tokens alone that fails fails them all (nothing new to blame).
    fn recover(&mut self, plan: &[Planned], detail: &str) -> Vec<Event> {
        let prefilling = |s: &Seq| s.next.is_none();
        let blamed: Vec<usize> = plan.iter().filter(|p| self.slots[p.slot].as_ref().is_some_and(prefilling)).map(|p| p.slot).collect();
        if blamed.is_empty() {
            return self.fail_all(plan, detail);
        }
        for p in plan.iter().filter(|p| !blamed.contains(&p.slot)) {
            if let Some(s) = self.slots[p.slot].as_ref() {
                let done = s.done as i32;
                self.ctx.seq_rm_from(p.slot as i32, done);
            }
        }
        blamed.into_iter().flat_map(|slot| self.fail(slot, EngineError::DecodeFailed { detail: detail.to_owned() })).collect()
    }

    /// Fails every sequence of `plan` (all running ones when empty) after a failed decode.
    fn fail_all(&mut self, plan: &[Planned], detail: &str) -> Vec<Event> {
        let slots: Vec<usize> = if plan.is_empty() { (0..self.slots.len()).collect() } else { plan.iter().map(|p| p.slot).collect() };
        slots.into_iter().flat_map(|slot| self.fail(slot, EngineError::DecodeFailed { detail: detail.to_owned() })).collect()
    }
}

/// What a segment's own hook error says about its adapter, for the request's error (no internals).
fn adapter_reason(e: &HookError) -> String {
    match e {
        HookError::NonFinite { .. } => {
            "its soft tokens overflow (NaN, infinite or beyond 1e15) on this prompt: the adapter's weights are out of range".to_owned()
        }
        HookError::Generator { source, .. } => format!("its generator failed: {source}"),
        HookError::Gpu { source, .. } => format!("its GPU generator failed: {source}"),
        other => other.to_string(),
    }
}
