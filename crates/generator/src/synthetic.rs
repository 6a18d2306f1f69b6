//! Synthetic adapters: valid adapters of any shape, activation and storage dtype with seeded
//! random weights, for benchmarks (`iapt bench-gpu`, the criterion benches) and tests.

use iapt_format::rng::Rng;
use iapt_format::{Activation, Adapter, AdapterConfig, DType, Report, Role, SpecVersion, Tensor, TensorName};

/// What random adapter to build.
#[derive(Debug, Clone)]
pub struct AdapterSpec {
    /// L.
    pub n_layer: u32,
    /// d.
    pub n_embd: u32,
    /// m.
    pub n_soft_tokens: u32,
    /// r.
    pub bottleneck: u32,
    /// g.
    pub activation: Activation,
    /// s.
    pub pool_scale: f32,
    /// Storage dtype of every tensor.
    pub dtype: DType,
    /// Whether to include `down.bias` and `up.bias`.
    pub biases: bool,
    /// Roles stored once as `iapt.shared.*` instead of per layer.
    pub shared: Vec<Role>,
}

impl AdapterSpec {
    /// A small spec: the given sizes, no sharing, biases, F32, scale 1.
    pub fn small(n_layer: u32, n_embd: u32, n_soft_tokens: u32, bottleneck: u32, activation: Activation) -> AdapterSpec {
        AdapterSpec {
            n_layer,
            n_embd,
            n_soft_tokens,
            bottleneck,
            activation,
            pool_scale: 1.0,
            dtype: DType::F32,
            biases: true,
            shared: Vec::new(),
        }
    }

    /// The config this spec describes.
    pub fn config(&self) -> AdapterConfig {
        AdapterConfig {
            spec_version: SpecVersion::V1_0,
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_soft_tokens: self.n_soft_tokens,
            bottleneck: self.bottleneck,
            activation: self.activation,
            pool_scale: self.pool_scale,
            base_model_arch: "llama".to_owned(),
        }
    }
}

/// A valid adapter with random weights: projections scaled to keep activations of order one for
/// inputs of order one, biases in [-0.5, 0.5), rational coefficients of degree j in
/// [-2^-j, 2^-j) (decaying like those of a trained Padé unit; with every coefficient in [-1, 1)
/// a degree-8 rational is so ill-conditioned near its denominator's minimum, condition number
/// ~100, that no f32 pipeline can stay within 1e-5 of the f64 reference).
pub fn random_adapter(spec: &AdapterSpec, rng: &mut Rng) -> Result<Adapter, Report> {
    let cfg = spec.config();
    let (d, r) = (f64::from(spec.n_embd), f64::from(spec.bottleneck));
    let mut tensors = Vec::new();
    for role in Role::ALL {
        if !role.is_allowed(&cfg) || (!role.is_required(&cfg) && !spec.biases) {
            continue;
        }
        let shape = role.expected_shape(&cfg);
        let len = shape.iter().product::<u64>() as usize;
        let scale = match role {
            Role::DownWeight => (3.0 / d).sqrt(),
            Role::PoolQuery | Role::UpWeight => (3.0 / r).sqrt(),
            Role::DownBias | Role::UpBias => 0.5,
            Role::ActNum | Role::ActDen => 1.0,
        };
        let names: Vec<TensorName> = if spec.shared.contains(&role) {
            vec![TensorName::shared(role)]
        } else {
            (0..spec.n_layer).map(|l| TensorName::layer(l, role)).collect()
        };
        for name in names {
            let mut values = rng.vec_f32(len, scale);
            if matches!(role, Role::ActNum | Role::ActDen) {
                // Row-major [G, K]: column j holds the coefficient of degree j (j + 1 for A, B, D
                // denominators; the decay rate is what matters, not the offset).
                let cols = shape[1] as usize;
                for (i, v) in values.iter_mut().enumerate() {
                    *v *= 0.5f32.powi((i % cols.max(1)) as i32);
                }
            }
            tensors.push(Tensor::from_f32(name, spec.dtype, shape.clone(), &values).map_err(|e| {
                let mut rep = Report::default();
                rep.push(iapt_format::Finding::file(iapt_format::Code::Unreadable, e.to_string()));
                rep
            })?);
        }
    }
    Adapter::from_parts(cfg, Vec::new(), tensors)
}
