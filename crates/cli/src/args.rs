//! The option groups that several commands share, each declared once and flattened into the
//! commands that take it, and the one place that turns options into an engine configuration
//! ([`RuntimeArgs::engine_config`]):
//!
//! - [`RuntimeArgs`]: the context and where things run (every command that evaluates a model:
//!   `run`, `batch`, `serve`, `bench`, `eval`, `demo`);
//! - [`EngineArgs`]: how many sequences run at once and the tokens per step (`batch`, `serve`);
//! - [`SamplingArgs`]: llama.cpp's sampler chain, with llama-cli's defaults (`run`, `batch`);
//! - [`AdapterArgs`]: resident adapters by name (`batch`, `serve`).
//!
//! Plus the checks every model command makes before llama.cpp loads anything
//! ([`open_adapter`], [`ensure_supported_arch`]) and text prompts ([`prompt_tokens`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use iapt_engine::{AdapterCache, ChatError, ChatTemplate, EngineConfig};
use iapt_format::{Adapter, BaseModelInfo};
use iapt_llama::{GpuRuntime, KvType, Model, ModelParams, RpcEndpoint, SamplerSettings, Token};

use crate::fail::Fail;

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

/// The context and where things run: every command that evaluates a base model.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Model and context")]
pub struct RuntimeArgs {
    /// Context size in tokens (shared by the running sequences: each has ctx-size / parallel).
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

/// How many sequences run at once and how many tokens a step decodes (`batch`, `serve`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Engine")]
pub struct EngineArgs {
    /// Sequences running at once (llama.cpp sequence slots, 1..=256); each has ctx-size / parallel
    /// tokens of context.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// Tokens decoded per step at most (decode tokens first, then prefill chunks).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub batch_tokens: usize,
    /// A step in which a prompt's prefill completes ends right after it once the step holds N
    /// rows: its first token is not held back by other prompts' chunks (short prefills such as
    /// prefix-cache hits then answer one after another, not in bursts of a full step). 0: every
    /// step fills up to --batch-tokens.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub min_step_rows: usize,
    /// One KV cache shared by all sequences (llama-server's --kv-unified). Default: one stream per
    /// sequence, whose attention then reads only its own cells (faster with many in flight).
    #[arg(long)]
    pub kv_unified: bool,
    /// MiB the prefix cache may hold (0: off): instruction KV copies shared by every adapter and
    /// the base, and each adapter's pooling of them, reused by later requests with the same prompt
    /// prefix (least recently used entries evicted first).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub cache_mib: usize,
}

/// llama.cpp's sampler chain (`run`, `batch`): penalties, top-k, top-p, min-p, temperature, then a
/// seeded draw; `--temp 0` is greedy. The defaults are llama-cli's.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_name = "T")]
    pub temp: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40, value_name = "K")]
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set of tokens with probability >= P (1: off).
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    pub min_p: f32,
    /// Repetition penalty over the last 64 tokens (1: off).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repeat_penalty: f32,
    /// Seed of the draw (0 ..= 4294967295).
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u32,
}

impl SamplingArgs {
    /// The sampler chain's settings, checked (a usage error names the option and its rule).
    pub fn settings(&self) -> Result<SamplerSettings, Fail> {
        let s = SamplerSettings {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplerSettings::default()
        };
        s.validate().map_err(|e| {
            let flag = match e.field {
                "temperature" => "--temp".to_owned(),
                f => format!("--{}", f.replace('_', "-")),
            };
            Fail::usage(format!("{flag} {}: must be {}", e.value, e.rule))
        })?;
        Ok(s)
    }
}

/// Resident adapters by name (`batch`, `serve`).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Adapters")]
pub struct AdapterArgs {
    /// A resident adapter, `NAME=PATH` or `PATH` (named by its file stem); repeat for several.
    #[arg(long, value_name = "[NAME=]ADAPTER")]
    pub adapter: Vec<String>,
}

impl AdapterArgs {
    /// The `(name, path)` pairs; an empty name or a name given twice is a usage error.
    pub fn named(&self) -> Result<Vec<(String, PathBuf)>, Fail> {
        let mut out: Vec<(String, PathBuf)> = Vec::with_capacity(self.adapter.len());
        for a in &self.adapter {
            let (name, path) = parse_adapter_arg(a)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(Fail::usage(format!("adapter name {name:?} given twice; name them NAME=PATH")));
            }
            out.push((name, path));
        }
        Ok(out)
    }
}

