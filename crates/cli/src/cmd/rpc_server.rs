//! `iapt rpc-server [--host 127.0.0.1] [--port 50052] [--threads N] [--cache DIR]`: serves this
//! machine's devices (every GPU, else the CPU) to llama.cpp RPC clients, as llama.cpp's own
//! `rpc-server` does, so `iapt run|batch|bench|eval --rpc HOST:PORT,...` can put a base model's
//! layers on several machines with no second toolchain. Runs until stopped (Ctrl-C, SIGTERM).
//!
//! The RPC protocol has no authentication or encryption, and llama.cpp says never to expose it to
//! an untrusted network: the worker binds the loopback unless `--host` says otherwise, and then
//! prints a warning.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use iapt_llama::RpcEndpoint;

/// Arguments of `iapt rpc-server`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on. Anything but a loopback address exposes an unauthenticated protocol
    /// that can run arbitrary graphs and read and write this machine's model memory.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052, value_name = "PORT")]
    pub port: u16,
    /// CPU threads for the served CPU backend (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Folder where the worker caches tensors sent to it (large tensors are then sent once per
    /// machine, as a hash, on later runs).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Show llama.cpp's log on stderr.
    #[arg(long)]
    pub verbose: bool,
}

/// Runs `iapt rpc-server`; returns only when the worker cannot start.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.verbose);
    let endpoint = RpcEndpoint::parse(&format!("{}:{}", args.host, args.port)).context("--host/--port")?;
    if !endpoint.is_loopback() {
        eprintln!(
            "warning: listening on {endpoint}: the RPC protocol has no authentication; never expose it to an untrusted network \
             (bind 127.0.0.1 and tunnel, or firewall the port)"
        );
    }
    if let Some(dir) = &args.cache {
        std::fs::create_dir_all(dir).with_context(|| format!("--cache {}", dir.display()))?;
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    eprintln!("iapt rpc-server: serving on {endpoint} with {threads} threads (Ctrl-C to stop)");
    iapt_llama::rpc_worker_serve(&endpoint, args.cache.as_deref(), threads)?;
    Ok(ExitCode::SUCCESS)
}
