//! `iapt`: the IAPT toolkit's command line.
//!
//! Exit codes (every subcommand; the classification is in [`fail`]):
//! - 0: success (for `validate`: the file is valid); also a closed stdout (`iapt inspect A | head`);
//! - 1: invalid input or failure (for `validate`: the file is invalid; elsewhere: bad input content,
//!   incompatible files, a refused pickle, a failed run);
//! - 2: usage error (options, output paths) or an unreadable input file;
//! - 130 / 143: interrupted by SIGINT / SIGTERM (temporary files removed, see [`interrupt`]); `serve` stops gracefully and exits 0 instead.

mod args;
mod cmd;
mod fail;
mod files;
mod interrupt;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// IAPT adapters from PyTorch training to llama.cpp inference.
#[derive(Parser)]
#[command(name = "iapt", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show an adapter's config, tensor table, parameter count and size.
    Inspect(cmd::inspect::Args),
    /// Check an adapter against every rule of spec v1 (exit 0 valid, 1 invalid, 2 unreadable).
    Validate(cmd::validate::Args),
    /// Re-write an adapter in the container named by the output's extension (.safetensors or .gguf).
    Pack(cmd::pack::Args),
    /// Convert a trained PyTorch checkpoint (torch.save, safetensors, sharded) to an adapter; never runs a pickle.
    Convert(cmd::convert::Args),
    /// Run the soft-prompt generator on NumPy hidden states (H.npy -> P.npy), e.g. to compare with training code.
    Generate(cmd::generate::Args),
    /// Run a base GGUF model in llama.cpp with an IAPT adapter (or --no-adapter) and stream the continuation.
    Run(cmd::run::Args),
    /// Multi-tenant serving: several resident adapters, JSON-lines requests decoded together, each with its own adapter.
    Batch(cmd::batch::Args),
    /// An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, streaming; the request's `model` picks the adapter.
    Serve(Box<cmd::serve::Args>),
    /// Prefill and decode throughput, base vs IAPT, side by side with the same context settings.
    Bench(cmd::bench::Args),
    /// Micro-benchmark of the GPU generator on a random adapter (exit 2 when no CUDA device is usable).
    BenchGpu(cmd::bench_gpu::Args),
    /// Quantize a base GGUF model with llama.cpp (q8_0, q4_k_m, f16); the output is written atomically.
    Quantize(cmd::quantize::Args),
    /// Exact-match accuracy of a base model with an IAPT adapter (and without: --no-adapter-too) on a JSON-lines data set.
    Eval(cmd::eval::Args),
    /// The embedded demo: held-out instructions answered by the base model without and with the committed adapter.
    Demo(cmd::demo::Args),
    /// The backend devices llama.cpp sees (CPU, CUDA0, ...) and whether layers can go to a GPU.
    Devices(cmd::devices::Args),
    /// Serve this machine's devices to `--rpc` clients (llama.cpp's RPC backend); loopback only unless told otherwise.
    RpcServer(cmd::rpc_server::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` handles SIGINT/SIGTERM itself (graceful stop, exit 0) and writes no files.
    if !matches!(cli.command, Command::Serve(_)) {
        interrupt::install();
    }
    let result = match &cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Pack(a) => cmd::pack::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Batch(a) => cmd::batch::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::BenchGpu(a) => cmd::bench_gpu::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Devices(a) => cmd::devices::run(a),
        Command::RpcServer(a) => cmd::rpc_server::run(a),
    };
    result.unwrap_or_else(|e| fail::report(&e))
}
