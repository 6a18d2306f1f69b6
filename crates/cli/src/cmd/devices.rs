//! `iapt devices [--json]`: the backend devices this build's llama.cpp sees (ggml's device list)
//! and whether layers can be offloaded to a GPU. A CPU-only build prints `devices: CPU`; a build
//! linked against a CUDA-enabled `libggml` prints e.g. `devices: CUDA0 (NVIDIA H200); CPU`.
//! `iapt run|bench|eval|demo --verbose` print the same line before loading the model. It also says
//! where the IAPT generator can run in this build: on CUDA (compiled in, and whether device 0 is
//! usable, or why not) and on the kernels' CPU emulator.

use std::process::ExitCode;

use iapt_llama::{Device, DeviceKind, GpuRuntime};

/// Arguments of `iapt devices`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object: {"gpu_offload": bool, "devices": [{"name", "description", "type",
    /// "memory_free", "memory_total"}], "generator": {"cuda_compiled": bool, "emulation_compiled":
    /// bool, "cuda": DESCRIPTION or null, "cuda_unavailable": REASON or null}}.
    #[arg(long)]
    pub json: bool,
    /// Show llama.cpp's log on stderr (backend initialisation).
    #[arg(long)]
    pub verbose: bool,
}

/// `devices: A; B (desc); ...` for the current process.
pub fn devices_line() -> String {
    let list: Vec<String> = iapt_llama::devices().iter().map(Device::to_string).collect();
    if list.is_empty() {
        "devices: none reported by llama.cpp".to_owned()
    } else {
        format!("devices: {}", list.join("; "))
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Runs `iapt devices`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.verbose);
    let devices = iapt_llama::devices();
    let gpu = iapt_llama::supports_gpu_offload();
    if args.json {
        let list: Vec<serde_json::Value> = devices
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "description": d.description,
                    "type": d.kind.as_str(),
                    "memory_free": d.memory_free,
                    "memory_total": d.memory_total,
                })
            })
            .collect();
        crate::outln!("{}", serde_json::json!({ "gpu_offload": gpu, "devices": list, "generator": generator_json() }))?;
        return Ok(ExitCode::SUCCESS);
    }
    crate::outln!("{}", devices_line())?;
    for d in &devices {
        crate::outln!(
            "  {:<8} {:<5} {:.1} GiB free of {:.1} GiB  {}",
            d.name,
            d.kind.as_str(),
            gib(d.memory_free),
            gib(d.memory_total),
            d.description
        )?;
    }
    let has_gpu = devices.iter().any(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu));
    crate::outln!(
        "GPU offload: {}",
        match (gpu, has_gpu) {
            (true, _) => "supported (models load with every layer on the GPU unless --n-gpu-layers says otherwise)",
            (false, true) => "not supported by this build although a GPU device is listed",
            (false, false) =>
                "not available (no GPU backend in this llama.cpp; build with the `cuda` feature or link a CUDA-enabled libggml)",
        }
    )?;
    match GpuRuntime::cuda(0) {
        Ok(rt) => crate::outln!("IAPT generator: CPU, or CUDA on {}", rt.describe())?,
        Err(e) => crate::outln!("IAPT generator: CPU (CUDA: {e})")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the generator can run in this build (`"generator"` of the JSON output).
fn generator_json() -> serde_json::Value {
    let (cuda, why) = match GpuRuntime::cuda(0) {
        Ok(rt) => (Some(rt.describe()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    serde_json::json!({
        "cuda_compiled": iapt_generator_cuda::CUDA_COMPILED,
        "emulation_compiled": iapt_generator_cuda::EMULATION_COMPILED,
        "cuda": cuda,
        "cuda_unavailable": why,
    })
}
