//! `iapt demo`: the embedded demo. Runs the committed quantized base model on a handful of
//! held-out instructions (`demo_prompts.jsonl`), once without and once with the committed IAPT
//! adapter, and prints the answers side by side with the expected one.
//!
//! The assets are found with `--assets DIR`; by default `converters/python/demo/assets` under the
//! current directory (a fresh clone's root), else the same folder in the source tree this binary
//! was built from.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::tools::eval::{answer, exact_match, example_prompt, Answerer};
use iapt_engine::Engine;

use super::eval::{load_examples, load_prompt_format, DEFAULT_MAX_NEW_TOKENS};
use super::{exit, EXIT_USAGE};
use crate::args::{open_adapter, EngineShape, RuntimeArgs};

/// The assets folder relative to the repository root.
pub const ASSETS_REL: &str = "converters/python/demo/assets";
/// The quantized base model the demo runs by default.
pub const DEFAULT_MODEL: &str = "base-q4_k_m.gguf";
/// The converted adapter.
pub const DEFAULT_ADAPTER: &str = "adapter.iapt.gguf";

/// Arguments of `iapt demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The demo assets folder [default: ./converters/python/demo/assets, else the source tree's].
    #[arg(long, value_name = "DIR")]
    pub assets: Option<PathBuf>,
    /// The base model, relative to the assets folder unless absolute.
    #[arg(long, value_name = "BASE.gguf", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// The adapter, relative to the assets folder unless absolute.
    #[arg(long, value_name = "ADAPTER", default_value = DEFAULT_ADAPTER)]
    pub adapter: PathBuf,
    /// The prompts (JSON lines), relative to the assets folder unless absolute.
    #[arg(long, value_name = "PROMPTS.jsonl", default_value = "demo_prompts.jsonl")]
    pub prompts: PathBuf,
    /// Model and context.
    #[command(flatten)]
    pub ctx: RuntimeArgs,
}

/// The assets folder: the one given, else `./converters/python/demo/assets`, else the one in the
/// source tree the binary was built from.
pub fn assets_dir(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_owned();
    }
    let here = PathBuf::from(ASSETS_REL);
    if here.is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(ASSETS_REL)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "--"
    }
}

/// Runs `iapt demo`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    let dir = assets_dir(args.assets.as_deref());
    if !dir.is_dir() {
        eprintln!("error: {}: the demo assets folder does not exist; run from the repository root or give --assets DIR", dir.display());
        return Ok(exit(EXIT_USAGE));
    }
    let model_path = dir.join(&args.model);
    let adapter_path = dir.join(&args.adapter);
    args.ctx.check()?;
    for (label, p) in [("the model", &model_path), ("the adapter", &adapter_path)] {
        if let Err(e) = crate::files::input(label, p) {
            eprintln!("error: {e}; the demo assets are made by converters/python/demo/make_assets.sh (or give --assets DIR)");
            return Ok(exit(EXIT_USAGE));
        }
    }
    let loaded = load_examples(&dir.join(&args.prompts))
        .and_then(|ex| Ok((ex, load_prompt_format(&dir.join("prompt_format.json"), DEFAULT_MAX_NEW_TOKENS)?)));
    let (examples, fmt) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return Ok(exit(e.code));
        }
    };
    let adapter = open_adapter(&adapter_path, &model_path)?;
    let model = args.ctx.load_model(&model_path)?;
    let mut engine = Engine::new(&model, args.ctx.engine_config(EngineShape::SINGLE)?)?;
    let m = engine.load_adapter("adapter", &adapter)?.n_soft_tokens;

    crate::outln!("IAPT demo: {} + adapter {}", model_path.display(), adapter_path.display())?;
    crate::outln!(
        "The base model never saw the phrasing \"write the list backwards\"; the adapter ({} soft tokens per layer) teaches it.",
        fmt.n_slots
    )?;
    crate::outln!()?;
    let mut rows = vec![["instruction".to_owned(), "expected".to_owned(), "base (no adapter)".to_owned(), "base + IAPT".to_owned()]];
    let (mut n_base, mut n_tuned) = (0, 0);
    for (i, ex) in examples.iter().enumerate() {
        let prompt = example_prompt(&model, &fmt, i, ex)?;
        let a = answer(&mut Answerer { engine: &mut engine, adapter: None }, &model, &fmt, &prompt)?;
        let b = answer(&mut Answerer { engine: &mut engine, adapter: Some(("adapter".to_owned(), m)) }, &model, &fmt, &prompt)?;
        let (ok_a, ok_b) = (exact_match(&a.text, &ex.response), exact_match(&b.text, &ex.response));
        n_base += usize::from(ok_a);
        n_tuned += usize::from(ok_b);
        rows.push([
            ex.instruction.clone(),
            ex.response.clone(),
            format!("{} {}", mark(ok_a), a.text),
            format!("{} {}", mark(ok_b), b.text),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (k, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        crate::outln!("{}", cells.join(" | ").trim_end())?;
        if k == 0 {
            crate::outln!("{}", widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("-+-"))?;
        }
    }
    crate::outln!()?;
    crate::outln!(
        "exact match: base (no adapter) {n_base}/{n}, base + IAPT {n_tuned}/{n} (ok = matches the expected answer)",
        n = examples.len()
    )?;
    Ok(ExitCode::SUCCESS)
}
