//! The prefix cache (issue 30): prompt work that later requests reuse, for every tenant.
//!
//! IAPT's instruction rows never see the soft tokens (spec, Injection, rule 5), so the KV cells of
//! an instruction are the base model's alone, the same whatever adapter follows. An entry holds,
//! for the instruction of a finished prefill:
//! - a copy of its sequence's KV cells (`llama_state_seq_get_data`), loaded into a new sequence
//!   and cut at the shared length (`llama_memory_seq_rm`), whoever asks: one copy serves every
//!   adapter and the base alone;
//! - the adapter's pooling state (its generators' online softmaxes, [`PoolSnapshot`]) at every
//!   checkpoint, every [`CHECKPOINT`] rows and at the end, keyed by the generator's id (unique per
//!   loaded adapter: a replaced file is another generator and never hits an old snapshot).
//!
//! A request reuses the longest prefix of its prompt that an entry holds: all of it for the base
//! alone but the last token (whose logits it needs), and for an adapter up to the latest snapshot
//! of that adapter at or before that length (the pooling must have seen exactly the reused rows).
//! What is reused is copied into the request's sequence at admission, so an entry is never in use
//! afterwards and can be evicted at any time; entries are evicted whole, least recently used first,
//! to stay within [`PrefixCache::max_bytes`]. Exact: the KV bytes and the pooling sums are the
//! ones a cold prefill computes (chunked prefill equals one shot), which the engine's tests check
//! against cold runs to 1e-5. Not built: pooling another adapter over the cached rows (that needs
//! each layer's input rows of the prefix); another adapter reuses the KV only when its own
//! pooling of those rows is cached, else it prefills cold.

use iapt_hook::PoolSnapshot;
use iapt_llama::Token;

/// Pooling snapshots are taken every this many instruction rows (prefill chunks end there).
pub const CHECKPOINT: usize = 256;

/// One cached instruction.
struct Entry {
    tokens: Vec<Token>,
    kv: Vec<u8>,
    /// (generator id, snapshot), snapshots in increasing row order per generator.
    pooled: Vec<(u64, PoolSnapshot)>,
    bytes: usize,
    last_used: u64,
}

/// What a request can reuse.
pub(crate) struct Hit<'a> {
    /// Prompt tokens reused (KV positions kept).
    pub reuse: usize,
    /// The KV copy to load (then cut to `reuse`).
    pub kv: &'a [u8],
    /// The adapter's pooling after exactly `reuse` rows (None for the base alone).
    pub pooled: Option<&'a PoolSnapshot>,
}

/// Counters since the engine started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Requests that reused a cached prefix.
    pub hits: u64,
    /// Requests that found nothing to reuse (with the cache on).
    pub misses: u64,
    /// Prompt tokens reused instead of computed.
    pub tokens_reused: u64,
    /// Entries stored, and evicted.
    pub stored: u64,
    /// See `stored`.
    pub evicted: u64,
    /// Bytes held now, and entries.
    pub bytes: usize,
    /// See `bytes`.
    pub entries: usize,
}

/// The cache (see the module doc); `max_bytes == 0` turns it off.
pub(crate) struct PrefixCache {
    max_bytes: usize,
    entries: Vec<Entry>,
    clock: u64,
    pub stats: CacheStats,
}

impl PrefixCache {
    pub fn new(max_bytes: usize) -> PrefixCache {
        PrefixCache { max_bytes, entries: Vec::new(), clock: 0, stats: CacheStats::default() }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// The best reuse for `prompt` with the adapter whose generator is `gen` (`None`: the base
    /// alone, `Some(None)`: an adapter whose pooling is not cached, on the GPU). Counts a hit or a
    /// miss.
    pub fn lookup(&mut self, prompt: &[Token], gen: Option<Option<u64>>) -> Option<Hit<'_>> {
        if !self.enabled() {
            return None;
        }
        let mut best: Option<(usize, usize, Option<usize>)> = None; // (reuse, entry, snapshot)
        for (e_idx, e) in self.entries.iter().enumerate() {
            let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            let (reuse, snap) = match gen {
                None => (common.min(prompt.len().saturating_sub(1)), None),
                Some(None) => (0, None),
                Some(Some(id)) => {
                    let s =
                        e.pooled.iter().enumerate().filter(|(_, (g, p))| *g == id && p.rows() <= common).max_by_key(|(_, (_, p))| p.rows());
                    match s {
                        Some((i, (_, p))) => (p.rows(), Some(i)),
                        None => (0, None),
                    }
                }
            };
            if reuse > 0 && best.is_none_or(|(r, _, _)| reuse > r) {
                best = Some((reuse, e_idx, snap));
            }
        }
        let Some((reuse, e_idx, snap)) = best else {
            self.stats.misses += 1;
            return None;
        };
        self.clock += 1;
        self.stats.hits += 1;
        self.stats.tokens_reused += reuse as u64;
        let e = &mut self.entries[e_idx];
        e.last_used = self.clock;
        Some(Hit { reuse, kv: &e.kv, pooled: snap.map(|i| &e.pooled[i].1) })
    }

    /// Stores the instruction `tokens` of a finished prefill with its KV copy and pooling
    /// snapshots, evicting least recently used entries to make room; one too large for the cache
    /// is not stored. An entry for the same tokens is replaced (its snapshots kept with the new).
    pub fn store(&mut self, tokens: Vec<Token>, kv: Vec<u8>, mut pooled: Vec<(u64, PoolSnapshot)>) {
        if !self.enabled() || tokens.is_empty() {
            return;
        }
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            let old = self.entries.swap_remove(i);
            self.stats.bytes -= old.bytes;
            let new_ids: Vec<u64> = pooled.iter().map(|(g, _)| *g).collect();
            pooled.extend(old.pooled.into_iter().filter(|(g, _)| !new_ids.contains(g)));
        }
        let bytes = kv.len() + tokens.len() * 4 + pooled.iter().map(|(_, p)| p.bytes()).sum::<usize>();
        if bytes > self.max_bytes {
            self.stats.entries = self.entries.len();
            return;
        }
        while self.stats.bytes + bytes > self.max_bytes {
            let Some(lru) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else { break };
            let e = self.entries.swap_remove(lru);
            self.stats.bytes -= e.bytes;
            self.stats.evicted += 1;
        }
        self.clock += 1;
        self.entries.push(Entry { tokens, kv, pooled, bytes, last_used: self.clock });
        self.stats.bytes += bytes;
        self.stats.stored += 1;
        self.stats.entries = self.entries.len();
    }
}
