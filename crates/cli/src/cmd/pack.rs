//! `iapt pack IN -o OUT [--dtype keep|f32|f16|bf16|q8_0]`: validate, then re-write in the
//! container named by OUT's extension, atomically (a temporary file renamed into place; a failure
//! leaves OUT untouched), optionally in another dtype: `q8_0` quantizes the two matrices whose rows
//! are whole blocks of 32 (spec 1.1) and keeps every other tensor. OUT may not be the same file as
//! IN (`crate::files`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use iapt_convert::DTypeChoice;
use iapt_format::{validate_file, Code, DType};

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
    /// Tensor dtype of OUT: keep each tensor's, convert every tensor (f32, f16, bf16; a Q8_0
    /// matrix is decoded exactly first), or q8_0: quantize `down.weight` and `up.weight` (ggml's
    /// Q8_0, rows a multiple of 32 values) and keep every other tensor.
    #[arg(long, value_name = "keep|f32|f16|bf16|q8_0", default_value = "keep")]
    pub dtype: DTypeChoice,
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
    let adapter = match args.dtype {
        DTypeChoice::Keep => adapter,
        DTypeChoice::To(dtype) => adapter.with_dtype(dtype).with_context(|| format!("reading {}", args.input.display()))?,
    };
    if args.dtype == DTypeChoice::To(DType::Q8_0) {
        let kept: Vec<String> = adapter
            .tensors()
            .iter()
            .filter(|t| t.name().role.is_matrix() && t.dtype() != DType::Q8_0)
            .map(|t| t.name().to_string())
            .collect();
        if !kept.is_empty() {
            eprintln!("note: {} matrices keep their dtype (rows not a multiple of 32 values): {}", kept.len(), kept.join(", "));
        }
    }
    adapter.save(&args.output, container).with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote {} ({container}, spec {}, {} tensors, {} parameters, {} data bytes)",
        args.output.display(),
        adapter.config().spec_version,
        adapter.tensors().len(),
        adapter.param_count(),
        adapter.data_bytes()
    );
    Ok(ExitCode::SUCCESS)
}
