//! The prefix cache (issue 30): prompt work that later requests reuse, for every tenant. One cache
//! for both hosts: the engine (behind every `iapt` command) and libiapt's hook.
//!
//! IAPT's instruction rows never see the soft tokens (spec, Injection, rule 5), so the KV cells of
//! an instruction are the base model's alone, the same whatever adapter follows. An entry holds,
//! for the instruction of a finished prefill, keyed by its exact token ids (a cache belongs to one
//! base model: the engine's model, a libiapt hook's model):
//! - a payload the host keeps with it: the engine's copy of the sequence's KV cells
//!   (`llama_state_seq_get_data`), loaded into a new sequence and cut at the shared length, whoever
//!   asks, so that one copy serves every adapter and the base alone; nothing for libiapt, whose
//!   host application keeps its own KV (its own prompt cache);
//! - the adapter's pooling state (its generators' online softmaxes, [`PoolSnapshot`]) at every
//!   checkpoint, every [`CHECKPOINT`] rows, and at the instruction's end, keyed by the generator
//!   ([`PoolKey`]: a loaded CPU generator or an adapter uploaded to a GPU runtime, whose state is
//!   copied to the host; unique per load, so a replaced file never hits an old snapshot);
//! - each layer's input rows of the instruction, as the generators pooled them (f32: pooling them
//!   again gives the same sums), in runs ([`Rows`]) that entries sharing a prefix share, so that
//!   **another adapter** pools the cached rows with its own generators ([`Hit::resume`]) and
//!   skips the base model's forward pass over them (a GPU generator uploads them). They are taken
//!   from a prefill with an adapter on the CPU (a GPU reads its rows in device memory) while the
//!   rows taken by prefills in flight stay within half the cache ([`PrefixCache::may_capture`]).
//!
//! A request reuses the longest prefix of its prompt that an entry holds: all of it for the base
//! alone but the last token (whose logits it needs), and for an adapter as far as its pooling can
//! be had: its latest snapshot at or before that length, then the cached input rows after it.
//! What is reused is copied at admission, so an entry is never in use afterwards and can be
//! evicted at any time; entries are evicted whole, least recently used first, to stay within
//! [`PrefixCache::max_bytes`], after the input rows of the least recently used entries (the bulk of
//! the bytes, needed only by another adapter) have gone. Exact: the KV bytes and the pooling sums
//! are the ones a cold prefill computes (chunked prefill equals one shot), which the engine's and
//! libiapt's tests check against cold runs to 1e-5. A run of input rows shared by several entries
//! is counted once.
//!
//! Written here rather than taken from a crate: the entries are prefixes with per-adapter parts and
//! shared runs, evicted in two stages; a general LRU map holds none of that.

use std::sync::Arc;

use crate::{PoolKey, PoolSnapshot, Prefill};

/// A token id (llama.cpp's `llama_token`).
pub type Token = i32;

/// Pooling snapshots are taken every this many instruction rows (prefill chunks end there).
pub const CHECKPOINT: usize = 256;

/// A run of consecutive instruction rows: each layer's inputs (`n x n_embd` f32 per layer).
#[derive(Debug)]
pub struct Rows {
    n: usize,
    layers: Vec<Vec<f32>>,
}

impl Rows {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len() * 4).sum()
    }
}

/// Splits the input rows a prefill kept, rows `start..` of its instruction (`layers[l]` is
/// `k x n_embd`), into runs that end at multiples of [`CHECKPOINT`] and at the end.
pub fn runs(start: usize, n_embd: usize, layers: Vec<Vec<f32>>) -> Vec<Arc<Rows>> {
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
    /// What the host stores with it (the engine: the sequence's KV cells).
    payload: Vec<u8>,
    /// Pooling snapshots, of any generators (each says whose: [`PoolSnapshot::key`]).
    pooled: Vec<PoolSnapshot>,
    /// Input rows from row 0 on, in runs (possibly fewer rows than `tokens`, or none).
    inputs: Vec<Arc<Rows>>,
    bytes: usize,
    last_used: u64,
}

impl Entry {
    /// Input rows the entry holds (from row 0 on).
    fn input_rows(&self) -> usize {
        self.inputs.iter().map(|r| r.n).sum()
    }

    /// The input rows `from..to`, as (run, first row in it, end row in it) pieces.
    fn pieces(&self, from: usize, to: usize) -> Vec<(Arc<Rows>, usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.inputs {
            let (a, b) = (from.max(at), to.min(at + r.n));
            if a < b {
                out.push((r.clone(), a - at, b - at));
            }
            at += r.n;
        }
        out
    }

