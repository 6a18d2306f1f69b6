//! Shared test support: small valid adapters built from a config and a seed, and their raw
//! tensor lists for making broken files.
#![allow(dead_code)]

use iapt_format::raw::RawTensorOut;
use iapt_format::testing::Rng;
use iapt_format::{Activation, Adapter, AdapterConfig, DType, RationalConfig, RationalVariant, Role, SpecVersion, Tensor, TensorName};

pub fn rational_config() -> AdapterConfig {
    AdapterConfig {
        spec_version: SpecVersion::V1_0,
        n_layer: 2,
        n_embd: 8,
        n_soft_tokens: 2,
        bottleneck: 4,
        activation: Activation::Rational(RationalConfig {
            variant: RationalVariant::B,
            numerator_degree: 3,
            denominator_degree: 2,
            groups: 2,
        }),
        pool_scale: 1.0,
        base_model_arch: "llama".into(),
    }
}

/// Builds a valid adapter: every role per layer (biases included), except roles in `shared`.
pub fn build(cfg: &AdapterConfig, dtype: DType, shared: &[Role], seed: u64) -> Adapter {
    let mut rng = Rng::new(seed);
    let mut tensors = Vec::new();
    for role in Role::ALL {
        if !role.is_allowed(cfg) {
            continue;
        }
        let shape = role.expected_shape(cfg);
        let n: u64 = shape.iter().product();
        let names: Vec<TensorName> = if shared.contains(&role) {
            vec![TensorName::shared(role)]
        } else {
            (0..cfg.n_layer).map(|l| TensorName::layer(l, role)).collect()
        };
        for name in names {
            let values: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            tensors.push(Tensor::from_f32(name, dtype, shape.clone(), &values).unwrap());
        }
    }
    Adapter::from_parts(cfg.clone(), Vec::new(), tensors).unwrap_or_else(|r| panic!("test adapter invalid:\n{r}"))
}

pub fn sample() -> Adapter {
    build(&rational_config(), DType::F32, &[], 7)
}

/// The adapter's tensors as raw tensors (for mutation).
pub fn raw_tensors(a: &Adapter) -> Vec<RawTensorOut> {
    a.tensors()
        .iter()
        .map(|t| RawTensorOut {
            name: t.name().to_string(),
            shape: t.shape().to_vec(),
            ggml_type: t.dtype().ggml_type(),
            st_dtype: t.dtype().safetensors_name().to_string(),
            data: t.bytes().unwrap().into_owned(),
        })
        .collect()
}
