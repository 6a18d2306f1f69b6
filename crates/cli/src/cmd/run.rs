//! `iapt run`: run a base GGUF model in llama.cpp with an IAPT adapter (or without, `--no-adapter`)
//! and stream the continuation to stdout.
//!
//! The adapter is checked against the base model (architecture, layer count, width) before any
//! decode; a prompt that does not fit the context is refused; `--temp 0` is greedy;
//! `--prompt-tokens` feeds ids as given (no BOS added); `--prompt` uses the model's tokenizer (BOS as
//! the model says, `--chat` applies the model's chat template); `--dump-logits` writes the logits
//! of every generated step as float32 NumPy `[steps, n_vocab]`. Statistics go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};

use crate::fail::Fail;
use crate::files;
use iapt_format::{Adapter, BaseModelInfo};
use iapt_llama::{ContextParams, GenerateOptions, GpuRuntime, KvType, Model, ModelParams, RpcEndpoint, Sampling, Session, SessionOptions};

/// KV cache element type.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KvArg {
    /// 16-bit floats (llama.cpp's default).
    F16,
    /// 32-bit floats.
    F32,
}

/// Where the IAPT generators run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GeneratorDeviceArg {
    /// The CUDA device when the model is offloaded to a GPU, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0 (fails if no CUDA driver or device is usable).
    Cuda,
}

/// Flash attention.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FlashArg {
    /// llama.cpp decides.
    Auto,
    /// On.
    On,
    /// Off.
    Off,
}

/// Arguments shared by every command that runs a base model (`run`, `bench`, `eval`, `demo`): the
/// context settings and where the model's layers go.
#[derive(clap::Args, Debug, Clone)]
pub struct CtxArgs {
    /// Context size in tokens (instruction, soft tokens and response).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub ctx_size: u32,
    /// Threads for llama.cpp and the generator (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Physical micro-batch size (a longer prompt is processed in several ubatches).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub ubatch_size: u32,
    /// KV cache type.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_type: KvArg,
    /// Flash attention.
    #[arg(long, value_enum, default_value = "auto")]
    pub flash_attn: FlashArg,
    /// Layers of the base model to keep on the GPU [default: all when llama.cpp has a GPU backend,
    /// else 0]. Without a GPU backend any value is accepted and everything runs on the CPU.
    #[arg(long, value_name = "N")]
    pub n_gpu_layers: Option<u32>,
    /// Where the IAPT generators run: `auto` is the CUDA device when the model's layers are
    /// offloaded to a GPU and a CUDA driver is usable (else the CPU); `cuda` fails if it is not usable.
    #[arg(long, value_enum, default_value = "auto")]
    pub generator_device: GeneratorDeviceArg,
    /// Spread the base model's layers over RPC workers (`iapt rpc-server` on each), as
    /// HOST:PORT[,HOST:PORT...]; the IAPT generators run in this process. A worker that stops
    /// mid-run ends this command with exit code 1 and a message.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
    /// Show the backend devices, the offload decision and llama.cpp's log on stderr.
    #[arg(long)]
    pub verbose: bool,
}

impl CtxArgs {
    /// Refuses option values no run can use (`--threads 0`), as a usage error.
    pub fn check(&self) -> Result<(), Fail> {
        if self.threads == Some(0) {
            return Err(Fail::usage("--threads 0: the number of threads must be at least 1"));
        }
        if self.ctx_size == 0 || self.ubatch_size == 0 {
            return Err(Fail::usage("--ctx-size and --ubatch-size must be at least 1"));
        }
        Ok(())
    }