/// `NAME=PATH` or `PATH` (named by its stem); an empty NAME is a usage error.
pub fn parse_adapter_arg(arg: &str) -> Result<(String, PathBuf), Fail> {
    match arg.split_once('=') {
        Some(("", _)) => Err(Fail::usage(format!("--adapter {arg}: the name before '=' is empty; give NAME=PATH, or PATH alone"))),
        Some((name, path)) if !name.contains('/') => Ok((name.to_owned(), PathBuf::from(path))),
        _ => {
            let path = PathBuf::from(arg);
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| arg.to_owned());
            Ok((name, path))
        }
    }
}

/// The shape of the engine a command runs: sequences at once, tokens per step, queue length.
#[derive(Debug, Clone, Copy)]
pub struct EngineShape {
    /// Sequences at once.
    pub parallel: usize,
    /// Tokens per step (0: the whole per-sequence context, so a prompt is one decode).
    pub batch_tokens: usize,
    /// See [`EngineArgs::min_step_rows`] (0: off).
    pub min_step_rows: usize,
    /// Requests that may wait.
    pub queue: usize,
    /// One KV cache for all sequences.
    pub kv_unified: bool,
    /// Bounds on the resident adapters (`serve`).
    pub adapter_cache: AdapterCache,
    /// Bytes of the prefix cache (0: off).
    pub prefix_cache_bytes: usize,
}

impl EngineShape {
    /// One request at a time, its whole prompt in one decode (`run`, `bench`, `eval`, `demo`).
    pub const SINGLE: EngineShape = EngineShape {
        parallel: 1,
        batch_tokens: 0,
        min_step_rows: 0,
        queue: 1,
        kv_unified: false,
        adapter_cache: AdapterCache { max_resident: None, max_bytes: None },
        prefix_cache_bytes: 0,
    };

    /// From the engine options (`batch`, `serve`), with `queue` waiting requests.
    pub fn from_args(e: &EngineArgs, queue: usize) -> Result<EngineShape, Fail> {
        if e.parallel == 0 || e.parallel > 256 || e.batch_tokens == 0 || queue == 0 {
            return Err(Fail::usage(
                "--parallel must be between 1 and 256 (llama.cpp's sequence limit), --batch-tokens and --queue at least 1",
            ));
        }
        Ok(EngineShape {
            parallel: e.parallel,
            batch_tokens: e.batch_tokens.max(e.parallel),
            min_step_rows: e.min_step_rows,
            queue,
            kv_unified: e.kv_unified,
            adapter_cache: AdapterCache::default(),
            prefix_cache_bytes: e.cache_mib.saturating_mul(1 << 20),
        })
    }
}