    /// The input rows `0..to` as runs for a new entry: whole runs shared, a run cut at `to` copied.
    fn runs_to(&self, to: usize) -> Vec<Arc<Rows>> {
        self.pieces(0, to)
            .into_iter()
            .map(|(r, a, b)| {
                if a == 0 && b == r.n {
                    r
                } else {
                    let d = r.layers.first().map_or(0, |l| l.len() / r.n.max(1));
                    Arc::new(Rows { n: b - a, layers: r.layers.iter().map(|l| l[a * d..b * d].to_vec()).collect() })
                }
            })
            .collect()
    }
}

/// What a request can reuse.
pub struct Hit<'a> {
    /// Prompt tokens reused (KV positions kept).
    pub reuse: usize,
    /// The entry's payload (the engine: the KV copy to load, then cut to `reuse`).
    pub payload: &'a [u8],
    /// With an adapter: its pooling after the first rows (none: start from nothing), then
    /// `pool` (input rows kept by an earlier prefill) up to exactly `reuse` rows.
    pub pooled: Option<&'a PoolSnapshot>,
    /// See `pooled`: (run, first row, end row) pieces.
    pub pool: Vec<(Arc<Rows>, usize, usize)>,
    /// The input rows `0..reuse` when the entry has them, for the request's own entry.
    pub inputs: Option<Vec<Arc<Rows>>>,
}

impl Hit<'_> {
    /// The prefill that goes on from this hit: `start` makes it from the hit's snapshot (or from
    /// nothing, `None`), then the cached input rows up to [`Hit::reuse`] are pooled into it with the
    /// generators only, no forward pass. `None` when either fails: start cold.
    pub fn resume(&self, start: impl FnOnce(Option<&PoolSnapshot>) -> Option<Prefill>) -> Option<Prefill> {
        let mut prefill = start(self.pooled)?;
        let pooled = self.pool.iter().all(|(run, a, b)| {
            let d = run.layers.first().map_or(0, |l| l.len() / run.n.max(1));
            run.layers.iter().enumerate().all(|(l, rows)| prefill.pool_rows(l, &rows[a * d..b * d]))
        });
        pooled.then_some(prefill)
    }
}

/// Counters since the cache was made.
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
    /// Entries whose input rows were dropped to make room (their KV and snapshots kept).
    pub rows_dropped: u64,
    /// See `stored`.
    pub evicted: u64,
    /// Bytes held now, and entries.
    pub bytes: usize,
    /// See `bytes`.
    pub entries: usize,
}

/// The cache (see the module doc); `max_bytes == 0` turns it off.
pub struct PrefixCache {
    max_bytes: usize,
    entries: Vec<Entry>,
    clock: u64,
    /// Its counters.
    pub stats: CacheStats,
}

impl PrefixCache {
    /// A cache of at most `max_bytes` bytes (0: off).
    pub fn new(max_bytes: usize) -> PrefixCache {
        PrefixCache { max_bytes, entries: Vec::new(), clock: 0, stats: CacheStats::default() }
    }

    /// Whether it is on.
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// Bytes the cache may hold.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether a prefill may keep `bytes` of input rows for the cache while prefills in flight
    /// keep `in_flight` bytes: with the cache on, within half of it together.
    pub fn may_capture(&self, in_flight: usize, bytes: usize) -> bool {
        self.enabled() && bytes > 0 && in_flight + bytes <= self.max_bytes / 2
    }

    /// Whether a prefill that has pooled `done` of its `n_instr` instruction rows is at a
    /// checkpoint, where its pooling is copied for the cache (the end is stored with the entry).
    pub fn is_checkpoint(done: usize, n_instr: usize) -> bool {
        done > 0 && done % CHECKPOINT == 0 && done < n_instr
    }

