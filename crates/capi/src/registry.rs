//! `iapt_registry`: adapters by path with a bounded resident set, for C hosts that serve many
//! adapters (issue 29). The same policy as `iapt serve --adapter-dir` (the engine's registry),
//! for hosts that bring their own llama.cpp and so have no engine:
//!
//! - [`IaptRegistry::get`] returns the adapter of a file: the resident one, or loads it (validated,
//!   generator built) on first use; concurrent first gets of one path load it once (the others
//!   wait for that load, gets of other paths do not);
//! - a file that changed on disk (its [`FileStamp`] moved and its SHA-256 differs) is loaded again;
//!   the old adapter stays valid for whoever holds it, so a sequence never mixes two versions;
//! - at most `max_resident` adapters and `max_bytes` bytes of generator weights stay resident: a
//!   load first drops the least recently used adapters that nobody else holds. An adapter a host
//!   holds (a handle not yet freed, or a hook sequence bound to it) is in use and stays; when
//!   nothing can be dropped the get fails with `IAPT_ERR_FULL` and nothing changes. IAPT needs an
//!   adapter only during its sequence's prefill, so a host that unbinds a sequence once its prefill
//!   is done (`iapt_hook_set_adapter(h, seq, NULL, ...)`) lets its adapter go while it decodes.
//!
//! The least-recently-used bookkeeping is a counter per entry, and eviction scans the entries: a
//! registry holds at most thousands, so a scan per load costs microseconds beside a load's
//! milliseconds, and needs no linked structure.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use iapt_format::fingerprint::{sha256_file, FileStamp};

use crate::{load_opened, Failure, IaptAdapter, IAPT_ERR_ADAPTER, IAPT_ERR_FULL};

