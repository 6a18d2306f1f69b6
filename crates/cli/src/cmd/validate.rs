//! `iapt validate FILE [--model BASE.gguf] [--json]`: every finding of spec v1's rules.
//!
//! Exit 0 valid, 1 invalid (the adapter, or a base model that is not a usable GGUF: E304), 2 when
//! the adapter or the base model cannot be read (missing, a directory, not permitted, truncated
//! base model). With `--model`, it also says whether the IAPT hook supports the base model's architecture (an
//! unsupported one is refused with exit 1, naming the supported architectures).

use std::path::PathBuf;
use std::process::ExitCode;

use iapt_format::{validate_file, BaseModelInfo, Code, Finding, Report};

use super::{exit, EXIT_FAILURE, EXIT_USAGE};

/// Arguments of `iapt validate`.
#[derive(clap::Args)]
pub struct Args {
    /// The adapter file (.safetensors or .gguf; the container is detected from the content).
    pub file: PathBuf,
    /// A base model GGUF to check architecture, n_layer and n_embd against (and that the IAPT hook
    /// supports its architecture).
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
    // Beyond the spec's rules: with --model, whether the IAPT hook can run on that architecture.
    let unsupported_arch = base.as_ref().filter(|b| iapt_llama::arch_spec(&b.arch).is_none()).map(|b| b.arch.clone());
    let valid = !report.has_errors() && unsupported_arch.is_none();
    let code = if report.has(Code::Unreadable) || base_unreadable {
        EXIT_USAGE
    } else if valid {
        0
    } else {
        EXIT_FAILURE
    };
    let supported: Vec<&str> = iapt_llama::ARCHS.iter().map(|a| a.name).collect();
    if args.json {
        let doc = serde_json::json!({
            "file": args.file.display().to_string(),
            "container": v.container.map(|c| c.to_string()),
            "valid": valid,
            "errors": report.errors().count(),
            "warnings": report.warnings().count(),
            "findings": report.findings,
            "base_model_arch": base.as_ref().map(|b| b.arch.clone()),
            "base_model_arch_supported": base.as_ref().map(|_| unsupported_arch.is_none()),
            "supported_archs": supported,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        for f in &report.findings {
            crate::outln!("{}: {f}", args.file.display())?;
        }
        if let (Some(arch), Some(model)) = (&unsupported_arch, &args.model) {
            crate::outln!(
                "{}: base model {} has architecture {arch:?}, which the IAPT hook does not support (supported architectures, llama.cpp's names: {})",
                args.file.display(),
                model.display(),
                supported.join(", ")
            )?;
        }
        let n_err = report.errors().count() + usize::from(unsupported_arch.is_some());
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
