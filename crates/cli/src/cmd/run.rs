//! `iapt run`: run a base GGUF model in llama.cpp with an IAPT adapter (or without, `--no-adapter`)
//! and stream the continuation to stdout, on the engine (`iapt-engine`, a batch of one).
//!
//! The adapter is checked against the base model (architecture, layer count, width) before any
//! decode; a prompt that does not fit the context is refused; sampling is llama.cpp's sampler chain
//! (`--temp 0` is greedy); `--prompt-tokens` feeds ids as given (no BOS added); `--prompt` uses the
//! model's tokenizer (BOS as the model says, `--chat` applies the model's chat template);
//! `--dump-logits` writes the logits of every generated step as float32 NumPy `[steps, n_vocab]`.
//! Statistics go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use iapt_engine::{Engine, Request};

use crate::args::{open_adapter, prompt_tokens, ChatArgs, EngineShape, RuntimeArgs, SamplingArgs};
use crate::files;

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
    /// Wrap the prompt in the chat template (--chat-template, else the model's) as one user message
    /// (with --prompt).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// The chat template (implies --chat).
    #[command(flatten)]
    pub template: ChatArgs,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub n_predict: usize,
    /// Write the logits of every generated step as float32 NumPy [steps, n_vocab].
    #[arg(long, value_name = "OUT.npy")]
    pub dump_logits: Option<PathBuf>,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Model and context.
    #[command(flatten)]
    pub ctx: RuntimeArgs,
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
    let sampling = args.sampling.settings()?;
    args.ctx.check()?;
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
        (Some(text), None) => {
            let chat = match args.chat || args.template.chat_template.is_some() {
                true => Some(args.template.template(&model)?),
                false => None,
            };
            prompt_tokens(&model, text, chat.as_ref()).context("--prompt")?
        }
        (None, None) => bail!("give --prompt or --prompt-tokens"),
    };
    let n_soft = adapter.as_ref().map_or(0, |a| a.config().n_soft_tokens as usize);
    // As llama-cli: generation stops when the context is full; a prompt that leaves no room for
    // one generated token is refused.
    let room = (args.ctx.ctx_size as usize).saturating_sub(tokens.len() + n_soft);
    if room == 0 {
        let needed = tokens.len() + n_soft;
        bail!(
            "prompt of {} tokens plus {n_soft} soft tokens needs {needed} positions ({} with the first generated token) and does not fit the context of {} tokens; use a shorter prompt or a --ctx-size of at least {}",
            tokens.len(),
            needed + 1,
            args.ctx.ctx_size,
            needed + 1
        );
    }
    if args.n_predict == 0 {
        // Nothing to generate: nothing is prefilled either.
        crate::outln!().context("writing to stdout")?;
        eprintln!("[{} prompt tokens + {n_soft} soft tokens; prefill n/a; 0 generated, decode n/a]", tokens.len());
        return Ok(ExitCode::SUCCESS);
    }
    let mut engine = Engine::new(&model, args.ctx.engine_config(EngineShape::SINGLE)?)?;
    let mut req = Request::new(tokens.clone(), args.n_predict.min(room));
    if let Some(a) = &adapter {
        engine.load_adapter("adapter", a)?;
        req = req.with_adapter("adapter");
    }
    req.sampling = sampling;
    req.logits = args.dump_logits.is_some();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let done = engine.complete(req, &mut |t| {
        if write_err.is_none() {
            if let Err(e) = out.write_all(&t.text).and_then(|()| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let f = &done.finished;
    out.write_all(&f.text).and_then(|()| writeln!(out)).context("writing to stdout")?;
    drop(out);
    if let Some(path) = &args.dump_logits {
        let n_vocab = model.n_vocab();
        let flat: Vec<f32> = done.tokens.iter().flat_map(|t| t.logits.iter().flatten().copied()).collect();
        iapt_format::write_atomically(path, |w| {
            iapt_npy::write_f32(w, &[done.tokens.len(), n_vocab], &flat).map_err(std::io::Error::other)
        })?;
    }
    eprintln!(
        "[{} prompt tokens + {} soft tokens; prefill {}; {} generated, decode {}{}]",
        f.n_prompt,
        f.n_soft,
        rate(f.n_prompt + f.n_soft, f.prefill_time),
        f.n_generated,
        rate(f.n_generated.saturating_sub(1), f.decode_time),
        if f.reason == iapt_engine::FinishReason::Eog { "; stopped at end of generation" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
