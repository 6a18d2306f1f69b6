//! `iapt pack IN -o OUT`: validate, then re-write in the container named by OUT's extension,
//! atomically (a temporary file renamed into place; a failure leaves OUT untouched). OUT may not
//! be the same file as IN (`crate::files`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use iapt_format::{validate_file, Code};

use super::{exit, EXIT_FAILURE, EXIT_USAGE};
use crate::files;

/// Arguments of `iapt pack`.
#[derive(clap::Args)]
pub struct Args {
    /// The adapter to read (either container).
    pub input: PathBuf,
    /// The file to write; `.safetensors` or `.gguf` chooses the container.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
}

/// Runs `iapt pack`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = files::input("the input", &args.input)?;
    files::output("-o", &args.output, &["safetensors", "gguf"], &[input])?;
    let container = super::output_container(&args.output)?;
    let v = validate_file(&args.input, None);
    let Some(adapter) = v.adapter else {
        for f in &v.report.findings {
            eprintln!("{}: {f}", args.input.display());
        }
        eprintln!("error: {} is not a valid IAPT adapter; nothing was written", args.input.display());
        return Ok(exit(if v.report.has(Code::Unreadable) { EXIT_USAGE } else { EXIT_FAILURE }));
    };
    for w in adapter.warnings() {
        eprintln!("{}: {w}", args.input.display());
    }
    adapter.save(&args.output, container).with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("wrote {} ({container}, {} tensors, {} parameters)", args.output.display(), adapter.tensors().len(), adapter.param_count());
    Ok(ExitCode::SUCCESS)
}