    /// The thread count to use.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
    }

    /// The model parameters (`--n-gpu-layers`).
    pub fn model_params(&self) -> ModelParams {
        ModelParams { n_gpu_layers: self.n_gpu_layers }
    }

    /// Loads the base model with [`CtxArgs::model_params`]; with `--verbose`, first says which
    /// devices llama.cpp has and where the layers go. The header is read first, so that a file
    /// that is not a GGUF model (exit 1) or a truncated one (exit 2) is told apart before llama.cpp
    /// reports a generic load failure.
    pub fn load_model(&self, path: &Path) -> anyhow::Result<Model> {
        let mp = self.prepare_model(path)?;
        Ok(Model::load_with(path, &mp)?)
    }

    /// Everything before llama.cpp loads the base model at `path`, for callers that load it
    /// themselves (`serve`, on the engine's thread): reads its header and refuses an architecture
    /// the hook cannot run, adds the `--rpc` workers, and with `--verbose` says where the layers
    /// go. Returns the model parameters to load it with.
    pub fn prepare_model(&self, path: &Path) -> anyhow::Result<ModelParams> {
        let base = BaseModelInfo::read(path).context("cannot read the base model's header")?;
        ensure_supported_arch(&base, path)?;
        self.add_rpc_workers()?;
        let mp = self.model_params();
        if self.verbose {
            eprintln!("{}", super::devices::devices_line());
            let line = offload_line(&mp, iapt_llama::supports_gpu_offload());
            // With --rpc the offload devices are the workers (and any local GPU).
            eprintln!("{}", if self.rpc.is_some() { line.replace("to the GPU", "to the GPU and RPC workers") } else { line });
        }
        Ok(mp)
    }

    /// With `--rpc`: connects to the workers and adds their devices (every layer then goes to them
    /// unless `--n-gpu-layers` says otherwise); a worker that dies later ends the process with
    /// exit code 1 and a message instead of llama.cpp's abort.
    fn add_rpc_workers(&self) -> anyhow::Result<()> {
        let Some(list) = &self.rpc else { return Ok(()) };
        let endpoints = RpcEndpoint::parse_list(list).context("--rpc")?;
        iapt_llama::install_abort_exit();
        iapt_llama::add_rpc_workers(&endpoints).context("--rpc")?;
        if self.verbose {
            let names: Vec<&str> = endpoints.iter().map(RpcEndpoint::as_str).collect();
            eprintln!("rpc: layers go to the workers at {}; the IAPT generators run here", names.join(", "));
        }
        Ok(())
    }

    /// The session options: generator threads and, per `--generator-device`, the GPU runtime.
    pub fn session_options(&self) -> anyhow::Result<SessionOptions> {
        // Layers on RPC workers are not on a local GPU: `auto` keeps the generators on the CPU.
        let offloaded = iapt_llama::supports_gpu_offload() && self.n_gpu_layers != Some(0) && self.rpc.is_none();
        let gpu = match self.generator_device {
            GeneratorDeviceArg::Cpu => None,
            GeneratorDeviceArg::Cuda => Some(GpuRuntime::cuda(0).context("--generator-device cuda")?),
            GeneratorDeviceArg::Auto if offloaded => match GpuRuntime::cuda(0) {
                Ok(rt) => Some(rt),
                Err(e) => {
                    eprintln!("warning: the model is offloaded but the IAPT generators run on the CPU: {e}");
                    None
                }
            },
            GeneratorDeviceArg::Auto => None,
        };
        if self.verbose {
            match &gpu {
                Some(rt) => eprintln!("generator: {}", rt.describe()),
                None => eprintln!("generator: CPU, {} threads", self.threads()),
            }
        }
        Ok(SessionOptions { generator_threads: self.threads(), gpu })
    }

    /// The context parameters.
    pub fn params(&self) -> anyhow::Result<ContextParams> {
        self.check()?;
        Ok(ContextParams {
            n_ctx: self.ctx_size,
            n_batch: self.ctx_size,
            n_ubatch: self.ubatch_size,
            n_threads: i32::try_from(self.threads()).unwrap_or(i32::MAX),
            flash_attn: match self.flash_attn {
                FlashArg::Auto => None,
                FlashArg::On => Some(true),
                FlashArg::Off => Some(false),
            },
            kv_type: match self.kv_type {
                KvArg::F16 => KvType::F16,
                KvArg::F32 => KvType::F32,
            },
            n_seq_max: 1,
        })
    }
}

/// Where the layers go, in words (printed by `--verbose`).
pub fn offload_line(mp: &ModelParams, gpu: bool) -> String {
    match (mp.n_gpu_layers, gpu) {
        (None, true) => "offload: every layer to the GPU (default; --n-gpu-layers N to keep fewer there)".to_owned(),
        (None, false) => "offload: none, this llama.cpp has no GPU backend; running on the CPU".to_owned(),
        (Some(0), _) => "offload: none (--n-gpu-layers 0); running on the CPU".to_owned(),
        (Some(n), true) => format!("offload: {n} layers to the GPU (--n-gpu-layers {n}; more than the model has means all)"),
        (Some(n), false) => {
            format!("offload: none, this llama.cpp has no GPU backend, so --n-gpu-layers {n} has no effect; running on the CPU")
        }
    }
}

/// Arguments of `iapt run`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("adapter_choice").required(true).args(["adapter", "no_adapter"])))]
#[command(group(clap::ArgGroup::new("prompt_choice").required(true).args(["prompt", "prompt_tokens"])))]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// The IAPT adapter (.gguf or .safetensors).
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// Run the base model alone.
    #[arg(long)]
    pub no_adapter: bool,
    /// The prompt text, tokenized with the model's tokenizer.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids, fed as given (no BOS added).
    #[arg(long, value_name = "1,2,3", value_delimiter = ',', num_args = 1..)]
    pub prompt_tokens: Option<Vec<i32>>,
    /// Wrap the prompt in the model's chat template (with --prompt).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub n_predict: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_name = "T")]
    pub temp: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u64,
    /// Write the logits of every generated step as float32 NumPy [steps, n_vocab].
    #[arg(long, value_name = "OUT.npy")]
    pub dump_logits: Option<PathBuf>,
    /// Context settings.
    #[command(flatten)]
    pub ctx: CtxArgs,
}

