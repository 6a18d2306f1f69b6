//! A micro-benchmark of the GPU generator ([`gpu_generator_bench`]): the whole generator of every
//! layer for one instruction, the down-projection kernel alone (its achieved memory bandwidth),
//! and a large device-to-device copy as the bandwidth ceiling. Times are CUDA event times (host
//! times on the emulator, which also runs it, at a tiny shape, so that CI covers it).

use iapt_format::rng::Rng;
use iapt_format::{Activation, DType, RationalConfig, RationalVariant};
use iapt_generator::synthetic::{random_adapter, AdapterSpec};

use crate::device::GpuRuntime;
use crate::error::GpuError;

/// Down-projection launches per timed batch (one launch is a few microseconds, close to the
/// events' resolution).
const DOWN_BATCH: usize = 10;

/// What to measure.
#[derive(Debug, Clone)]
pub struct GpuBenchConfig {
    /// Layers (L).
    pub n_layer: u32,
    /// Hidden size (d).
    pub n_embd: u32,
    /// Bottleneck (r).
    pub bottleneck: u32,
    /// Soft tokens (m).
    pub n_soft_tokens: u32,
    /// Storage dtype of the weights.
    pub dtype: DType,
    /// The activation.
    pub activation: Activation,
    /// Instruction rows fed per layer (n).
    pub rows: usize,
    /// Measured repetitions (medians are reported).
    pub reps: usize,
    /// Unmeasured repetitions first.
    pub warmup: usize,
    /// Bytes copied by the device-to-device copy.
    pub copy_bytes: usize,
    /// Seed of the random adapter and rows.
    pub seed: u64,
}

impl Default for GpuBenchConfig {
    /// LLaMA-2-7B with the paper's generator: d 4096, r 320, m 4, 32 layers, F16, rational B
    /// (6/5); 512 instruction rows; 100 repetitions; a 256 MiB copy.
    fn default() -> GpuBenchConfig {
        GpuBenchConfig {
            n_layer: 32,
            n_embd: 4096,
            bottleneck: 320,
            n_soft_tokens: 4,
            dtype: DType::F16,
            activation: Activation::Rational(RationalConfig {
                variant: RationalVariant::B,
                numerator_degree: 6,
                denominator_degree: 5,
                groups: 1,
            }),
            rows: 512,
            reps: 100,
            warmup: 5,
            copy_bytes: 256 << 20,
            seed: 0x1A97,
        }
    }
}

/// The measurements (plain fields, for printing or serialising).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuBenchReport {
    /// [`GpuRuntime::describe`].
    pub device: String,
    /// Layers.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Bottleneck.
    pub bottleneck: usize,
    /// Soft tokens.
    pub n_soft_tokens: usize,
    /// Weight dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Instruction rows per layer.
    pub rows: usize,
    /// Measured repetitions.
    pub reps: usize,
    /// Device bytes of the uploaded adapter.
    pub adapter_device_bytes: usize,
    /// Median time of feed + finish of every layer (with the per-layer synchronisation that
    /// `finish_device` does, as in the hook), milliseconds.
    pub generator_ms_median: f64,
    /// Fastest such time, milliseconds.
    pub generator_ms_min: f64,
    /// Median time of one down-projection launch, microseconds.
    pub down_us_median: f64,
    /// Bytes of W_down one launch reads.
    pub down_bytes: usize,
    /// Achieved bandwidth of the down-projection: `down_bytes` / median time, GB/s (1e9 B/s).
    pub down_gbps: f64,
    /// Bytes of the device-to-device copy.
    pub copy_bytes: usize,
    /// Copy bandwidth: bytes read + written / median time, GB/s.
    pub copy_gbps: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::Q8_0 => "q8_0",
    }
}