    /// The best reuse for `prompt` with the adapter whose pooling is `gen` (`None`: the base
    /// alone). Counts a hit or a miss.
    ///
    /// The base alone reuses the whole common prefix but the last prompt token. An adapter reuses
    /// it as far as its pooling can be had: from its own latest snapshot at or before it, then the
    /// entry's input rows beyond the snapshot, up to the common length.
    pub fn lookup(&mut self, prompt: &[Token], gen: Option<PoolKey>) -> Option<Hit<'_>> {
        if !self.enabled() {
            return None;
        }
        // (reuse, entry, snapshot index)
        let mut best: Option<(usize, usize, Option<usize>)> = None;
        for (e_idx, e) in self.entries.iter().enumerate() {
            let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            let (reuse, snap) = match gen {
                None => (common.min(prompt.len().saturating_sub(1)), None),
                Some(key) => {
                    let s = e.pooled.iter().enumerate().filter(|(_, p)| p.key() == key && p.rows() <= common).max_by_key(|(_, p)| p.rows());
                    let from = s.map_or(0, |(_, p)| p.rows());
                    let upto = common.min(e.input_rows()).max(from);
                    (upto, s.map(|(i, _)| i))
                }
            };
            if reuse > 0 && best.is_none_or(|(r, ..)| reuse > r) {
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
        let pooled = snap.map(|i| &e.pooled[i]);
        let pool = match gen {
            Some(_) => e.pieces(pooled.map_or(0, |p| p.rows()), reuse),
            None => Vec::new(),
        };
        let inputs = (e.input_rows() >= reuse).then(|| e.runs_to(reuse));
        Some(Hit { reuse, payload: &e.payload, pooled, pool, inputs })
    }

    /// Stores the instruction `tokens` of a finished prefill with its payload and pooling
    /// snapshots, evicting least recently used entries to make room; one too large for the cache
    /// is not stored. An entry for the same tokens is replaced; its snapshots stay, but for those
    /// the new ones replace (same generator, same rows).
    pub fn store(&mut self, tokens: Vec<Token>, payload: Vec<u8>, mut pooled: Vec<PoolSnapshot>, inputs: Vec<Arc<Rows>>) {
        if !self.enabled() || tokens.is_empty() {
            return;
        }
        let mut inputs = inputs;
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            let old = self.entries.swap_remove(i);
            if inputs.len() < old.inputs.len() {
                inputs = old.inputs;
            }
            pooled = merged(pooled, old.pooled);
        }
        let own = payload.len() + tokens.len() * 4 + pooled.iter().map(PoolSnapshot::bytes).sum::<usize>();
        let entry = Entry { tokens, payload, pooled, inputs, bytes: own, last_used: 0 };
        if own + entry.inputs.iter().map(|r| r.bytes()).sum::<usize>() > self.max_bytes {
            self.stats.bytes = self.held_bytes(None);
            self.stats.entries = self.entries.len();
            return;
        }
        // Over the budget: first the input rows of the least recently used entries (the bulk of the
        // bytes, and needed only by another adapter), then whole entries, least recently used first.
        while self.held_bytes(Some(&entry)) > self.max_bytes {
            let lru_with_rows = self.entries.iter().enumerate().filter(|(_, e)| !e.inputs.is_empty()).min_by_key(|(_, e)| e.last_used);
            if let Some(i) = lru_with_rows.map(|(i, _)| i) {
                self.entries[i].inputs.clear();
                self.stats.rows_dropped += 1;
                continue;
            }
            let Some(lru) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else { break };
            self.entries.swap_remove(lru);
            self.stats.evicted += 1;
        }
        self.clock += 1;
        self.entries.push(Entry { last_used: self.clock, ..entry });
        self.stats.bytes = self.held_bytes(None);
        self.stats.stored += 1;
        self.stats.entries = self.entries.len();
    }

    /// Whether an entry holds exactly `tokens`.
    pub fn holds(&self, tokens: &[Token]) -> bool {
        self.entries.iter().any(|e| e.tokens == tokens)
    }

    /// Adds `pooled` to the entry of exactly `tokens` (a prompt reused whole, whose payload the
    /// entry holds already: nothing to copy again), as [`PrefixCache::store`] with the same payload
    /// would; `false` when there is no such entry.
    pub fn add_pooling(&mut self, tokens: &[Token], pooled: Vec<PoolSnapshot>) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) else { return false };
        let old = self.entries.swap_remove(i);
        self.store(old.tokens, old.payload, merged(pooled, old.pooled), old.inputs);
        true
    }

    /// Bytes the entries (and `extra`) hold: each entry's own, and every run of input rows once,
    /// however many entries share it.
    fn held_bytes(&self, extra: Option<&Entry>) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for e in self.entries.iter().chain(extra) {
            total += e.bytes;
            for r in &e.inputs {
                if seen.insert(Arc::as_ptr(r)) {
                    total += r.bytes();
                }
            }
        }
        total
    }
}

