//! The f64 reference implementation: the formulas of the design note ("The function") written
//! out as plain loops, in their own order, sharing no code with the production path. Slow and
//! obviously right; tests of this and other crates compare against it.
//!
//! ```text
//! Z = H W_down^T + b_down      S = (Z Q^T) s      A = softmax over rows, per column
//! Pbar = A^T Z                 U = g(Pbar)        P = U W_up^T + b_up
//! ```

use iapt_format::{Activation, Adapter, RationalVariant, Role};

use crate::error::GeneratorError;

/// One layer's weights in f64, read straight from the adapter.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// d.
    pub n_embd: usize,
    /// r.
    pub bottleneck: usize,
    /// m.
    pub n_soft_tokens: usize,
    /// g.
    pub activation: Activation,
    /// s.
    pub pool_scale: f64,
    /// W_down, r x d row-major.
    pub down: Vec<f64>,
    /// b_down, r.
    pub down_bias: Option<Vec<f64>>,
    /// Q, m x r.
    pub query: Vec<f64>,
    /// W_up, d x r.
    pub up: Vec<f64>,
    /// b_up, d.
    pub up_bias: Option<Vec<f64>>,
    /// Rational numerator, G x (M+1) (empty unless rational).
    pub num: Vec<f64>,
    /// Rational denominator, G x N or G x (N+1) for variant C (empty unless rational).
    pub den: Vec<f64>,
}

impl LayerWeights {
    /// Reads layer `layer`'s tensors (per-layer, else shared) as f64.
    pub fn from_adapter(adapter: &Adapter, layer: usize) -> Result<LayerWeights, GeneratorError> {
        let cfg = adapter.config();
        if layer >= cfg.n_layer as usize {
            return Err(GeneratorError::LayerOutOfRange { layer, n_layer: cfg.n_layer as usize });
        }
        let l = layer as u32;
        let get = |role: Role| -> Result<Option<Vec<f64>>, GeneratorError> {
            match adapter.tensor(l, role) {
                None if role.is_required(cfg) => Err(GeneratorError::MissingTensor { layer: l, role }),
                None => Ok(None),
                Some(t) => {
                    let v = t.to_f32().map_err(|source| GeneratorError::TensorRead { name: t.name().to_string(), source })?;
                    Ok(Some(v.into_iter().map(f64::from).collect()))
                }
            }
        };
        let rational = cfg.activation.rational().is_some();
        Ok(LayerWeights {
            n_embd: cfg.n_embd as usize,
            bottleneck: cfg.bottleneck as usize,
            n_soft_tokens: cfg.n_soft_tokens as usize,
            activation: cfg.activation,
            pool_scale: f64::from(cfg.pool_scale),
            down: get(Role::DownWeight)?.unwrap_or_default(),
            down_bias: get(Role::DownBias)?,
            query: get(Role::PoolQuery)?.unwrap_or_default(),
            up: get(Role::UpWeight)?.unwrap_or_default(),
            up_bias: get(Role::UpBias)?,
            num: if rational { get(Role::ActNum)?.unwrap_or_default() } else { Vec::new() },
            den: if rational { get(Role::ActDen)?.unwrap_or_default() } else { Vec::new() },
        })
    }
}

