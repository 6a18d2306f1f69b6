//! `iapt serve --model BASE.gguf [--adapter NAME=PATH]... [--adapter-dir DIR]`: an OpenAI-compatible
//! HTTP server (`iapt-server`) on the engine; a request's `model` picks the adapter (the base
//! model's id, `--alias` or the file stem, runs it alone).
//!
//! Binds 127.0.0.1:8080 unless told otherwise (`--port 0`: any free port). Prints one line on
//! stdout when ready: `iapt serve: listening on http://ADDR (model "ID"; adapters: ...)`. SIGINT or
//! SIGTERM: stops accepting, gives in-flight requests a grace period, exits 0. Exit 1 when the model
//! or an adapter cannot be loaded or the address cannot be bound, 2 on a bad option or missing file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use iapt_engine::EngineSpec;
use iapt_server::{ServerConfig, DEFAULT_BODY_LIMIT, DEFAULT_GRACE};

use super::{exit, EXIT_USAGE};
use crate::args::{AdapterArgs, EngineArgs, EngineShape, RuntimeArgs};

/// Arguments of `iapt serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// Allow POST /v1/adapters and DELETE /v1/adapters/NAME, for files inside this directory only.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to bind (0: any free port, printed in the ready line).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Requests that may wait for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The base model's id in `model` fields [default: the model's file stem].
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
    /// Request bodies larger than this many bytes get 413.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT, value_name = "BYTES")]
    pub max_body: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = DEFAULT_GRACE.as_secs(), value_name = "S")]
    pub grace: u64,
    /// Adapters loaded at start.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Model and context (`--ctx-size` is shared by the running sequences).
    #[command(flatten)]
    pub ctx: RuntimeArgs,
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn stop_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    exit(EXIT_USAGE)
}

/// The server settings from the options, or a usage error.
fn config(args: &Args, model_params: iapt_llama::ModelParams) -> Result<ServerConfig, String> {
    let shape = EngineShape::from_args(&args.engine, args.queue).map_err(|f| f.message)?;
    if !args.model.is_file() {
        return Err(format!("{}: no such model file", args.model.display()));
    }
    let adapters = args.adapters.named().map_err(|f| f.message)?;
    if let Some((_, path)) = adapters.iter().find(|(_, p)| !p.is_file()) {
        return Err(format!("{}: no such adapter file", path.display()));
    }
    if let Some(d) = args.adapter_dir.as_ref().filter(|d| !d.is_dir()) {
        return Err(format!("--adapter-dir {}: no such directory", d.display()));
    }
    let engine = args.ctx.engine_config(shape).map_err(|e| format!("{e:#}"))?;
    let stem = args.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".to_owned());
    let spec = EngineSpec { model: args.model.clone(), model_params, config: engine, adapters };
    Ok(ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        adapter_dir: args.adapter_dir.clone(),
        body_limit: args.max_body,
        grace: Duration::from_secs(args.grace),
        ..ServerConfig::new(spec, args.alias.clone().unwrap_or(stem))
    })
}

/// Runs `iapt serve`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    // Header, architecture and --rpc workers here (their errors keep their exit codes); the
    // engine's thread then loads the model.
    let model_params = args.ctx.prepare_model(&args.model)?;
    let config = match config(args, model_params) {
        Ok(c) => c,
        Err(msg) => return Ok(usage_error(&msg)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let model_path = args.model.display().to_string();
    let served = rt.block_on(iapt_server::serve(config, stop_signal(), |r| {
        let adapters = if r.adapters.is_empty() { "none".to_owned() } else { r.adapters.join(", ") };
        // A closed stdout must not stop the server: the line is informational.
        let _ =
            crate::outln!("iapt serve: listening on http://{} (model {:?} from {model_path}; adapters: {adapters})", r.addr, r.model_id);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }));
    rt.shutdown_timeout(Duration::from_secs(1));
    served?;
    eprintln!("iapt serve: stopped");
    Ok(ExitCode::SUCCESS)
}
