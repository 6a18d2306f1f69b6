//! `iapt bench-gpu [--device cuda|emulated] [--rows N] [--layers L] [--n-embd D] [--bottleneck R]
//! [--dtype f16] [--reps N] [--json]`: the GPU generator's micro-benchmark on a random adapter
//! (default: the LLaMA-2-7B shape), see `iapt_generator_cuda::gpu_generator_bench`. Exit code 2 when no
//! CUDA device is usable (or the emulator is asked for but not compiled in).

use std::process::ExitCode;

use iapt_format::DType;
use iapt_generator_cuda::{gpu_generator_bench, GpuBenchConfig, GpuBenchReport, GpuError, GpuRuntime};

use super::{exit, EXIT_USAGE};

/// Where to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0.
    Cuda,
    /// The CPU emulator of the kernels (only in builds with the `gpu-emulation` feature).
    Emulated,
}

/// Arguments of `iapt bench-gpu`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to run the kernels.
    #[arg(long, value_enum, default_value_t = Device::Cuda)]
    pub device: Device,
    /// Instruction rows fed per layer.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub rows: usize,
    /// Layers.
    #[arg(long, default_value_t = 32, value_name = "L")]
    pub layers: u32,
    /// Hidden size.
    #[arg(long, default_value_t = 4096, value_name = "D")]
    pub n_embd: u32,
    /// Bottleneck width.
    #[arg(long, default_value_t = 320, value_name = "R")]
    pub bottleneck: u32,
    /// Soft tokens.
    #[arg(long, default_value_t = 4, value_name = "M")]
    pub soft_tokens: u32,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f16", value_name = "DTYPE")]
    pub dtype: String,
    /// Measured repetitions (medians are reported).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub reps: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `iapt bench-gpu`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let Some(dtype) = DType::from_lowercase(&args.dtype) else {
        eprintln!("error: --dtype must be f32, f16 or bf16, not {:?}", args.dtype);
        return Ok(exit(EXIT_USAGE));
    };
    let opened = match args.device {
        Device::Cuda => GpuRuntime::cuda(0),
        Device::Emulated => GpuRuntime::try_emulated(),
    };
    let rt = match opened {
        Ok(rt) => rt,
        Err(e @ (GpuError::CudaUnavailable { .. } | GpuError::CudaNotCompiled | GpuError::EmulationNotCompiled)) => {
            eprintln!("error: {e}");
            return Ok(exit(EXIT_USAGE));
        }
        Err(e) => return Err(e.into()),
    };
    let mut cfg = GpuBenchConfig {
        n_layer: args.layers,
        n_embd: args.n_embd,
        bottleneck: args.bottleneck,
        n_soft_tokens: args.soft_tokens,
        dtype,
        rows: args.rows,
        reps: args.reps,
        ..GpuBenchConfig::default()
    };
    if rt.is_emulated() {
        // The emulator runs every GPU thread as a CPU thread: keep the copy small.
        cfg.copy_bytes = cfg.copy_bytes.min(16 << 20);
    }
    eprintln!(
        "{}: L {} d {} r {} m {} {} weights, {} rows, {} reps",
        rt.describe(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.bottleneck,
        cfg.n_soft_tokens,
        args.dtype,
        cfg.rows,
        cfg.reps
    );
    let r = match gpu_generator_bench(&rt, &cfg) {
        Ok(r) => r,
        Err(e @ (GpuError::BenchConfig { .. } | GpuError::Unsupported { .. })) => {
            eprintln!("error: {e}");
            return Ok(exit(EXIT_USAGE));
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&to_json(&r))?)?;
    } else {
        print_text(&r)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(r: &GpuBenchReport) -> serde_json::Value {
    serde_json::json!({
        "device": r.device, "n_layer": r.n_layer, "n_embd": r.n_embd, "bottleneck": r.bottleneck,
        "n_soft_tokens": r.n_soft_tokens, "dtype": r.dtype, "rows": r.rows, "reps": r.reps,
        "adapter_device_bytes": r.adapter_device_bytes,
        "generator_ms_median": r.generator_ms_median, "generator_ms_min": r.generator_ms_min,
        "down_us_median": r.down_us_median, "down_bytes": r.down_bytes, "down_gbps": r.down_gbps,
        "copy_bytes": r.copy_bytes, "copy_gbps": r.copy_gbps,
    })
}

fn print_text(r: &GpuBenchReport) -> std::io::Result<()> {
    crate::outln!("device: {}", r.device)?;
    crate::outln!(
        "adapter: L {} d {} r {} m {} {} ({:.1} MiB on the device)",
        r.n_layer,
        r.n_embd,
        r.bottleneck,
        r.n_soft_tokens,
        r.dtype,
        r.adapter_device_bytes as f64 / (1 << 20) as f64
    )?;
    crate::outln!(
        "generator, all {} layers, {} rows: {:.3} ms median, {:.3} ms best ({:.1} us per layer)",
        r.n_layer,
        r.rows,
        r.generator_ms_median,
        r.generator_ms_min,
        r.generator_ms_median * 1e3 / r.n_layer as f64
    )?;
    crate::outln!("down-projection kernel: {:.2} us median, {} bytes of W_down: {:.1} GB/s", r.down_us_median, r.down_bytes, r.down_gbps)?;
    crate::outln!("device-to-device copy of {} MiB: {:.1} GB/s (read + written)", r.copy_bytes >> 20, r.copy_gbps)?;
    Ok(())
}
