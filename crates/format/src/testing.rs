//! The workspace's one seeded random generator for tests, and a fresh seed per run. Every crate's
//! tests draw their data from [`Rng`] (directly, or through `iapt_generator::testing`, which
//! re-exports it), so that a failing seed replays the same data everywhere: tests print the seed
//! in their failure messages, and `IAPT_TEST_SEED=<seed>` makes [`fresh_seed`] return it.

/// SplitMix64: tiny, fast, and good enough for test data (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n (n >= 1).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// `len` values uniform in [-scale, scale), as f32.
    pub fn vec_f32(&mut self, len: usize, scale: f64) -> Vec<f32> {
        (0..len).map(|_| self.range(-scale, scale) as f32).collect()
    }
}

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
