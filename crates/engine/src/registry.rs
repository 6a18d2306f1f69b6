//! The registry of resident adapters by name. Each adapter's generator is built once, on the CPU
//! or, when the engine has a GPU runtime, uploaded to it (layer-shared tensors held once either
//! way), and shared through an `Arc`: a sequence or a queued request that uses an adapter holds a
//! clone, so unloading takes the name out of the registry at once and the memory goes when the
//! last user ends. Nothing can use freed weights.
//!
//! **A bounded resident set** ([`AdapterCache`]): with a cap on the number of adapters and/or
//! their bytes, making one more resident first evicts the least recently used ones that are
//! neither pinned nor in use. "In use" is a queued request or a sequence in prefill: a sequence
//! lends its adapter's generator only until its prompt is prefilled (after that its adapter lives
//! in its KV cache), so an adapter whose sequences all decode is evictable and its memory is freed
//! at once (and returned to the operating system by `release_evicted`, called by whoever asked for
//! the load, never on the engine's thread). When nothing can be evicted the new adapter is refused ([`EngineError::AdapterCacheFull`]) and
//! nothing changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use iapt_format::{Adapter, BaseModelInfo, Code};
use iapt_generator::Generator;
use iapt_generator_cuda::{GpuAdapter, GpuRuntime, GPU_MAX_SOFT_TOKENS};
use iapt_llama::Model;

use crate::error::EngineError;
use iapt_hook::{PoolKey, PoolSnapshot, Prefill};

/// A resident adapter's generator, where it runs.
#[derive(Clone)]
pub(crate) enum Resident {
    Cpu(Arc<Generator>),
    Gpu(Arc<GpuRuntime>, Arc<GpuAdapter>),
}

impl Resident {
    pub fn n_soft_tokens(&self) -> usize {
        match self {
            Resident::Cpu(g) => g.n_soft_tokens(),
            Resident::Gpu(_, a) => a.n_soft_tokens(),
        }
    }

    /// A fresh pooling state for a prompt of `n_instr` instruction tokens.
    pub fn begin(&self, n_instr: usize) -> Result<Prefill, EngineError> {
        Ok(match self {
            Resident::Cpu(g) => Prefill::cpu(g.clone(), n_instr),
            Resident::Gpu(rt, a) => Prefill::gpu(rt.clone(), a.clone(), n_instr)?,
        })
    }

    /// A prefill that starts from a pooling snapshot of this very generator (the prefix cache);
    /// `None` for a snapshot of another generator, or when a GPU state cannot be loaded.
    pub fn begin_from(&self, n_instr: usize, snap: &PoolSnapshot) -> Option<Prefill> {
        match self {
            Resident::Cpu(g) => Prefill::cpu_from(g.clone(), n_instr, snap),
            Resident::Gpu(rt, a) => Prefill::gpu_from(rt.clone(), a.clone(), n_instr, snap),
        }
    }

    /// The key of its pooling snapshots.
    pub fn pool_key(&self) -> PoolKey {
        match self {
            Resident::Cpu(g) => PoolKey::Cpu(g.id()),
            Resident::Gpu(_, a) => PoolKey::Gpu(a.id()),
        }
    }

    /// Bytes of weights (host memory as stored for the CPU, device memory for the GPU) and whether on the GPU.
    fn memory(&self) -> (usize, bool) {
        match self {
            Resident::Cpu(g) => (g.weight_bytes(), false),
            Resident::Gpu(_, a) => (a.device_bytes(), true),
        }
    }

    /// Requests using it: the `Arc`s beyond the registry's own.
    fn users(&self) -> usize {
        match self {
            Resident::Cpu(g) => Arc::strong_count(g) - 1,
            Resident::Gpu(_, a) => Arc::strong_count(a) - 1,
        }
    }
}

/// Bounds on the resident adapters (see the module documentation); `None`: unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterCache {
    /// Adapters resident at once.
    pub max_resident: Option<usize>,
    /// Bytes of their weights (as [`AdapterInfo::bytes`] counts them).
    pub max_bytes: Option<usize>,
}

/// How [`crate::Engine::load_adapter_with`] and [`crate::EngineHandle::load_adapter_parsed`] make an adapter resident.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertOptions {
    /// Never evicted (an unload still removes it).
    pub pinned: bool,
    /// Replace a resident adapter of the same name (its requests keep the old one), instead of
    /// refusing with [`EngineError::AdapterExists`].
    pub replace: bool,
}

/// What making an adapter resident did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// The adapter now resident.
    pub info: AdapterInfo,
    /// The adapters evicted to make room, least recently used first.
    pub evicted: Vec<String>,
}

