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
//! - each layer's input rows of the instruction, as the generators pooled them (f32: pooling them
//!   again gives the same sums), in runs ([`Rows`]) that entries sharing a prefix share, so that
//!   **another adapter** pools the cached rows with its own generators and skips the base model's
//!   forward pass over them. They are taken from a prefill with an adapter on the CPU, while the
//!   rows taken by prefills in flight stay within half the cache.
//!
//! A request reuses the longest prefix of its prompt that an entry holds: all of it for the base
//! alone but the last token (whose logits it needs), and for an adapter up to the latest snapshot
//! of that adapter, or the end of the latest run of input rows, at or before that length (the
//! pooling must cover exactly the reused rows).
//! What is reused is copied into the request's sequence at admission, so an entry is never in use
//! afterwards and can be evicted at any time; entries are evicted whole, least recently used first,
//! to stay within [`PrefixCache::max_bytes`]. Exact: the KV bytes and the pooling sums are the
//! ones a cold prefill computes (chunked prefill equals one shot), which the engine's tests check
//! against cold runs to 1e-5. Memory is counted per entry (a run shared by two entries counts
//! twice), so the cache holds at most its bytes.

use std::sync::Arc;

use iapt_hook::PoolSnapshot;
use iapt_llama::Token;

/// Pooling snapshots are taken every this many instruction rows (prefill chunks end there).
pub const CHECKPOINT: usize = 256;

/// A run of consecutive instruction rows: each layer's inputs (`n x n_embd` f32 per layer).
#[derive(Debug)]
pub(crate) struct Rows {
    pub n: usize,
    pub layers: Vec<Vec<f32>>,
}

impl Rows {
    fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len() * 4).sum()
    }
}

/// Splits the input rows a prefill kept, rows `start..` of its instruction (`layers[l]` is
/// `k x n_embd`), into runs that end at multiples of [`CHECKPOINT`] and at the end.
pub(crate) fn runs(start: usize, n_embd: usize, layers: Vec<Vec<f32>>) -> Vec<Arc<Rows>> {
    let k = layers.first().map_or(0, |l| l.len() / n_embd.max(1));
    if k == 0 || layers.iter().any(|l| l.len() != k * n_embd) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < k {
        let end = ((start + at) / CHECKPOINT + 1) * CHECKPOINT - start;
        let end = end.min(k);
        let layers = layers.iter().map(|l| l[at * n_embd..end * n_embd].to_vec()).collect();
        out.push(Arc::new(Rows { n: end - at, layers }));
        at = end;
    }
    out
}

/// One cached instruction.
struct Entry {
    tokens: Vec<Token>,
    kv: Vec<u8>,
    /// (generator id, snapshot), snapshots in increasing row order per generator.
    pooled: Vec<(u64, PoolSnapshot)>,
    /// Input rows from row 0 on, in runs (possibly fewer rows than `tokens`, or none).
    inputs: Vec<Arc<Rows>>,
    bytes: usize,
    last_used: u64,
}

impl Entry {
    /// The longest run-aligned prefix of the input rows within `limit` rows: its length and runs.
    fn inputs_within(&self, limit: usize) -> (usize, usize) {
        let (mut rows, mut runs) = (0, 0);
        for r in &self.inputs {
            if rows + r.n > limit {
                break;
            }
            rows += r.n;
            runs += 1;
        }
        (rows, runs)
    }
}

/// What a request can reuse.
pub(crate) struct Hit<'a> {
    /// Prompt tokens reused (KV positions kept).
    pub reuse: usize,
    /// The KV copy to load (then cut to `reuse`).
    pub kv: &'a [u8],
    /// The adapter's pooling after exactly `reuse` rows (None for the base alone, or when it is
    /// to be pooled from `inputs`).
    pub pooled: Option<&'a PoolSnapshot>,
    /// Input rows covering exactly rows `0..reuse`, when the entry has them: pooled by an adapter
    /// without a snapshot, and the start of the request's own entry's rows.
    pub inputs: Option<Vec<Arc<Rows>>>,
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

    /// Bytes the cache may hold.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The best reuse for `prompt` with the adapter whose generator is `gen` (`None`: the base
    /// alone, `Some(None)`: an adapter whose pooling is not cached, on the GPU). Counts a hit or a
    /// miss.
    pub fn lookup(&mut self, prompt: &[Token], gen: Option<Option<u64>>) -> Option<Hit<'_>> {
        if !self.enabled() {
            return None;
        }
        // (reuse, entry, snapshot index, input runs)
        let mut best: Option<(usize, usize, Option<usize>, usize)> = None;
        for (e_idx, e) in self.entries.iter().enumerate() {
            let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            let (in_rows, in_runs) = e.inputs_within(common);
            let (reuse, snap, runs) = match gen {
                None => (common.min(prompt.len().saturating_sub(1)), None, 0),
                Some(None) => (0, None, 0),
                Some(Some(id)) => {
                    let s =
                        e.pooled.iter().enumerate().filter(|(_, (g, p))| *g == id && p.rows() <= common).max_by_key(|(_, (_, p))| p.rows());
                    match s {
                        Some((i, (_, p))) if p.rows() >= in_rows => (p.rows(), Some(i), 0),
                        _ => (in_rows, None, in_runs),
                    }
                }
            };
            if reuse > 0 && best.is_none_or(|(r, ..)| reuse > r) {
                best = Some((reuse, e_idx, snap, runs));
            }
        }
        let Some((reuse, e_idx, snap, runs)) = best else {
            self.stats.misses += 1;
            return None;
        };
        self.clock += 1;
        self.stats.hits += 1;
        self.stats.tokens_reused += reuse as u64;
        let e = &mut self.entries[e_idx];
        e.last_used = self.clock;
        // The input rows of exactly `reuse` rows, for the request's own entry (and to pool from).
        let (in_rows, in_runs) = e.inputs_within(reuse);
        let inputs = (in_rows == reuse).then(|| e.inputs[..in_runs].to_vec());
        debug_assert!(snap.is_some() || gen.is_none() || runs == in_runs);
        Some(Hit { reuse, kv: &e.kv, pooled: snap.map(|i| &e.pooled[i].1), inputs })
    }

    /// Stores the instruction `tokens` of a finished prefill with its KV copy and pooling
    /// snapshots, evicting least recently used entries to make room; one too large for the cache
    /// is not stored. An entry for the same tokens is replaced (its snapshots kept with the new).
    pub fn store(&mut self, tokens: Vec<Token>, kv: Vec<u8>, mut pooled: Vec<(u64, PoolSnapshot)>, inputs: Vec<Arc<Rows>>) {
        if !self.enabled() || tokens.is_empty() {
            return;
        }
        let mut inputs = inputs;
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            let old = self.entries.swap_remove(i);
            self.stats.bytes -= old.bytes;
            if inputs.len() < old.inputs.len() {
                inputs = old.inputs;
            }
            let new_ids: Vec<u64> = pooled.iter().map(|(g, _)| *g).collect();
            pooled.extend(old.pooled.into_iter().filter(|(g, _)| !new_ids.contains(g)));
        }
        let bytes = kv.len()
            + tokens.len() * 4
            + pooled.iter().map(|(_, p)| p.bytes()).sum::<usize>()
            + inputs.iter().map(|r| r.bytes()).sum::<usize>();
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
        self.entries.push(Entry { tokens, kv, pooled, inputs, bytes, last_used: self.clock });
        self.stats.bytes += bytes;
        self.stats.stored += 1;
        self.stats.entries = self.entries.len();
    }
}
