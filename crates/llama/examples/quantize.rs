//! Quantizes a GGUF model with llama.cpp's `llama_model_quantize` (used to make the benchmark model).
//!
//! Usage: `cargo run --release -p iapt-llama --example quantize -- IN.gguf OUT.gguf q4_k_m|q8_0|f16`

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: quantize IN.gguf OUT.gguf q4_k_m|q8_0|f16");
        return ExitCode::from(2);
    }
    let quant = match args[3].as_str() {
        "q4_k_m" => iapt_llama::Quant::Q4KM,
        "q8_0" => iapt_llama::Quant::Q8_0,
        "f16" => iapt_llama::Quant::F16,
        other => {
            eprintln!("unknown type {other}; use q4_k_m, q8_0 or f16");
            return ExitCode::from(2);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    match iapt_llama::quantize(Path::new(&args[1]), Path::new(&args[2]), quant, threads) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
