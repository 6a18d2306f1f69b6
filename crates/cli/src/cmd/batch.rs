//! `iapt batch --model M --adapter [NAME=]A ... --requests R.jsonl [--out OUT.jsonl]`: multi-tenant
//! serving in one process, on the engine (`iapt-engine`). Every adapter is loaded once and stays
//! resident; the requests, JSON lines of `{"prompt": "..."}` or `{"prompt_tokens": [..]}` with an
//! optional `"adapter": NAME` (absent or null: the base model alone) and an optional `"id"`, are
//! all validated and queued first, then enter as slots free up (continuous batching): at most
//! `--parallel` run at once, each step decodes every running sequence's next token and prefill
//! chunks of new ones, up to `--batch-tokens` tokens. `--ctx-size` is the KV cache the running
//! sequences share: each has `ctx-size / parallel` tokens for its prompt, soft tokens and response.
//!
//! Output: one JSON line per request, in input order: `{"id", "adapter", "text", "n_tokens",
//! "stopped_at_eog"}`, to stdout or to `--out` (written to a temporary file and renamed into place).
//! Statistics go to stderr, as one JSON object with `--json` (aggregate and decode-only tokens/s).
//! Exit 0 on success, 1 on a malformed or refused request or an incompatible adapter, 2 on a missing
//! or unreadable file, a bad option or an unusable `--out` (`crate::files`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use iapt_engine::{Engine, EngineConfig, EventKind, FinishReason, Request, SeqId};
use iapt_llama::{SamplerSettings, Token};
use serde::Deserialize;

use super::run::{open_adapter, prompt_tokens, CtxArgs};
use super::{exit, EXIT_FAILURE, EXIT_USAGE};
use crate::fail::Fail;
use crate::files;

/// Arguments of `iapt batch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// A resident adapter, `NAME=PATH` or `PATH` (named by its file stem); repeat for several.
    #[arg(long, value_name = "[NAME=]ADAPTER")]
    pub adapter: Vec<String>,
    /// The requests: JSON lines with "prompt" or "prompt_tokens", optional "adapter" and "id".
    #[arg(long, value_name = "REQUESTS.jsonl")]
    pub requests: PathBuf,
    /// Write the results here instead of stdout.
    #[arg(long, value_name = "OUT.jsonl")]
    pub out: Option<PathBuf>,
    /// Sequences running at once (at most the number of requests).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub parallel: usize,
    /// Tokens decoded per step at most (decode tokens first, then prefill chunks).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub batch_tokens: usize,
    /// Wrap every "prompt" in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most per request.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub n_predict: usize,
    /// Sampling temperature (llama.cpp's sampler chain); 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temp: f32,
    /// Sampling seed (0 ..= 4294967295).
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u32,
    /// Print the statistics as one JSON object on stderr.
    #[arg(long)]
    pub json: bool,
    /// Context settings (`--ctx-size` is shared by the running sequences).
    #[command(flatten)]
    pub ctx: CtxArgs,
}

/// One request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_tokens: Option<Vec<Token>>,
}

/// `NAME=PATH` or `PATH` (named by its stem); an empty NAME is a usage error.
pub(crate) fn parse_adapter_arg(arg: &str) -> Result<(String, PathBuf), Fail> {
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

fn read_requests(path: &Path) -> Result<Vec<(usize, RequestLine)>, (u8, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| (EXIT_USAGE, format!("{}: cannot read the requests: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: RequestLine = serde_json::from_str(line).map_err(|e| {
            (EXIT_FAILURE, format!("{}:{}: not a request: {e}; expected {{\"prompt\": TEXT}} or {{\"prompt_tokens\": [IDS]}} with optional \"adapter\" and \"id\"", path.display(), i + 1))
        })?;
        if r.prompt.is_some() == r.prompt_tokens.is_some() {
            return Err((EXIT_FAILURE, format!("{}:{}: give exactly one of \"prompt\" and \"prompt_tokens\"", path.display(), i + 1)));
        }
        out.push((i + 1, r));
    }
    if out.is_empty() {
        return Err((EXIT_FAILURE, format!("{}: no requests", path.display())));
    }
    Ok(out)
}

/// Reads the adapter arguments into `(name, path)` pairs and checks every input file and `--out`
/// (`crate::files`); a name given twice is a usage error.
fn adapter_args(args: &Args) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let named: Vec<(String, PathBuf)> = args.adapter.iter().map(|a| parse_adapter_arg(a)).collect::<Result<_, _>>()?;
    let mut inputs = vec![files::input("the base model", &args.model)?, files::input("the requests", &args.requests)?];
    for (i, (name, path)) in named.iter().enumerate() {
        inputs.push(files::input("the adapter", path)?);
        if named[..i].iter().any(|(n, _)| n == name) {
            return Err(Fail::usage(format!("adapter name {name:?} given twice; name them NAME=PATH")).into());
        }
    }
    if let Some(out) = &args.out {
        files::output("--out", out, &["jsonl"], &inputs)?;
    }
    Ok(named)
}

