//! Test support (cargo feature `testing`): the workspace's one seeded random generator, and a fresh
//! seed per run. Every crate's
//! tests draw their data from [`Rng`] (directly, or through `iapt_generator::testing`, which
//! re-exports it), so that a failing seed replays the same data everywhere: tests print the seed
//! in their failure messages, and `IAPT_TEST_SEED=<seed>` makes [`fresh_seed`] return it.

pub use crate::rng::Rng;

/// A seed for this run: `IAPT_TEST_SEED` if set, else drawn from the clock, so that every run
/// tries new inputs. Tests print it in every failure message.
pub fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("IAPT_TEST_SEED").ok().and_then(|s| s.parse().ok()) {
        return s;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // Mix in a per-call counter so that tests starting in the same nanosecond still differ.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let c = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Rng::new(nanos ^ c.wrapping_mul(0xA076_1D64_78BD_642F)).next_u64()
}