/// `new` snapshots, then those of `old` that `new` has no snapshot of the same generator and rows for.
fn merged(mut new: Vec<PoolSnapshot>, old: Vec<PoolSnapshot>) -> Vec<PoolSnapshot> {
    let have: Vec<(PoolKey, usize)> = new.iter().map(|p| (p.key(), p.rows())).collect();
    new.extend(old.into_iter().filter(|p| !have.contains(&(p.key(), p.rows()))));
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input rows of `n` instruction rows, 2 layers of width 3, from row `start` on, every value
    /// its row number (so a piece shows which rows it holds).
    fn layers(start: usize, n: usize) -> Vec<Vec<f32>> {
        let one: Vec<f32> = (start..start + n).flat_map(|r| [r as f32; 3]).collect();
        vec![one.clone(), one]
    }

    #[test]
    fn runs_end_at_checkpoints_and_at_the_end() {
        let r = runs(200, 3, layers(200, 400));
        let lens: Vec<usize> = r.iter().map(|x| x.n).collect();
        assert_eq!(lens, [56, 256, 88], "rows 200..256, 256..512, 512..600");
        assert_eq!(r[1].layers[0][0], 256.0);
        assert!(runs(0, 3, vec![vec![0.0; 6], vec![0.0; 3]]).is_empty(), "layers of different lengths: nothing");
    }

    #[test]
    fn lookup_takes_the_longest_common_prefix_by_its_rules() {
        let mut c = PrefixCache::new(1 << 20);
        let toks: Vec<Token> = (0..10).collect();
        c.store(toks.clone(), vec![1; 8], Vec::new(), runs(0, 3, layers(0, 10)));
        // The base alone: all of a common prefix but the prompt's last token.
        let same = c.lookup(&toks, None).unwrap();
        assert_eq!((same.reuse, same.payload), (9, &[1u8; 8][..]));
        let grown: Vec<Token> = (0..14).collect();
        assert_eq!(c.lookup(&grown, None).unwrap().reuse, 10);
        // An adapter without a snapshot: the cached input rows up to the common length.
        let mut diverged = toks[..6].to_vec();
        diverged.push(99);
        let hit = c.lookup(&diverged, Some(PoolKey::Cpu(7))).unwrap();
        assert_eq!(hit.reuse, 6);
        let rows: Vec<f32> = hit.pool.iter().flat_map(|(r, a, b)| r.layers[0][a * 3..b * 3].to_vec()).collect();
        assert_eq!(rows, layers(0, 6)[0], "rows 0..6 to pool");
        // Another prompt: nothing.
        assert!(c.lookup(&[42, 43], None).is_none());
        assert_eq!((c.stats.hits, c.stats.misses, c.stats.tokens_reused), (3, 1, 25));
    }

    #[test]
    fn shared_runs_count_once_and_rows_go_before_entries() {
        let rows = runs(0, 3, layers(0, 10));
        let row_bytes: usize = rows.iter().map(|r| r.bytes()).sum();
        let mut c = PrefixCache::new(100 + 2 * (10 * 4 + 100) + row_bytes);
        c.store((0..10).collect(), vec![0; 100], Vec::new(), rows.clone());
        c.store((0..10).chain(20..25).collect(), vec![0; 100], Vec::new(), rows);
        assert_eq!(c.stats.bytes, 100 + 40 + 100 + 60 + row_bytes, "the shared run once");
        // A third entry does not fit: the input rows go first, least recently used entry first (the
        // run is shared, so only dropping both entries' rows frees it); KV and snapshots stay.
        c.store((50..60).collect(), vec![0; 40 + row_bytes], Vec::new(), Vec::new());
        assert_eq!((c.stats.rows_dropped, c.stats.evicted, c.stats.entries), (2, 0, 3));
        assert_eq!(c.stats.bytes, c.max_bytes());
        // Then whole entries, least recently used first: the first one.
        c.store((70..80).collect(), vec![0; 100], Vec::new(), Vec::new());
        assert_eq!((c.stats.evicted, c.stats.entries), (1, 3));
        assert_eq!(c.lookup(&(0..10).collect::<Vec<_>>(), None).unwrap().payload.len(), 100, "the second one serves 0..10");
        // Too large for the cache: not stored.
        c.store((90..99).collect(), vec![0; c.max_bytes() + 1], Vec::new(), Vec::new());
        assert!(c.lookup(&(90..99).collect::<Vec<_>>(), None).is_none());
    }
}
