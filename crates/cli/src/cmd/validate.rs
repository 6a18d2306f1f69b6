//! `iapt validate FILE [--model BASE.gguf] [--json]`: every finding of spec v1's rules.

use std::path::PathBuf;
use std::process::ExitCode;

use iapt_format::{validate_file, BaseModelInfo, Code, Finding, Report};

use super::{exit, EXIT_FAILURE, EXIT_USAGE};

/// Arguments of `iapt validate`.
#[derive(clap::Args)]
pub struct Args {
    /// The adapter file (.safetensors or .gguf; the container is detected from the content).
    pub file: PathBuf,
    /// A base model GGUF to check architecture, n_layer and n_embd against.
    #[arg(long, value_name = "BASE.gguf")]
    pub model: Option<PathBuf>,
    /// Print one JSON document with every finding instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `iapt validate`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut pre = Report::default();
    let base = match &args.model {
        None => None,
        Some(p) => match BaseModelInfo::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                pre.push(Finding::about(Code::BaseModelUnreadable, p.display().to_string(), e));
                None
            }
        },
    };
    let v = validate_file(&args.file, base.as_ref());
    let mut report = v.report;
    report.findings.extend(pre.findings);
    let valid = !report.has_errors();
    let code = if report.has(Code::Unreadable) || report.has(Code::BaseModelUnreadable) {
        EXIT_USAGE
    } else if valid {
        0
    } else {
        EXIT_FAILURE
    };
    if args.json {
        let doc = serde_json::json!({
            "file": args.file.display().to_string(),
            "container": v.container.map(|c| c.to_string()),
            "valid": valid,
            "errors": report.errors().count(),
            "warnings": report.warnings().count(),
            "findings": report.findings,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for f in &report.findings {
            println!("{}: {f}", args.file.display());
        }
        let n_err = report.errors().count();
        let n_warn = report.warnings().count();
        if code == EXIT_USAGE {
            println!("{}: could not be read", args.file.display());
        } else if valid {
            println!("{}: valid IAPT adapter ({n_warn} warning{})", args.file.display(), if n_warn == 1 { "" } else { "s" });
        } else {
            println!(
                "{}: invalid: {n_err} error{}, {n_warn} warning{}",
                args.file.display(),
                if n_err == 1 { "" } else { "s" },
                if n_warn == 1 { "" } else { "s" }
            );
        }
    }
    Ok(exit(code))
}
