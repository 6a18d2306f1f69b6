//! `iapt validate FILE [--model BASE.gguf] [--json]`: every finding of spec v1's rules.
//!
//! Exit 0 valid, 1 invalid (the adapter, or a base model that is not a usable GGUF: E304), 2 when
//! the adapter or the base model cannot be read (missing, a directory, not permitted, truncated
//! base model).

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
    let mut base_unreadable = false;
    let base = match &args.model {
        None => None,
        Some(p) => match BaseModelInfo::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                base_unreadable = e.is_unreadable();
                pre.push(Finding::about(Code::BaseModelUnreadable, "--model", e.to_string()));
                None
            }
        },
    };
    let v = validate_file(&args.file, base.as_ref());
    let mut report = v.report;
    report.findings.extend(pre.findings);
    let valid = !report.has_errors();
    let code = if report.has(Code::Unreadable) || base_unreadable {
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
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        for f in &report.findings {
            crate::outln!("{}: {f}", args.file.display())?;
        }
        let n_err = report.errors().count();
        let n_warn = report.warnings().count();
        if code == EXIT_USAGE {
            crate::outln!(
                "{}: could not be read",
                if base_unreadable { args.model.as_deref().unwrap_or(&args.file) } else { &args.file }.display()
            )?;
        } else if valid {
            crate::outln!("{}: valid IAPT adapter ({n_warn} warning{})", args.file.display(), if n_warn == 1 { "" } else { "s" })?;
        } else {
            crate::outln!(
                "{}: invalid: {n_err} error{}, {n_warn} warning{}",
                args.file.display(),
                if n_err == 1 { "" } else { "s" },
                if n_warn == 1 { "" } else { "s" }
            )?;
        }
    }
    Ok(exit(code))
}
