//! `iapt eval --model M --adapter A --data D.jsonl [--limit N] [--no-adapter-too] [--json]`:
//! exact-match accuracy of a base model with an IAPT adapter (and, with `--no-adapter-too`, of
//! the base alone on the same prompts, and the lift) on a JSON-lines data set of
//! `{"instruction", "response"[, "prompt_ids"]}` rows.
//!
//! The prompt format (slot token id and count) comes from `--prompt-format`, by default the
//! `prompt_format.json` beside the data file (as the embedded demo ships it); the rules are in
//! `crate::tools::eval`. When a row carries `prompt_ids`, the model's tokenization must give exactly
//! those ids (a mismatch is an error that names the row). Exit 0 after printing the scores, 1 on a
//! malformed data file or an incompatible adapter, 2 on a missing or unreadable file, a bad option
//! or an unusable `--answers` path (`crate::files`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::tools::eval::{evaluate, Answerer, Example, PromptFormat, Score};
use anyhow::{bail, Context as _};
use iapt_engine::Engine;
use iapt_llama::Token;

use super::{exit, EXIT_USAGE};
use crate::args::{open_adapter, EngineShape, RuntimeArgs};
use crate::files;

/// Default answer length cap (the demo's `max 24 new tokens`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 24;

/// Arguments of `iapt eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF; F32, F16 or quantized).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// The IAPT adapter (.gguf or .safetensors).
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// The examples: JSON lines with "instruction" and "response" (and optionally "prompt_ids").
    #[arg(long, value_name = "DATA.jsonl")]
    pub data: PathBuf,
    /// Evaluate only the first N examples.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Also evaluate the base model without the adapter and report the lift.
    #[arg(long)]
    pub no_adapter_too: bool,
    /// The prompt format JSON ("slot_id", "n_soft_tokens"); default: prompt_format.json beside the data.
    #[arg(long, value_name = "FORMAT.json")]
    pub prompt_format: Option<PathBuf>,
    /// Tokens to generate at most per answer.
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS, value_name = "N")]
    pub max_new_tokens: usize,
    /// Print the scores as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write every answer as JSON lines: the example's "instruction" and "response", "adapter"
    /// (the answer with the adapter) and, with --no-adapter-too, "base".
    #[arg(long, value_name = "OUT.jsonl")]
    pub answers: Option<PathBuf>,
    /// Print every wrong answer to stderr.
    #[arg(long)]
    pub show_errors: bool,
    /// Model and context.
    #[command(flatten)]
    pub ctx: RuntimeArgs,
}

/// An input problem: the exit code and the message.
#[derive(Debug)]
pub struct InputError {
    /// 1 (malformed content) or 2 (missing or unreadable file).
    pub code: u8,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Reads a JSON-lines file of examples (blank lines skipped).
pub fn load_examples(path: &Path) -> Result<Vec<Example>, InputError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError { code: EXIT_USAGE, message: format!("{}: cannot read the data file: {e}", path.display()) })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| {
            InputError {
            code: super::EXIT_FAILURE,
            message: format!(
                "{}:{}: {why}; every line must be a JSON object with string fields \"instruction\" and \"response\" (and optionally \"prompt_ids\", a list of token ids)",
                path.display(),
                i + 1
            ),
        }
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned).ok_or_else(|| bad(format!("no string field {k:?}")));
        let instruction = field("instruction")?;
        let response = field("response")?;
        let prompt_ids = match v.get("prompt_ids") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_i64().and_then(|n| Token::try_from(n).ok()))
                    .collect::<Option<Vec<Token>>>()
                    .ok_or_else(|| bad("\"prompt_ids\" holds a value that is not a 32-bit integer".to_owned()))?,
            ),
            Some(_) => return Err(bad("\"prompt_ids\" is not a list".to_owned())),
        };
        out.push(Example { instruction, response, prompt_ids });
    }
    if out.is_empty() {
        return Err(InputError { code: super::EXIT_FAILURE, message: format!("{}: no examples in the data file", path.display()) });
    }
    Ok(out)
}

/// Reads a prompt format JSON (`slot_id`, `n_soft_tokens`).
pub fn load_prompt_format(path: &Path, max_new_tokens: usize) -> Result<PromptFormat, InputError> {
    let text = std::fs::read_to_string(path).map_err(|e| InputError {
        code: EXIT_USAGE,
        message: format!("{}: cannot read the prompt format: {e}; give --prompt-format FILE", path.display()),
    })?;
    let bad = |why: &str| InputError {
        code: super::EXIT_FAILURE,
        message: format!(
            "{}: {why}; the prompt format is a JSON object with non-negative integers \"slot_id\" and \"n_soft_tokens\"",
            path.display()
        ),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad("not JSON"))?;
    let int = |k: &str| v.get(k).and_then(|x| x.as_u64());
    let slot_id = int("slot_id").and_then(|n| Token::try_from(n).ok()).ok_or_else(|| bad("no valid \"slot_id\""))?;
    let n_slots = int("n_soft_tokens").and_then(|n| usize::try_from(n).ok()).ok_or_else(|| bad("no valid \"n_soft_tokens\""))?;
    Ok(PromptFormat { slot_id, n_slots, max_new_tokens })
}

