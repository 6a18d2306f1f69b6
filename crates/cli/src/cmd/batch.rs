//! `iapt batch --model M --adapter [NAME=]A ... --requests R.jsonl [--out OUT.jsonl]`: multi-tenant
//! serving in one process, on the engine (`iapt-engine`). Every adapter is loaded once and stays
//! resident; the requests, JSON lines of `{"prompt": "..."}` or `{"prompt_tokens": [..]}` with an
//! optional `"adapter": NAME` (absent or null: the base model alone), an optional `"id"` and
//! optional per-request `"max_tokens"`, `"temperature"`, `"top_k"`, `"top_p"`, `"min_p"`,
//! `"seed"` (the options' values otherwise), enter as slots free up (continuous batching): at most
//! `--parallel` run at once, each step decodes every running sequence's next token and prefill
//! chunks of new ones, up to `--batch-tokens` tokens. `--ctx-size` is the KV cache the running
//! sequences share: each has `ctx-size / parallel` tokens for its prompt, soft tokens and response.
//!
//! One bad request never sinks the file: a line that is not a request, names an unknown adapter,
//! can never fit its sequence's context, has a bad sampler value, or fails while running gets its
//! own output line `{"id", "adapter", "error": {"line", "message"}}` naming its line and the
//! rule; every other request is answered.
//!
//! Output: one JSON line per request, in input order: `{"id", "adapter", "text", "n_tokens",
//! "stopped_at_eog"}` or the error line, to stdout or to `--out` (written to a temporary file and
//! renamed into place). Statistics go to stderr, as one JSON object with `--json` (aggregate and
//! decode-only tokens/s). Exit 0 when every request was answered, 1 when some failed (their lines
//! say why; the others are answered) or an adapter cannot be used, 2 on a missing or unreadable
//! file, a bad option or an unusable `--out` (`crate::files`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use iapt_engine::{ChatTemplate, Engine, EngineError, EventKind, FinishReason, Request, SeqId};
use iapt_llama::{Model, SamplerSettings, Token};
use serde::Deserialize;

use super::{exit, EXIT_FAILURE, EXIT_USAGE};
use crate::args::{open_adapter, prompt_tokens, AdapterArgs, ChatArgs, EngineArgs, EngineShape, RuntimeArgs, SamplingArgs};
use crate::files;

/// Arguments of `iapt batch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// The requests: JSON lines with "prompt" or "prompt_tokens", optional "adapter" and "id".
    #[arg(long, value_name = "REQUESTS.jsonl")]
    pub requests: PathBuf,
    /// Write the results here instead of stdout.
    #[arg(long, value_name = "OUT.jsonl")]
    pub out: Option<PathBuf>,
    /// Wrap every "prompt" in the chat template (--chat-template, else the model's) as one user
    /// message.
    #[arg(long)]
    pub chat: bool,
    /// The chat template (implies --chat).
    #[command(flatten)]
    pub template: ChatArgs,
    /// Tokens to generate at most per request (a request's "max_tokens" overrides it).
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub n_predict: usize,
    /// Print the statistics as one JSON object on stderr.
    #[arg(long)]
    pub json: bool,
    /// Adapters.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Sampling (a request's own fields override these).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Model and context (`--ctx-size` is shared by the running sequences).
    #[command(flatten)]
    pub ctx: RuntimeArgs,
}

/// One request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    /// Read loosely for the output line (any JSON value); declared so that it is allowed.
    #[serde(default, rename = "id")]
    _id: Option<serde_json::Value>,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_tokens: Option<Vec<Token>>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
}

/// A request line as read: its line number, its id and adapter (for the output), and the parsed
/// request or why it is not one.
struct Line {
    number: usize,
    id: serde_json::Value,
    adapter: Option<String>,
    parsed: Result<RequestLine, String>,
}

