//! `iapt quantize IN.gguf -o OUT.gguf --type q8_0|q4_k_m|f16 [--threads N]`: quantize a base model
//! with llama.cpp's `llama_model_quantize`.
//!
//! The output is written atomically: llama.cpp writes a temporary file in the output's directory
//! (named and registered as `iapt_format::temp` says, so an interrupt removes it),
//! which is renamed over OUT only when quantization succeeded (a failure leaves OUT untouched).
//! For K-quants the tensor shapes are checked first: llama.cpp quantizes a tensor whose rows are
//! not a multiple of 256 values with a fallback type, which is reported as a warning.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use iapt_llama::Quant;

use crate::fail::Fail;
use crate::files;

/// Target type.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum QuantArg {
    /// 8-bit blocks of 32 (`LLAMA_FTYPE_MOSTLY_Q8_0`).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit K-quant, medium (`LLAMA_FTYPE_MOSTLY_Q4_K_M`; rows must be multiples of 256 values).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// 16-bit floats.
    F16,
}

impl QuantArg {
    fn quant(self) -> Quant {
        match self {
            QuantArg::Q8_0 => Quant::Q8_0,
            QuantArg::Q4KM => Quant::Q4KM,
            QuantArg::F16 => Quant::F16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            QuantArg::Q8_0 => "q8_0",
            QuantArg::Q4KM => "q4_k_m",
            QuantArg::F16 => "f16",
        }
    }
}

/// K-quant super-block size: rows must be a multiple of this many values.
const QK_K: i64 = 256;

/// Arguments of `iapt quantize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to quantize (GGUF, usually F16 or F32).
    #[arg(value_name = "IN.gguf")]
    pub input: PathBuf,
    /// The quantized model to write.
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Target type.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub quant: QuantArg,
    /// Threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Show llama.cpp's log on stderr.
    #[arg(long)]
    pub verbose: bool,
}

/// The temporary path llama.cpp writes to: a name of the `iapt_format::temp` form in the output's
/// directory.
fn temp_path(out: &Path) -> PathBuf {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!("{}{name}", iapt_format::temp::temp_prefix()))
}

/// Runs `iapt quantize`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.verbose);
    if args.threads == Some(0) {
        return Err(Fail::usage("--threads 0: the number of threads must be at least 1").into());
    }
    let input = files::input("the model to quantize", &args.input)?;
    files::output("-o", &args.output, &["gguf"], &[input])?;
    let tmp = temp_path(&args.output);
    if let Some(dir) = tmp.parent() {
        iapt_format::temp::remove_stale(dir);
    }
    iapt_format::BaseModelInfo::read(&args.input).context("cannot read the model's header")?;
    let summary = iapt_llama::gguf_probe(&args.input).with_context(|| format!("cannot read {}", args.input.display()))?;
    if matches!(args.quant, QuantArg::Q4KM) {
        let odd: Vec<String> = summary
            .tensors
            .iter()
            .filter(|t| t.ne[1] > 1 && t.ne[0] % QK_K != 0)
            .map(|t| format!("{} (rows of {})", t.name, t.ne[0]))
            .collect();
        if !odd.is_empty() {
            eprintln!(
                "warning: {} tensor(s) have rows that are not a multiple of {QK_K} values, so llama.cpp quantizes them with a fallback type: {}",
                odd.len(),
                odd.join(", ")
            );
        }
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let _in_flight = iapt_format::temp::register(&tmp);
    let result = iapt_llama::quantize(&args.input, &tmp, args.quant.quant(), i32::try_from(threads).unwrap_or(i32::MAX))
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            std::fs::rename(&tmp, &args.output).with_context(|| format!("cannot move {} to {}", tmp.display(), args.output.display()))
        });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let in_size = std::fs::metadata(&args.input).map(|m| m.len()).unwrap_or(0);
    let out_size = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "{} ({:.2} MB) -> {} ({:.2} MB, {})",
        args.input.display(),
        in_size as f64 / 1e6,
        args.output.display(),
        out_size as f64 / 1e6,
        args.quant.name()
    );
    Ok(ExitCode::SUCCESS)
}