/// P_l for `rows` (n x d row-major, n >= 1): m x d row-major.
pub fn generate_layer(w: &LayerWeights, rows: &[f64]) -> Result<Vec<f64>, GeneratorError> {
    let (d, r, m) = (w.n_embd, w.bottleneck, w.n_soft_tokens);
    if rows.len() % d != 0 {
        return Err(GeneratorError::RowsNotMultiple { len: rows.len(), n_embd: d });
    }
    let n = rows.len() / d;
    if n == 0 {
        return Err(GeneratorError::NoRows);
    }
    // Z = H W_down^T + b_down (n x r).
    let mut z = vec![0.0; n * r];
    for i in 0..n {
        for j in 0..r {
            let mut acc = 0.0;
            for c in 0..d {
                acc += rows[i * d + c] * w.down[j * d + c];
            }
            z[i * r + j] = acc + w.down_bias.as_ref().map_or(0.0, |b| b[j]);
        }
    }
    // S = (Z Q^T) s (n x m).
    let mut s = vec![0.0; n * m];
    for i in 0..n {
        for k in 0..m {
            let mut acc = 0.0;
            for j in 0..r {
                acc += z[i * r + j] * w.query[k * r + j];
            }
            s[i * m + k] = acc * w.pool_scale;
        }
    }
    // A = softmax over the n rows, per column (max subtracted first).
    let mut a = vec![0.0; n * m];
    for k in 0..m {
        let mut max = f64::NEG_INFINITY;
        for i in 0..n {
            max = max.max(s[i * m + k]);
        }
        let mut sum = 0.0;
        for i in 0..n {
            a[i * m + k] = (s[i * m + k] - max).exp();
            sum += a[i * m + k];
        }
        for i in 0..n {
            a[i * m + k] /= sum;
        }
    }
    // Pbar = A^T Z (m x r), U = g(Pbar).
    let mut u = vec![0.0; m * r];
    for k in 0..m {
        for j in 0..r {
            let mut acc = 0.0;
            for i in 0..n {
                acc += a[i * m + k] * z[i * r + j];
            }
            u[k * r + j] = activation(&w.activation, &w.num, &w.den, r, j, acc);
        }
    }
    // P = U W_up^T + b_up (m x d).
    let mut p = vec![0.0; m * d];
    for k in 0..m {
        for c in 0..d {
            let mut acc = 0.0;
            for j in 0..r {
                acc += u[k * r + j] * w.up[c * r + j];
            }
            p[k * d + c] = acc + w.up_bias.as_ref().map_or(0.0, |b| b[c]);
        }
    }
    Ok(p)
}

/// P_l for `layer` of `adapter`.
pub fn generate(adapter: &Adapter, layer: usize, rows: &[f64]) -> Result<Vec<f64>, GeneratorError> {
    generate_layer(&LayerWeights::from_adapter(adapter, layer)?, rows)
}

/// g applied to channel `channel` (of `r`) holding `x`. `num`/`den`: the rational coefficients.
pub fn activation(act: &Activation, num: &[f64], den: &[f64], r: usize, channel: usize, x: f64) -> f64 {
    match act {
        Activation::Identity => x,
        Activation::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Activation::Gelu => x * 0.5 * (1.0 + libm::erf(x / 2.0f64.sqrt())),
        Activation::GeluTanh => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            0.5 * x * (1.0 + inner.tanh())
        }
        Activation::Silu => x * (1.0 / (1.0 + (-x).exp())),
        Activation::Tanh => x.tanh(),
        Activation::Rational(rc) => {
            let groups = rc.groups as usize;
            let group = channel / (r / groups);
            let nm = rc.numerator_degree as usize + 1;
            let nd = rc.denominator_len() as usize;
            let a = &num[group * nm..(group + 1) * nm];
            let b = &den[group * nd..(group + 1) * nd];
            let mut p = 0.0;
            for (j, aj) in a.iter().enumerate() {
                p += aj * x.powi(j as i32);
            }
            let q = match rc.variant {
                RationalVariant::A => {
                    let mut t = 0.0;
                    for (i, bi) in b.iter().enumerate() {
                        t += bi.abs() * x.abs().powi(i as i32 + 1);
                    }
                    1.0 + t
                }
                RationalVariant::B | RationalVariant::D => {
                    let mut t = 0.0;
                    for (i, bi) in b.iter().enumerate() {
                        t += bi * x.powi(i as i32 + 1);
                    }
                    1.0 + t.abs()
                }
                RationalVariant::C => {
                    let mut t = 0.0;
                    for (i, bi) in b.iter().enumerate() {
                        t += bi * x.powi(i as i32);
                    }
                    0.1 + t.abs()
                }
            };
            p / q
        }
    }
}

/// The relative error the tests and `iapt generate --check` report: max |got - want| / max |want| (the max-norm relative
/// error of the whole output). 0 when both are zero.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let diff = got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    if diff == 0.0 {
        0.0
    } else {
        diff / scale
    }
}
