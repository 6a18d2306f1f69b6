//! A seeded pseudo-random generator (SplitMix64) for synthetic data: the random adapters of
//! benchmarks (`iapt bench-gpu`, `iapt_generator::synthetic`) and every crate's tests, so that a
//! seed replays the same data everywhere.

/// SplitMix64: tiny, fast, and good enough for synthetic data (not for cryptography).
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