/// One resident adapter.
struct Entry {
    adapter: Arc<IaptAdapter>,
    stamp: FileStamp,
    hash: [u8; 32],
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Resident {
    entries: HashMap<PathBuf, Entry>,
    /// A lock per path being loaded, so one load runs per path.
    loading: HashMap<PathBuf, Arc<Mutex<()>>>,
    clock: u64,
    loads: u64,
}

/// `iapt_registry` in C: resident adapters by path (see `iapt_registry_get`). Opaque to C;
/// every call on it is thread-safe.
pub struct IaptRegistry {
    max_resident: Option<usize>,
    max_bytes: Option<usize>,
    state: Mutex<Resident>,
}

/// What [`IaptRegistry::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Adapters resident.
    pub resident: usize,
    /// Bytes of their generator weights.
    pub bytes: usize,
    /// Loads since the registry was made (first loads and reloads of changed files).
    pub loads: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic was caught mid-call; the map is still consistent (every
    // change is one insert or remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IaptRegistry {
    /// A registry bounded by `max_resident` adapters and `max_bytes` bytes (`None`: unbounded).
    pub(crate) fn new(max_resident: Option<usize>, max_bytes: Option<usize>) -> IaptRegistry {
        IaptRegistry { max_resident, max_bytes, state: Mutex::new(Resident::default()) }
    }

    /// The adapter of the file at `path` (see the module documentation).
    pub(crate) fn get(&self, path: &Path) -> Result<Arc<IaptAdapter>, Failure> {
        let bad = |msg: String| Failure(IAPT_ERR_ADAPTER, format!("{}: {msg}", path.display()));
        let key = std::fs::canonicalize(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let now = std::fs::metadata(&key).map(|m| FileStamp::of(&m)).map_err(|e| bad(format!("cannot open: {e}")))?;
        if let Some(a) = self.touch_if(&key, |e| e.stamp == now) {
            return Ok(a);
        }
        let gate = lock(&self.state).loading.entry(key.clone()).or_default().clone();
        let _one_load = lock(&gate);
        let result = self.load(&key, path);
        let mut st = lock(&self.state);
        if Arc::strong_count(&gate) <= 2 {
            // No other get waits on this path's gate (ours and the map's references only).
            st.loading.remove(&key);
        }
        result
    }

    /// The resident adapter of `key` if `fresh` says it is current, marked as just used.
    fn touch_if(&self, key: &Path, fresh: impl Fn(&Entry) -> bool) -> Option<Arc<IaptAdapter>> {
        let mut st = lock(&self.state);
        st.clock += 1;
        let clock = st.clock;
        let e = st.entries.get_mut(key).filter(|e| fresh(e))?;
        e.last_used = clock;
        Some(e.adapter.clone())
    }

    /// Loads `key` (under its path's gate) unless another get just did, or its content is the
    /// resident one's.
    fn load(&self, key: &Path, shown: &Path) -> Result<Arc<IaptAdapter>, Failure> {
        let bad = |msg: String| Failure(IAPT_ERR_ADAPTER, format!("{}: {msg}", shown.display()));
        let file = File::open(key).map_err(|e| bad(format!("cannot open: {e}")))?;
        let stamp = FileStamp::of(&file.metadata().map_err(|e| bad(format!("cannot read: {e}")))?);
        if let Some(a) = self.touch_if(key, |e| e.stamp == stamp) {
            return Ok(a); // loaded by the get we waited for
        }
        let hash = sha256_file(&file).map_err(|e| bad(format!("cannot read: {e}")))?;
        if let Some(a) = self.touch_if(key, |e| e.hash == hash) {
            // Touched, not changed: keep the resident adapter and remember the new stamp.
            if let Some(e) = lock(&self.state).entries.get_mut(key) {
                e.stamp = stamp;
            }
            return Ok(a);
        }
        let adapter = Arc::new(load_opened(file, shown)?);
        let bytes = adapter.gen.weight_bytes();
        let mut st = lock(&self.state);
        let evict = self.room_for(&st, key, bytes)?;
        for k in evict {
            st.entries.remove(&k);
        }
        st.clock += 1;
        st.loads += 1;
        let last_used = st.clock;
        st.entries.insert(key.to_owned(), Entry { adapter: adapter.clone(), stamp, hash, bytes, last_used });
        Ok(adapter)
    }

    /// The entries to drop, least recently used first, so that one more adapter of `bytes` fits
    /// (an older version of `key` itself leaves anyway); `IAPT_ERR_FULL` when dropping every
    /// adapter nobody holds is not enough.
    fn room_for(&self, st: &Resident, key: &Path, bytes: usize) -> Result<Vec<PathBuf>, Failure> {
        let mut count = st.entries.len();
        let mut total: usize = st.entries.values().map(|e| e.bytes).sum();
        let mut out = Vec::new();
        if let Some(old) = st.entries.get(key) {
            count -= 1;
            total -= old.bytes;
            out.push(key.to_owned());
        }
        let fits =
            |count: usize, total: usize| self.max_resident.is_none_or(|n| count < n) && self.max_bytes.is_none_or(|b| total + bytes <= b);
        let mut free: Vec<(&PathBuf, &Entry)> =
            st.entries.iter().filter(|(k, e)| k.as_path() != key && Arc::strong_count(&e.adapter) == 1).collect();
        free.sort_by_key(|(_, e)| e.last_used);
        let mut free = free.into_iter();
        while !fits(count, total) {
            let Some((k, e)) = free.next() else {
                return Err(Failure(
                    IAPT_ERR_FULL,
                    format!(
                        "{count} adapters ({total} bytes) are resident and the rest are in use (held by handles or bound to hook sequences); \
                         raise the registry's limits or release adapters (iapt_adapter_free, iapt_hook_set_adapter(.., NULL, ..))"
                    ),
                ));
            };
            count -= 1;
            total -= e.bytes;
            out.push(k.clone());
        }
        Ok(out)
    }

    /// Resident adapters, their bytes and the loads so far.
    pub(crate) fn stats(&self) -> Stats {
        let st = lock(&self.state);
        Stats { resident: st.entries.len(), bytes: st.entries.values().map(|e| e.bytes).sum(), loads: st.loads }
    }
}
