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
use iapt_server::{Limits, ServerConfig, DEFAULT_BODY_LIMIT, DEFAULT_GRACE};

use super::{exit, EXIT_USAGE};
use crate::args::{AdapterArgs, ChatArgs, EngineArgs, EngineShape, RuntimeArgs};

/// Arguments of `iapt serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// Serve the adapters of this directory on demand: `model` = NAME loads DIR/NAME.iapt.gguf,
    /// NAME.iapt.safetensors, NAME.gguf or NAME.safetensors on its first request; also allows
    /// POST /v1/adapters and DELETE /v1/adapters/NAME, for files inside it only.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Adapters resident at once; more evict the least recently used one that no prefill uses
    /// (adapters given with --adapter and --pin are never evicted). Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_resident_adapters: Option<usize>,
    /// MiB of resident adapter weights at most (as stored: an F16 adapter costs its file size);
    /// evicts as --max-resident-adapters does. Default: no limit.
    #[arg(long, value_name = "MIB")]
    pub adapter_memory: Option<usize>,
    /// Load this adapter of --adapter-dir at start and never evict it (repeat for several).
    #[arg(long, value_name = "NAME")]
    pub pin: Vec<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to bind (0: any free port, printed in the ready line).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Requests that may wait for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on the inference routes. A key on the command line is
    /// visible in `ps`: prefer --api-key-file or the IAPT_API_KEY environment variable.
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The key of the admin routes (POST/DELETE /v1/adapters, /metrics); an inference key cannot use
    /// them. With an API key and no admin key they are off. Also IAPT_ADMIN_KEY.
    #[arg(long, value_name = "KEY", conflicts_with = "admin_key_file")]
    pub admin_key: Option<String>,
    /// Read the admin key from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// A `Host` name a server without keys also answers (besides localhost, 127.0.0.1, ::1 and
    /// --host); repeat for several. Other names get 403 (a defence against DNS rebinding).
    #[arg(long, value_name = "NAME")]
    pub allowed_host: Vec<String>,
    /// Connections open at once; more wait in the kernel's backlog.
    #[arg(long, default_value_t = iapt_server::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head (slow or idle clients are closed after it).
    #[arg(long, default_value_t = iapt_server::DEFAULT_HEADER_TIMEOUT.as_secs_f64(), value_name = "S")]
    pub header_timeout: f64,
    /// Seconds a request body may take to arrive (408 after it).
    #[arg(long, default_value_t = iapt_server::DEFAULT_BODY_TIMEOUT.as_secs_f64(), value_name = "S")]
    pub body_timeout: f64,
    /// Seconds one engine step (one decode) may take before the server reports the engine as hung
    /// (/health 503) and exits 1 for its supervisor (a hung RPC worker: ggml's RPC has no timeout).
    #[arg(long, default_value_t = iapt_server::DEFAULT_STEP_TIMEOUT.as_secs_f64(), value_name = "S")]
    pub step_timeout: f64,
    /// The base model's id in `model` fields [default: the model's file stem].
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
    /// Request bodies larger than this many bytes get 413.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT, value_name = "BYTES")]
    pub max_body: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = DEFAULT_GRACE.as_secs(), value_name = "S")]
    pub grace: u64,
    /// The template of /v1/chat/completions.
    #[command(flatten)]
    pub template: ChatArgs,
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

/// Threads of the server's blocking pool (calls into the engine, adapter parsing).
const BLOCKING_THREADS: usize = 32;

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

