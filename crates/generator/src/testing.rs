//! Test support (cargo feature `testing`) for this crate's tests and others': the workspace's one
//! seeded random generator and fresh seed per run (tests print the seed on failure,
//! `IAPT_TEST_SEED` replays one), synthetic adapters, every activation of the spec, and the error
//! measure the tests bound.

use iapt_format::{Activation, RationalConfig, RationalVariant};

pub use crate::reference::rel_err;
pub use crate::synthetic::{random_adapter, AdapterSpec};
pub use iapt_format::testing::{fresh_seed, Rng};

/// Every activation of spec v1 for a bottleneck of `r`: the six fixed ones and, for each rational
/// variant, a few (numerator, denominator) degree pairs covering 0 and 8, with 1 group and, when
/// `r` is even, 2 groups.
pub fn all_activations(r: u32) -> Vec<Activation> {
    let mut out = vec![Activation::Identity, Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Silu, Activation::Tanh];
    let degrees = [(0, 0), (6, 5), (8, 8), (3, 0), (0, 4)];
    for variant in [RationalVariant::A, RationalVariant::B, RationalVariant::C, RationalVariant::D] {
        for (i, &(m, n)) in degrees.iter().enumerate() {
            let groups = if r % 2 == 0 && i % 2 == 1 { 2 } else { 1 };
            out.push(Activation::Rational(RationalConfig { variant, numerator_degree: m, denominator_degree: n, groups }));
        }
    }
    out
}