/// Opens an adapter and checks it against the base model's GGUF header (before loading weights).
/// Both files are expected to have passed `crate::files::input`.
pub fn open_adapter(adapter: &std::path::Path, model: &std::path::Path) -> anyhow::Result<Adapter> {
    let a = match Adapter::open(adapter) {
        Ok(a) => a,
        Err(iapt_format::FormatError::Invalid { report, .. }) => {
            return Err(Fail::invalid(format!("cannot use adapter {}: not a valid IAPT adapter:\n{report}", adapter.display())).into())
        }
        Err(e) => return Err(Fail::unreadable(format!("cannot use adapter {}: {e}", adapter.display())).into()),
    };
    let base = BaseModelInfo::read(model).context("cannot read the base model's header")?;
    ensure_supported_arch(&base, model)?;
    let findings = base.check(a.config());
    if !findings.is_empty() {
        let lines: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
        bail!("adapter {} does not match base model {}: {}", adapter.display(), model.display(), lines.join("; "));
    }
    Ok(a)
}

/// Refuses a base model whose architecture the IAPT hook does not support, naming the supported
/// ones (llama.cpp's `general.architecture` names).
pub fn ensure_supported_arch(base: &BaseModelInfo, model: &std::path::Path) -> anyhow::Result<()> {
    if iapt_llama::arch_spec(&base.arch).is_none() {
        bail!(
            "base model {} has architecture {:?}, which the IAPT hook does not support (supported architectures, llama.cpp's names: {})",
            model.display(),
            base.arch,
            iapt_llama::supported_archs()
        );
    }
    Ok(())
}

/// Tokenizes a text prompt with the model's tokenizer (BOS as the model says); with `chat`, wrapped
/// in the model's chat template first, its special tokens parsed.
pub fn prompt_tokens(model: &Model, text: &str, chat: bool) -> anyhow::Result<Vec<iapt_llama::Token>> {
    let text = if chat { model.apply_chat_template(text)? } else { text.to_owned() };
    Ok(model.tokenize(&text, true, chat)?)
}

/// `N tok/s`, or `n/a` where nothing was timed (`--n-predict 0` prefills nothing; one generated
/// token has no decode step).
pub fn rate(tokens: usize, time: std::time::Duration) -> String {
    if tokens == 0 || time.is_zero() {
        "n/a".to_owned()
    } else {
        format!("{:.1} tok/s", tokens as f64 / time.as_secs_f64())
    }
}

/// Runs `iapt run`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    if !args.temp.is_finite() || args.temp < 0.0 {
        return Err(Fail::usage("--temp must be a finite number >= 0").into());
    }
    let params = args.ctx.params()?;
    let mut inputs = vec![files::input("the base model", &args.model)?];
    if let Some(a) = &args.adapter {
        inputs.push(files::input("the adapter", a)?);
    }
    if let Some(out) = &args.dump_logits {
        files::output("--dump-logits", out, &["npy"], &inputs)?;
    }
    let adapter = match &args.adapter {
        Some(p) => Some(open_adapter(p, &args.model)?),
        None => None,
    };
    let model = args.ctx.load_model(&args.model)?;
    let tokens = match (&args.prompt, &args.prompt_tokens) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => prompt_tokens(&model, text, args.chat)?,
        (None, None) => bail!("give --prompt or --prompt-tokens"),
    };
    let adapters: Vec<&Adapter> = adapter.iter().collect();
    let mut session = Session::with_adapters(&model, &adapters, &params, &args.ctx.session_options()?)?;
    let opts = GenerateOptions {
        n_predict: args.n_predict,
        sampling: Sampling::from_temp(args.temp, args.seed),
        stop_at_eog: true,
        keep_logits: args.dump_logits.is_some(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let g = session.generate(&tokens, &opts, &mut |t| {
        if write_err.is_none() {
            if let Err(e) = out.write_all(&model.token_bytes(t)).and_then(|()| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out).context("writing to stdout")?;
    drop(out);
    if let Some(path) = &args.dump_logits {
        let n_vocab = model.n_vocab();
        let flat: Vec<f32> = g.logits.iter().flatten().copied().collect();
        iapt_format::write_atomically(path, |w| iapt_npy::write_f32(w, &[g.logits.len(), n_vocab], &flat).map_err(std::io::Error::other))?;
    }
    eprintln!(
        "[{} prompt tokens + {} soft tokens; prefill {}; {} generated, decode {}{}]",
        tokens.len(),
        session.n_soft_tokens(),
        rate(g.prefill_tokens, g.prefill_time),
        g.tokens.len(),
        rate(g.tokens.len().saturating_sub(1), g.decode_time),
        if g.stopped_at_eog { "; stopped at end of generation" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