/// What the registry reports about a resident adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// The adapter's name.
    pub name: String,
    /// Soft tokens it adds after the instruction (m).
    pub n_soft_tokens: usize,
    /// Bytes of its generator's weights in memory (host, W_down and W_up as stored, on the CPU;
    /// device memory on the GPU;
    /// layer-shared tensors counted once).
    pub bytes: usize,
    /// Whether its generator runs on the engine's GPU runtime.
    pub on_gpu: bool,
    /// Queued requests and sequences in prefill that use it.
    pub users: usize,
    /// Never evicted to make room for another.
    pub pinned: bool,
}

/// What [`crate::Engine::unload_adapter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unloaded {
    /// Unused: its memory is freed.
    Freed,
    /// In use: the name is gone (new requests cannot use it) and the memory is freed when the last
    /// of these users ends.
    Deferred {
        /// Queued and running requests still using it.
        users: usize,
    },
}

/// What it takes to make an adapter resident, without the registry: the base model's shape and
/// where generators run. Shared with [`crate::EngineHandle`], which prepares adapters on the
/// caller's thread so that parsing and converting weights never stall the engine's decode loop.
pub(crate) struct Prep {
    base: BaseModelInfo,
    generator_threads: usize,
    gpu: Option<Arc<GpuRuntime>>,
    /// Whether the injection hook supports the base model's architecture.
    supported: bool,
}

const MAX_NAME: usize = 128;

/// Whether `name` is a valid adapter name (1 to [`MAX_NAME`] characters of `A-Za-z0-9._-`).
fn check_name(name: &str) -> Result<(), EngineError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(valid_char) {
        return Err(EngineError::BadAdapterName { name: name.to_owned() });
    }
    Ok(())
}

impl Prep {
    pub fn new(model: &Model, generator_threads: usize, gpu: Option<Arc<GpuRuntime>>) -> Prep {
        let base = BaseModelInfo { arch: model.arch(), n_layer: model.n_layer() as u32, n_embd: model.n_embd() as u32 };
        let supported = iapt_llama::arch_spec(&base.arch).is_some();
        Prep { base, generator_threads: generator_threads.max(1), gpu, supported }
    }

    /// Checks the name and `adapter` against the base model and builds its generator (on the GPU
    /// runtime when there is one and the kernels take its m, else on the CPU).
    pub fn prepare(&self, name: &str, adapter: &Adapter) -> Result<Resident, EngineError> {
        check_name(name)?;
        if !self.supported {
            let detail = format!("the IAPT hook does not support architecture {:?} ({})", self.base.arch, iapt_llama::supported_archs());
            return Err(EngineError::AdapterRejected { name: name.to_owned(), detail });
        }
        // W003: weights beyond +-65504 overflow the generator in f32; refused here, where a tenant's
        // adapter would otherwise fail every request it serves.
        if let Some(f) = adapter.warnings().iter().find(|f| f.code == Code::LargeWeight) {
            return Err(EngineError::AdapterRejected { name: name.to_owned(), detail: f.to_string() });
        }
        let findings = self.base.check(adapter.config());
        if !findings.is_empty() {
            let detail = findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ");
            return Err(EngineError::AdapterRejected { name: name.to_owned(), detail });
        }
        Ok(match &self.gpu {
            Some(rt) if adapter.config().n_soft_tokens as usize <= GPU_MAX_SOFT_TOKENS => {
                Resident::Gpu(rt.clone(), Arc::new(rt.upload(adapter)?))
            }
            _ => Resident::Cpu(Arc::new(Generator::from_adapter(adapter)?.with_threads(self.generator_threads)?)),
        })
    }
}

/// A resident adapter and its cache state.
struct Entry {
    resident: Resident,
    pinned: bool,
    /// [`Registry::tick`] when it was last made resident or used by a request.
    last_used: u64,
}

pub(crate) struct Registry {
    prep: Arc<Prep>,
    adapters: BTreeMap<String, Entry>,
    limits: AdapterCache,
    tick: u64,
}

impl Registry {
    pub fn new(prep: Arc<Prep>, limits: AdapterCache) -> Registry {
        Registry { prep, adapters: BTreeMap::new(), limits, tick: 0 }
    }

    /// What preparing an adapter takes (for [`crate::EngineHandle`]).
    pub fn prep(&self) -> Arc<Prep> {
        self.prep.clone()
    }

    /// Prepares `adapter` (see [`Prep::prepare`]) and makes it resident as `name`.
    pub fn load(&mut self, name: &str, adapter: &Adapter, opts: InsertOptions) -> Result<Inserted, EngineError> {
        if self.adapters.contains_key(name) && !opts.replace {
            return Err(EngineError::AdapterExists { name: name.to_owned() });
        }
        let resident = self.prep.prepare(name, adapter)?;
        self.insert(name, resident, opts)
    }