/// The prompt format file to use: the one given, else `prompt_format.json` beside the data.
pub fn prompt_format_path(given: Option<&Path>, data: &Path) -> PathBuf {
    match given {
        Some(p) => p.to_owned(),
        None => data.parent().unwrap_or(Path::new(".")).join("prompt_format.json"),
    }
}

fn scores_json(s: &Score) -> serde_json::Value {
    serde_json::json!({ "n": s.n, "correct": s.correct, "accuracy": s.percent() })
}

/// Runs `iapt eval`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    args.ctx.check()?;
    let fmt_path = prompt_format_path(args.prompt_format.as_deref(), &args.data);
    let inputs = files::inputs(&[("the base model", &args.model), ("the adapter", &args.adapter), ("the data file", &args.data)])?;
    if let Some(path) = &args.answers {
        let mut all = inputs.clone();
        if let Ok(f) = files::input("the prompt format", &fmt_path) {
            all.push(f);
        }
        files::output("--answers", path, &["jsonl"], &all)?;
    }
    let loaded = load_examples(&args.data).and_then(|ex| Ok((ex, load_prompt_format(&fmt_path, args.max_new_tokens)?)));
    let (mut examples, fmt) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return Ok(exit(e.code));
        }
    };
    if let Some(n) = args.limit {
        if n == 0 {
            eprintln!("error: --limit must be at least 1");
            return Ok(exit(EXIT_USAGE));
        }
        examples.truncate(n);
    }
    let adapter = open_adapter(&args.adapter, &args.model)?;
    let model = args.ctx.load_model(&args.model)?;
    let mut engine = Engine::new(&model, args.ctx.engine_config(EngineShape::SINGLE)?)?;
    let m = engine.load_adapter("adapter", &adapter)?.n_soft_tokens;
    let show_errors = args.show_errors;
    let show = |label: &'static str| {
        move |i: usize, ex: &Example, a: &crate::tools::eval::Answer, ok: bool| {
            if show_errors && !ok {
                eprintln!("[{label}] #{i} {:?}: expected {:?}, got {:?}", ex.instruction, ex.response, a.text);
            }
        }
    };
    let (mut with_texts, mut base_texts) = (Vec::new(), Vec::new());
    let t0 = std::time::Instant::now();
    let with = {
        let report = show("adapter");
        let mut who = Answerer { engine: &mut engine, adapter: Some(("adapter".to_owned(), m)) };
        evaluate(&mut who, &model, &fmt, &examples, &mut |i, ex, a, ok| {
            report(i, ex, a, ok);
            with_texts.push(a.text.clone());
        })
        .context("evaluating with the adapter")?
    };
    let without = if args.no_adapter_too {
        let report = show("base");
        let mut who = Answerer { engine: &mut engine, adapter: None };
        let score = evaluate(&mut who, &model, &fmt, &examples, &mut |i, ex, a, ok| {
            report(i, ex, a, ok);
            base_texts.push(a.text.clone());
        })
        .context("evaluating without the adapter")?;
        Some(score)
    } else {
        None
    };
    if let Some(path) = &args.answers {
        iapt_format::write_atomically(path, |w| {
            for (i, ex) in examples.iter().enumerate() {
                let mut row = serde_json::json!({ "instruction": ex.instruction, "response": ex.response, "adapter": with_texts.get(i) });
                if without.is_some() {
                    row["base"] = serde_json::json!(base_texts.get(i));
                }
                writeln!(w, "{row}")?;
            }
            Ok(())
        })
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let lift = without.map(|w| with.percent() - w.percent());
    if args.json {
        let v = serde_json::json!({
            "model": args.model.display().to_string(),
            "adapter": args.adapter.display().to_string(),
            "data": args.data.display().to_string(),
            "with_adapter": scores_json(&with),
            "without_adapter": without.as_ref().map(scores_json),
            "lift": lift,
            "seconds": secs,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        crate::outln!("model:   {}", args.model.display())?;
        crate::outln!("adapter: {}", args.adapter.display())?;
        crate::outln!("data:    {} ({} examples)", args.data.display(), with.n)?;
        if let Some(w) = &without {
            crate::outln!("base without adapter: {:5.1}% ({}/{})", w.percent(), w.correct, w.n)?;
        }
        crate::outln!("base + IAPT adapter:  {:5.1}% ({}/{})", with.percent(), with.correct, with.n)?;
        if let Some(l) = lift {
            crate::outln!("lift: {l:+.1} points")?;
        }
        eprintln!("[{secs:.1} s]");
    }
    if with.n == 0 {
        bail!("no examples were evaluated");
    }
    Ok(ExitCode::SUCCESS)
}