/// A key from the flag, else the file, else the environment variable; an empty key is refused
/// (it would turn authentication off), as is an unreadable file.
fn key(flag: &Option<String>, file: &Option<PathBuf>, env: &str, what: &str) -> Result<Option<String>, String> {
    let (key, source) = match (flag, file) {
        (Some(k), _) => (k.clone(), format!("--{what}")),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| format!("--{what}-file {}: {e}", f.display()))?;
            (text.lines().next().unwrap_or("").trim().to_owned(), format!("--{what}-file {}", f.display()))
        }
        (None, None) => match std::env::var(env) {
            Ok(k) => (k, env.to_owned()),
            Err(_) => return Ok(None),
        },
    };
    if key.trim().is_empty() {
        return Err(format!("{source}: the key is empty, which would turn authentication off; give a non-empty key, or none"));
    }
    Ok(Some(key))
}

/// Whether `host` is a loopback address or name.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_matches(|c| c == '[' || c == ']');
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn seconds(v: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| format!("{flag} {v}: give a positive number of seconds"))
}

/// The server settings from the options, or a usage error.
fn config(args: &Args, model_params: iapt_llama::ModelParams) -> Result<ServerConfig, String> {
    let mut shape = EngineShape::from_args(&args.engine, args.queue).map_err(|f| f.message)?;
    if args.max_resident_adapters == Some(0) || args.adapter_memory == Some(0) {
        return Err("--max-resident-adapters and --adapter-memory must be at least 1".to_owned());
    }
    shape.adapter_cache =
        iapt_engine::AdapterCache { max_resident: args.max_resident_adapters, max_bytes: args.adapter_memory.map(|m| m << 20) };
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
    args.template.check().map_err(|f| f.message)?;
    let engine = args.ctx.engine_config(shape).map_err(|e| format!("{e:#}"))?;
    let api_key = key(&args.api_key, &args.api_key_file, "IAPT_API_KEY", "api-key")?;
    let admin_key = key(&args.admin_key, &args.admin_key_file, "IAPT_ADMIN_KEY", "admin-key")?;
    if args.max_connections == 0 {
        return Err("--max-connections must be at least 1".to_owned());
    }
    let limits = Limits { max_connections: args.max_connections, header_timeout: seconds(args.header_timeout, "--header-timeout")? };
    let body_timeout = seconds(args.body_timeout, "--body-timeout")?;
    let step_timeout = seconds(args.step_timeout, "--step-timeout")?;
    if api_key.is_none() && admin_key.is_none() && !is_loopback(&args.host) {
        eprintln!(
            "WARNING: iapt serve binds {} with no API key: anyone who can reach this address can use the model{}. \
             Give --api-key-file (or IAPT_API_KEY), or bind 127.0.0.1.",
            args.host,
            if args.adapter_dir.is_some() { " and load adapters from --adapter-dir" } else { "" }
        );
    }
    let stem = args.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".to_owned());
    let spec = EngineSpec { model: args.model.clone(), model_params, config: engine, adapters };
    Ok(ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key,
        admin_key,
        allowed_hosts: args.allowed_host.clone(),
        limits,
        body_timeout,
        step_timeout,
        adapter_dir: args.adapter_dir.clone(),
        pins: args.pin.clone(),
        chat_template: args.template.chat_template.clone(),
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
    // The blocking pool runs the handlers' calls into the engine (each waits for a step boundary):
    // bounded, so a burst of requests queues for a thread instead of starting hundreds of them.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let model_path = args.model.display().to_string();
    let served = rt.block_on(iapt_server::serve(config, stop_signal(), |r| {
        let adapters = if r.adapters.is_empty() { "none".to_owned() } else { r.adapters.join(", ") };
        // A closed stdout must not stop the server: the line is informational.
        let _ =
            crate::outln!("iapt serve: listening on http://{} (model {:?} from {model_path}; adapters: {adapters})", r.addr, r.model_id);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        match &r.chat {
            Ok(origin) => eprintln!("iapt serve: chat template: {origin}"),
            Err(why) => eprintln!("iapt serve: /v1/chat/completions is off: {why}"),
        }
    }));
    rt.shutdown_timeout(Duration::from_secs(1));
    served?;
    eprintln!("iapt serve: stopped");
    Ok(ExitCode::SUCCESS)
}
