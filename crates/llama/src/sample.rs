//! Token sampling from a logits row: greedy (argmax, lowest id on ties) or temperature sampling
//! with a seeded generator (splitmix64), so that a run is reproducible from its seed.

use crate::ffi::Token;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sample from softmax(logits / temp).
    Temperature {
        /// The temperature (> 0).
        temp: f32,
        /// The seed.
        seed: u64,
    },
}

impl Sampling {
    /// `temp <= 0` is greedy.
    pub fn from_temp(temp: f32, seed: u64) -> Sampling {
        if temp > 0.0 {
            Sampling::Temperature { temp, seed }
        } else {
            Sampling::Greedy
        }
    }
}

/// A sampler with its state.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    state: u64,
}

/// The index of the largest value (the first one on ties); 0 for an empty row.
pub fn argmax(logits: &[f32]) -> Token {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as Token
}

impl Sampler {
    /// A sampler.
    pub fn new(sampling: Sampling) -> Sampler {
        let state = match sampling {
            Sampling::Greedy => 0,
            Sampling::Temperature { seed, .. } => seed,
        };
        Sampler { sampling, state }
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Chooses the next token from a logits row.
    pub fn sample(&mut self, logits: &[f32]) -> Token {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Temperature { temp, .. } => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let t = f64::from(temp);
                let weights: Vec<f64> = logits.iter().map(|&v| ((f64::from(v) - f64::from(max)) / t).exp()).collect();
                let total: f64 = weights.iter().sum();
                let mut u = self.next_f64() * total;
                for (i, w) in weights.iter().enumerate() {
                    if u < *w {
                        return i as Token;
                    }
                    u -= w;
                }
                argmax(logits)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(Sampler::new(Sampling::from_temp(0.0, 9)).sample(&[1.0, -2.0, 5.0]), 2);
    }

    #[test]
    fn temperature_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::Temperature { temp: 1.0, seed });
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.iter().all(|&t| t != 2));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }
}