/// The engine settings from the options, for `n_requests` requests.
fn engine_config(args: &Args, n_requests: usize) -> anyhow::Result<EngineConfig> {
    let params = args.ctx.params()?;
    let session = args.ctx.session_options()?;
    let parallel = args.parallel.min(n_requests).max(1);
    Ok(EngineConfig {
        parallel,
        seq_ctx: params.n_ctx as usize / parallel,
        batch_tokens: args.batch_tokens.max(parallel),
        n_ubatch: params.n_ubatch as usize,
        queue_capacity: n_requests,
        n_threads: params.n_threads,
        kv_type: params.kv_type,
        flash_attn: params.flash_attn,
        generator_threads: session.generator_threads,
        gpu: session.gpu,
    })
}

/// Runs `iapt batch`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    if !args.temp.is_finite() || args.temp < 0.0 {
        return Err(Fail::usage("--temp must be a finite number >= 0").into());
    }
    if args.parallel == 0 || args.parallel > 256 || args.batch_tokens == 0 {
        eprintln!("error: --parallel must be between 1 and 256 (llama.cpp's sequence limit), --batch-tokens at least 1");
        return Ok(exit(EXIT_USAGE));
    }
    args.ctx.check()?;
    let adapters = adapter_args(args)?;
    let requests = match read_requests(&args.requests) {
        Ok(r) => r,
        Err((code, msg)) => {
            eprintln!("error: {msg}");
            return Ok(exit(code));
        }
    };
    let names: HashMap<&str, ()> = adapters.iter().map(|(n, _)| (n.as_str(), ())).collect();
    for (line, r) in &requests {
        if let Some(name) = r.adapter.as_deref().filter(|n| !names.contains_key(n)) {
            let mut known: Vec<&&str> = names.keys().collect();
            known.sort();
            eprintln!("error: {}:{line}: unknown adapter {name:?} (loaded: {known:?}); add --adapter {name}=PATH", args.requests.display());
            return Ok(exit(EXIT_FAILURE));
        }
    }
    let model = args.ctx.load_model(&args.model)?;
    let mut engine = Engine::new(&model, engine_config(args, requests.len())?)?;
    for (name, path) in &adapters {
        // `open_adapter` checks the file and the base model with the spec's codes, as `iapt run` does.
        let adapter = open_adapter(path, &args.model)?;
        engine.load_adapter(name, &adapter).with_context(|| format!("adapter {name} ({})", path.display()))?;
    }
    let sampling = SamplerSettings { temperature: args.temp, seed: args.seed, ..SamplerSettings::default() };
    let mut ids: Vec<SeqId> = Vec::with_capacity(requests.len());
    for (line, r) in &requests {
        let prompt = match (&r.prompt, &r.prompt_tokens) {
            (_, Some(ids)) => ids.clone(),
            (Some(text), None) => prompt_tokens(&model, text, args.chat)?,
            (None, None) => unreachable!("checked when reading"),
        };
        let req = Request { adapter: r.adapter.clone(), sampling: sampling.clone(), ..Request::new(prompt, args.n_predict) };
        match engine.submit(req) {
            Ok(id) => ids.push(id),
            Err(e) => {
                eprintln!("error: {}:{line}: {e}", args.requests.display());
                return Ok(exit(EXIT_FAILURE));
            }
        }
    }
    let t0 = std::time::Instant::now();
    let mut results: BTreeMap<SeqId, (Vec<u8>, usize, bool)> = BTreeMap::new();
    let mut failure = None;
    engine.run_until_idle(&mut |ev| {
        let r = results.entry(ev.id).or_default();
        match ev.kind {
            EventKind::Token(t) => {
                r.0.extend(t.text);
                r.1 += 1;
            }
            EventKind::Done(d) => {
                r.0.extend(d.text);
                r.2 = d.reason == FinishReason::Eog;
            }
            EventKind::Failed(e) => failure = failure.take().or(Some((ev.id, e))),
        }
    });
    let wall = t0.elapsed();
    if let Some((id, e)) = failure {
        let line = ids.iter().position(|&i| i == id).map_or(0, |i| requests[i].0);
        anyhow::bail!("request on line {line} of {}: {e}", args.requests.display());
    }
    let lines: Vec<String> = requests
        .iter()
        .zip(&ids)
        .map(|((line, r), id)| {
            let (text, n_tokens, eog) = results.remove(id).unwrap_or_default();
            serde_json::json!({
                "id": r.id.clone().unwrap_or(serde_json::json!(line)),
                "adapter": r.adapter,
                "text": String::from_utf8_lossy(&text),
                "n_tokens": n_tokens,
                "stopped_at_eog": eog,
            })
            .to_string()
        })
        .collect();
    let body = lines.join("\n") + "\n";
    match &args.out {
        Some(p) => iapt_format::write_atomically(p, |w| w.write_all(body.as_bytes()))?,
        None => std::io::stdout().lock().write_all(body.as_bytes()).context("writing to stdout")?,
    }
    report(args, &engine, requests.len(), adapters.len(), wall);
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
