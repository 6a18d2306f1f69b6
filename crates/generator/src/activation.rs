//! The activation g of the production path, applied to the m x r pooled vectors. The tail of the
//! generator is tiny (m x r values), so it is evaluated in f64 (Horner's rule) and costs nothing
//! measurable; this keeps the rational functions' cancellation out of the f32 error budget.

use iapt_format::{Activation, RationalVariant};

/// Applies `act` in place to `values`, a row-major block of rows of `r` channels. `num` and `den`
/// are the rational coefficients (`[G, M+1]` and `[G, N]` / `[G, N+1]`), ignored otherwise.
pub(crate) fn apply(act: &Activation, num: &[f32], den: &[f32], r: usize, values: &mut [f64]) {
    match act {
        Activation::Identity => {}
        Activation::Relu => values.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Gelu => values.iter_mut().for_each(|x| *x = 0.5 * *x * (1.0 + libm::erf(*x * std::f64::consts::FRAC_1_SQRT_2))),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            values.iter_mut().for_each(|x| *x = 0.5 * *x * (1.0 + (c * (*x + 0.044715 * *x * *x * *x)).tanh()));
        }
        Activation::Silu => values.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
        Activation::Tanh => values.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Rational(rc) => {
            let groups = rc.groups.max(1) as usize;
            let per_group = (r / groups).max(1);
            let num_len = rc.numerator_degree as usize + 1;
            let den_len = rc.denominator_len() as usize;
            for row in values.chunks_mut(r) {
                for (c, x) in row.iter_mut().enumerate() {
                    let g = (c / per_group).min(groups - 1);
                    let a = &num[g * num_len..(g + 1) * num_len];
                    let b = &den[g * den_len..(g + 1) * den_len];
                    *x = rational(rc.variant, a, b, *x);
                }
            }
        }
    }
}

/// P(x) / Q(x) by Horner's rule. `a` = a_0..a_M; `b` = b_1..b_N (A, B, D) or b_0..b_N (C).
fn rational(variant: RationalVariant, a: &[f32], b: &[f32], x: f64) -> f64 {
    let p = a.iter().rev().fold(0.0f64, |acc, &c| acc * x + f64::from(c));
    let q = match variant {
        RationalVariant::A => {
            let ax = x.abs();
            1.0 + b.iter().rev().fold(0.0f64, |acc, &c| (acc + f64::from(c).abs()) * ax)
        }
        RationalVariant::B | RationalVariant::D => 1.0 + b.iter().rev().fold(0.0f64, |acc, &c| (acc + f64::from(c)) * x).abs(),
        RationalVariant::C => 0.1 + b.iter().rev().fold(0.0f64, |acc, &c| acc * x + f64::from(c)).abs(),
    };
    p / q
}