    /// Makes a prepared adapter resident as `name`, evicting what the limits require.
    pub fn insert(&mut self, name: &str, resident: Resident, opts: InsertOptions) -> Result<Inserted, EngineError> {
        check_name(name)?;
        if self.adapters.contains_key(name) && !opts.replace {
            return Err(EngineError::AdapterExists { name: name.to_owned() });
        }
        let evicted = self.make_room(name, resident.memory().0)?;
        for v in &evicted {
            self.adapters.remove(v);
        }
        // A replaced adapter's requests keep their own `Arc` of it.
        self.tick += 1;
        self.adapters.insert(name.to_owned(), Entry { resident, pinned: opts.pinned, last_used: self.tick });
        Ok(Inserted { info: self.info(name).expect("just inserted"), evicted })
    }

    /// The adapters to evict, least recently used first, so that one more of `bytes` (replacing
    /// `name` if resident) fits the limits; an error, and nothing to evict, when it cannot.
    fn make_room(&self, name: &str, bytes: usize) -> Result<Vec<String>, EngineError> {
        let others = || self.adapters.iter().filter(|(n, _)| n.as_str() != name);
        let (mut count, mut total) = (others().count() + 1, others().map(|(_, e)| e.resident.memory().0).sum::<usize>() + bytes);
        let fits = |count: usize, total: usize| {
            self.limits.max_resident.is_none_or(|m| count <= m) && self.limits.max_bytes.is_none_or(|m| total <= m)
        };
        let mut victims: Vec<(&String, &Entry)> = others().filter(|(_, e)| !e.pinned && e.resident.users() == 0).collect();
        victims.sort_by_key(|(_, e)| e.last_used);
        let mut evicted = Vec::new();
        for (n, e) in victims {
            if fits(count, total) {
                break;
            }
            evicted.push(n.clone());
            count -= 1;
            total -= e.resident.memory().0;
        }
        if !fits(count, total) {
            let limits =
                [self.limits.max_resident.map(|m| format!("{m} adapters")), self.limits.max_bytes.map(|b| format!("{} MiB", b >> 20))];
            let limits = limits.into_iter().flatten().collect::<Vec<_>>().join(" and ");
            return Err(EngineError::AdapterCacheFull {
                name: name.to_owned(),
                detail: format!(
                    "it needs {} MiB and the resident set is limited to {limits}; every other resident adapter is pinned or in use by a prefill",
                    bytes.div_ceil(1 << 20)
                ),
            });
        }
        Ok(evicted)
    }

    /// The generator of `name`, for a new request (which makes it the most recently used).
    pub fn get(&mut self, name: &str) -> Result<Resident, EngineError> {
        self.tick += 1;
        let tick = self.tick;
        match self.adapters.get_mut(name) {
            Some(e) => {
                e.last_used = tick;
                Ok(e.resident.clone())
            }
            None => Err(EngineError::UnknownAdapter { name: name.to_owned(), loaded: self.names() }),
        }
    }

    /// Pins or unpins `name`.
    pub fn pin(&mut self, name: &str, pinned: bool) -> Result<AdapterInfo, EngineError> {
        match self.adapters.get_mut(name) {
            Some(e) => e.pinned = pinned,
            None => return Err(EngineError::UnknownAdapter { name: name.to_owned(), loaded: self.names() }),
        }
        Ok(self.info(name).expect("resident"))
    }

    /// Takes `name` out of the registry (see [`Unloaded`]).
    pub fn unload(&mut self, name: &str) -> Result<Unloaded, EngineError> {
        let e = self.adapters.remove(name).ok_or_else(|| EngineError::UnknownAdapter { name: name.to_owned(), loaded: self.names() })?;
        let users = e.resident.users();
        Ok(if users == 0 { Unloaded::Freed } else { Unloaded::Deferred { users } })
    }

    pub fn info(&self, name: &str) -> Option<AdapterInfo> {
        let e = self.adapters.get(name)?;
        let (bytes, on_gpu) = e.resident.memory();
        Some(AdapterInfo {
            name: name.to_owned(),
            n_soft_tokens: e.resident.n_soft_tokens(),
            bytes,
            on_gpu,
            users: e.resident.users(),
            pinned: e.pinned,
        })
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.adapters.keys().filter_map(|n| self.info(n)).collect()
    }

    fn names(&self) -> String {
        if self.adapters.is_empty() {
            "none".to_owned()
        } else {
            self.adapters.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

/// After a load that evicted adapters: their weights were freed when they left (an evictable
/// adapter has no users); give the pages back to the operating system (glibc keeps freed memory in
/// the arena of the thread that allocated it). Called on the loading thread, so a decode step
/// never waits on it.
pub(crate) fn release_evicted(inserted: &Inserted) {
    if !inserted.evicted.is_empty() {
        iapt_llama::release_freed_heap_memory();
    }
}