/// Reads the request file: one [`Line`] per non-blank line, good or bad.
fn read_requests(path: &Path) -> Result<Vec<Line>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read the requests: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = i + 1;
        let parsed = serde_json::from_str::<RequestLine>(line)
            .map_err(|e| format!("not a request: {e}; expected {{\"prompt\": TEXT}} or {{\"prompt_tokens\": [IDS]}} with optional \"adapter\", \"id\", \"max_tokens\", \"temperature\", \"top_k\", \"top_p\", \"min_p\", \"seed\""))
            .and_then(|r| match r.prompt.is_some() == r.prompt_tokens.is_some() {
                true => Err("give exactly one of \"prompt\" and \"prompt_tokens\"".to_owned()),
                false => Ok(r),
            });
        // Whatever the line holds, its id and adapter name its output line when they can be read.
        let loose: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let id = loose.get("id").filter(|v| !v.is_null()).cloned().unwrap_or(serde_json::json!(number));
        let adapter = loose.get("adapter").and_then(|v| v.as_str()).map(str::to_owned);
        out.push(Line { number, id, adapter, parsed });
    }
    Ok(out)
}

/// Reads the adapter arguments into `(name, path)` pairs and checks every input file and `--out`
/// (`crate::files`).
fn adapter_args(args: &Args) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let named = args.adapters.named()?;
    let mut inputs = vec![files::input("the base model", &args.model)?, files::input("the requests", &args.requests)?];
    for (_, path) in &named {
        inputs.push(files::input("the adapter", path)?);
    }
    if let Some(out) = &args.out {
        files::output("--out", out, &["jsonl"], &inputs)?;
    }
    Ok(named)
}

/// The engine request of a parsed line, or why it cannot be one (an error line).
fn request(r: &RequestLine, model: &Model, base: &SamplerSettings, args: &Args, chat: Option<&ChatTemplate>) -> Result<Request, String> {
    let prompt = match (&r.prompt, &r.prompt_tokens) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => prompt_tokens(model, text, chat).map_err(|e| format!("{e:#}"))?,
        (None, None) => unreachable!("checked when reading"),
    };
    let sampling = SamplerSettings {
        temperature: r.temperature.unwrap_or(base.temperature),
        top_k: r.top_k.unwrap_or(base.top_k),
        top_p: r.top_p.unwrap_or(base.top_p),
        min_p: r.min_p.unwrap_or(base.min_p),
        seed: r.seed.unwrap_or(base.seed),
        ..base.clone()
    };
    Ok(Request { adapter: r.adapter.clone(), sampling, ..Request::new(prompt, r.max_tokens.unwrap_or(args.n_predict)) })
}

/// What became of one request.
#[derive(Default)]
struct Outcome {
    text: Vec<u8>,
    n_tokens: usize,
    eog: bool,
    error: Option<String>,
}