/// Runs the benchmark on `rt`.
pub fn gpu_generator_bench(rt: &GpuRuntime, cfg: &GpuBenchConfig) -> Result<GpuBenchReport, GpuError> {
    let bad = |detail: &str| Err(GpuError::BenchConfig { detail: detail.to_owned() });
    if cfg.reps == 0 || cfg.rows == 0 || cfg.n_layer == 0 {
        return bad("reps, rows and layers must be at least 1");
    }
    if cfg.copy_bytes < 4096 {
        return bad("the copy must be at least 4096 bytes");
    }
    let spec = AdapterSpec {
        n_layer: cfg.n_layer,
        n_embd: cfg.n_embd,
        n_soft_tokens: cfg.n_soft_tokens,
        bottleneck: cfg.bottleneck,
        activation: cfg.activation,
        pool_scale: 1.0,
        dtype: cfg.dtype,
        biases: true,
        shared: Vec::new(),
    };
    let mut rng = Rng::new(cfg.seed);
    let adapter =
        random_adapter(&spec, &mut rng).map_err(|r| GpuError::BenchConfig { detail: format!("cannot build the adapter: {r:?}") })?;
    let ga = rt.upload(&adapter)?;
    let mut st = rt.new_state(&ga)?;
    let (n, d, m, l) = (cfg.rows, ga.n_embd(), ga.n_soft_tokens(), ga.n_layer());
    let mut rows = rt.alloc_rows(n, d)?;
    rt.write_rows(&mut rows, 0, &rng.vec_f32(n * d, 1.0))?;
    let mut dst = rt.alloc_rows(m, d)?;

    let mut pass = || -> Result<(), GpuError> {
        rt.reset(&mut st)?;
        for layer in 0..l {
            rt.feed_device(&ga, &mut st, layer, rows.rows(0, n)?)?;
            rt.finish_device(&ga, &mut st, layer, dst.rows_mut(0, m)?)?;
        }
        Ok(())
    };
    for _ in 0..cfg.warmup {
        pass()?;
    }
    let mut gen = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        gen.push(rt.time_ms(&mut pass)?);
    }
    let generator_ms_min = gen.iter().copied().fold(f64::INFINITY, f64::min);
    let generator_ms_median = median(&mut gen);

    // The state now holds every layer's rows: time the down-projection of layer 0 alone.
    let mut down_batch = || -> Result<(), GpuError> {
        for _ in 0..DOWN_BATCH {
            rt.bench_down(&ga, &st, 0)?;
        }
        Ok(())
    };
    for _ in 0..cfg.warmup {
        down_batch()?;
    }
    let mut down = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        down.push(rt.time_ms(&mut down_batch)? * 1e3 / DOWN_BATCH as f64);
    }
    rt.synchronize()?;
    let down_us_median = median(&mut down);
    let down_bytes = ga.down_bytes(0);

    let copy_rows = cfg.copy_bytes / 4 / 1024;
    let src = rt.alloc_rows(copy_rows, 1024)?;
    let mut cdst = rt.alloc_rows(copy_rows, 1024)?;
    let copy_bytes = copy_rows * 1024 * 4;
    let mut copy = || rt.copy_rows(&mut cdst, &src);
    for _ in 0..cfg.warmup.max(1) {
        copy()?;
    }
    let mut cp = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        cp.push(rt.time_ms(&mut copy)?);
    }
    rt.synchronize()?;
    let copy_ms = median(&mut cp);

    let gbps = |bytes: usize, ms: f64| if ms > 0.0 { bytes as f64 / (ms * 1e-3) / 1e9 } else { 0.0 };
    Ok(GpuBenchReport {
        device: rt.describe(),
        n_layer: l,
        n_embd: d,
        bottleneck: ga.bottleneck(),
        n_soft_tokens: m,
        dtype: dtype_name(cfg.dtype).to_owned(),
        rows: n,
        reps: cfg.reps,
        adapter_device_bytes: ga.device_bytes(),
        generator_ms_median,
        generator_ms_min,
        down_us_median,
        down_bytes,
        down_gbps: gbps(down_bytes, down_us_median * 1e-3),
        copy_bytes,
        copy_gbps: gbps(2 * copy_bytes, copy_ms),
    })
}