impl RuntimeArgs {
    /// Refuses option values no run can use (`--threads 0`), as a usage error.
    pub fn check(&self) -> Result<(), Fail> {
        if self.threads == Some(0) {
            return Err(Fail::usage("--threads 0: the number of threads must be at least 1"));
        }
        if self.ctx_size < 2 || self.ubatch_size == 0 {
            return Err(Fail::usage("--ctx-size must be at least 2 and --ubatch-size at least 1"));
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

    /// Loads the base model (see [`RuntimeArgs::prepare_model`]).
    pub fn load_model(&self, path: &Path) -> anyhow::Result<Model> {
        let mp = self.prepare_model(path)?;
        Ok(Model::load_with(path, &mp)?)
    }

    /// Everything before llama.cpp loads the base model at `path`: reads its header and refuses an
    /// architecture the hook cannot run (a file that is not a GGUF model, exit 1, or a truncated
    /// one, exit 2, is told apart before llama.cpp reports a generic load failure), adds the
    /// `--rpc` workers, and with `--verbose` says where the layers go. Returns the model
    /// parameters to load it with (`serve` loads it on the engine's thread).
    pub fn prepare_model(&self, path: &Path) -> anyhow::Result<ModelParams> {
        let base = BaseModelInfo::read(path).context("cannot read the base model's header")?;
        ensure_supported_arch(&base, path)?;
        self.add_rpc_workers()?;
        let mp = self.model_params();
        if self.verbose {
            eprintln!("{}", crate::cmd::devices::devices_line());
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

    /// The GPU runtime the generators run on, per `--generator-device` (`None`: the CPU).
    fn generator_runtime(&self) -> anyhow::Result<Option<std::sync::Arc<GpuRuntime>>> {
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
        Ok(gpu)
    }

    /// The engine configuration for `shape`: the one place options become an [`EngineConfig`].
    pub fn engine_config(&self, shape: EngineShape) -> anyhow::Result<EngineConfig> {
        self.check()?;
        let parallel = shape.parallel.max(1);
        let seq_ctx = self.ctx_size as usize / parallel;
        if seq_ctx < 2 {
            return Err(Fail::usage(format!(
                "--ctx-size {} shared by --parallel {parallel} leaves less than 2 tokens per sequence",
                self.ctx_size
            ))
            .into());
        }
        let batch_tokens = if shape.batch_tokens == 0 { seq_ctx.max(parallel) } else { shape.batch_tokens };
        Ok(EngineConfig {
            parallel,
            seq_ctx,
            batch_tokens,
            min_step_rows: shape.min_step_rows,
            n_ubatch: self.ubatch_size as usize,
            queue_capacity: shape.queue.max(1),
            n_threads: i32::try_from(self.threads()).unwrap_or(i32::MAX),
            kv_type: match self.kv_type {
                KvArg::F16 => KvType::F16,
                KvArg::F32 => KvType::F32,
            },
            flash_attn: match self.flash_attn {
                FlashArg::Auto => None,
                FlashArg::On => Some(true),
                FlashArg::Off => Some(false),
            },
            kv_unified: shape.kv_unified,
            adapter_cache: shape.adapter_cache,
            prefix_cache_bytes: shape.prefix_cache_bytes,
            generator_threads: self.threads(),
            gpu: self.generator_runtime()?,
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

/// Opens an adapter and checks it against the base model's GGUF header (before loading weights).
/// Both files are expected to have passed `crate::files::input`.
pub fn open_adapter(adapter: &Path, model: &Path) -> anyhow::Result<Adapter> {
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
pub fn ensure_supported_arch(base: &BaseModelInfo, model: &Path) -> anyhow::Result<()> {
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

/// `--chat-template` (run, batch, serve).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ChatArgs {
    /// The chat template: a llama.cpp built-in name (chatml, llama3, gemma, phi3, ...) or a Jinja
    /// file (Hugging Face's variables: messages, add_generation_prompt, bos_token, eos_token).
    /// Default: the model's own (GGUF tokenizer.chat_template).
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
}

impl ChatArgs {
    /// The template to use with `model`. A value that is neither a built-in name nor a readable
    /// file is unreadable input (exit 2), as a missing input file is.
    pub fn template(&self, model: &Model) -> anyhow::Result<ChatTemplate> {
        ChatTemplate::resolve(self.chat_template.as_deref(), model).map_err(|e| match e {
            ChatError::Unknown { .. } => Fail::unreadable(e.to_string()).into(),
            other => anyhow::Error::new(other),
        })
    }

    /// Before any work: `--chat-template` names a built-in format or a file that exists.
    pub fn check(&self) -> Result<(), Fail> {
        match self.chat_template.as_deref() {
            Some(v) => ChatTemplate::check_arg(v).map_err(|e| Fail::unreadable(e.to_string())),
            None => Ok(()),
        }
    }
}

/// Tokenizes a text prompt with the model's tokenizer (BOS as the model says, special-token text
/// such as `<|im_start|>` parsed into those tokens, as llama.cpp's tools do); with a chat template,
/// the prompt is one user message rendered with it first.
pub fn prompt_tokens(model: &Model, text: &str, chat: Option<&ChatTemplate>) -> anyhow::Result<Vec<Token>> {
    Ok(match chat {
        None => model.tokenize(text, true, true)?,
        Some(t) => {
            let r = t.render(model, &[("user", text)])?;
            model.tokenize(&r.text, r.add_special, true)?
        }
    })
}