/// Runs `iapt batch`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    let sampling = args.sampling.settings()?;
    let adapters = adapter_args(args)?;
    let lines = match read_requests(&args.requests) {
        Ok(l) if l.is_empty() => {
            eprintln!("error: {}: no requests", args.requests.display());
            return Ok(exit(EXIT_FAILURE));
        }
        Ok(l) => l,
        Err(msg) => {
            eprintln!("error: {msg}");
            return Ok(exit(EXIT_USAGE));
        }
    };
    let shape = EngineShape::from_args(&args.engine, lines.len())?;
    let shape = EngineShape { parallel: shape.parallel.min(lines.len()), ..shape };
    let config = args.ctx.engine_config(shape)?;
    // Every adapter is checked against the base model's header (spec codes) before llama.cpp loads it.
    let opened: Vec<_> =
        adapters.iter().map(|(name, path)| open_adapter(path, &args.model).map(|a| (name, path, a))).collect::<Result<_, _>>()?;
    let model = args.ctx.load_model(&args.model)?;
    let chat = match args.chat || args.template.chat_template.is_some() {
        true => Some(args.template.template(&model)?),
        false => None,
    };
    let mut engine = Engine::new(&model, config)?;
    for (name, path, adapter) in &opened {
        engine.load_adapter(name, adapter).with_context(|| format!("adapter {name} ({})", path.display()))?;
    }
    let mut outcomes: Vec<Outcome> = lines.iter().map(|_| Outcome::default()).collect();
    let mut ids: HashMap<SeqId, usize> = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        let submitted =
            line.parsed.as_ref().map_err(Clone::clone).and_then(|r| request(r, &model, &sampling, args, chat.as_ref())).and_then(|req| {
                engine.submit(req).map_err(|e| match e {
                    EngineError::UnknownAdapter { name, .. } => format!("unknown adapter {name:?}; load it with --adapter {name}=PATH"),
                    e => e.to_string(),
                })
            });
        match submitted {
            Ok(id) => {
                ids.insert(id, i);
            }
            Err(msg) => outcomes[i].error = Some(msg),
        }
    }
    let t0 = std::time::Instant::now();
    engine.run_until_idle(&mut |ev| {
        let Some(&i) = ids.get(&ev.id) else { return };
        let o = &mut outcomes[i];
        match ev.kind {
            EventKind::Token(t) => {
                o.text.extend(t.text);
                o.n_tokens += 1;
            }
            EventKind::Done(d) => {
                o.text.extend(d.text);
                o.eog = d.reason == FinishReason::Eog;
            }
            EventKind::Failed(e) => o.error = Some(e.to_string()),
        }
    });
    let wall = t0.elapsed();
    let mut failed = 0;
    let mut body = String::new();
    for (line, o) in lines.iter().zip(&outcomes) {
        let row = match &o.error {
            Some(message) => {
                failed += 1;
                eprintln!("error: {}:{}: {message}", args.requests.display(), line.number);
                serde_json::json!({ "id": line.id, "adapter": line.adapter, "error": { "line": line.number, "message": message } })
            }
            None => serde_json::json!({
                "id": line.id,
                "adapter": line.adapter,
                "text": String::from_utf8_lossy(&o.text),
                "n_tokens": o.n_tokens,
                "stopped_at_eog": o.eog,
            }),
        };
        body.push_str(&row.to_string());
        body.push('\n');
    }
    match &args.out {
        Some(p) => iapt_format::write_atomically(p, |w| w.write_all(body.as_bytes()))?,
        None => std::io::stdout().lock().write_all(body.as_bytes()).context("writing to stdout")?,
    }
    report(args, &engine, lines.len(), adapters.len(), wall);
    if failed > 0 {
        eprintln!("error: {failed} of {} requests failed (their output lines carry \"error\"); the others were answered", lines.len());
        return Ok(exit(EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

/// The statistics line on stderr (a JSON object with `--json`).
fn report(args: &Args, engine: &Engine<'_>, n_requests: usize, n_adapters: usize, wall: std::time::Duration) {
    let s = engine.stats();
    let per_s = |n: u64, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
    let decode_s = s.decode_only_time.as_secs_f64();
    if args.json {
        let obj = serde_json::json!({
            "requests": n_requests,
            "adapters": n_adapters,
            "parallel": engine.config().parallel,
            "batch_tokens": engine.config().batch_tokens,
            "steps": s.steps,
            "prefill_rows": s.prefill_rows,
            "generated_tokens": s.generated,
            "wall_s": wall.as_secs_f64(),
            "tokens_per_s": per_s(s.generated, wall.as_secs_f64()),
            "decode_only_steps": s.decode_only_steps,
            "decode_only_tokens": s.decode_only_tokens,
            "decode_only_s": decode_s,
            "decode_tokens_per_s": per_s(s.decode_only_tokens, decode_s),
            "decode_only_llama_s": s.decode_only_llama_time.as_secs_f64(),
        });
        eprintln!("{obj}");
    } else {
        eprintln!(
            "[{n_requests} requests, {n_adapters} adapters resident, {} at a time; {} tokens generated in {:.2} s: {:.2} tokens/s; decode-only steps {:.2} tokens/s]",
            engine.config().parallel,
            s.generated,
            wall.as_secs_f64(),
            per_s(s.generated, wall.as_secs_f64()),
            per_s(s.decode_only_tokens, decode_s)
        );
    }
}
