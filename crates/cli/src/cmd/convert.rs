//! `iapt convert CKPT [--config C] [--profile P] [--base B] [--dtype keep|f32|f16|bf16|q8_0] -o OUT`:
//! a trained PyTorch checkpoint (torch.save zip, safetensors, or a sharded `*.index.json`) to an
//! IAPT adapter in the container OUT's extension names. The checkpoint's pickle is never run: any
//! global a state_dict does not need is refused by name (exit 1, nothing written).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use iapt_convert::{convert_to_file, DTypeChoice, Options, Profile};
use iapt_format::BaseModelInfo;

use anyhow::Context as _;

use super::{exit, EXIT_FAILURE, EXIT_USAGE};
use crate::files;

/// Inputs at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 32 << 20;

/// Arguments of `iapt convert`.
#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint: a torch.save file (.bin/.pt/.pth), a .safetensors file, or a *.index.json of shards.
    pub checkpoint: PathBuf,
    /// Hyperparameter JSON: n_soft_tokens, bottleneck, activation {kind, variant}, base_model_arch,
    /// pool_scale (default 1.0). Values the tensor shapes give may be left out.
    #[arg(long, value_name = "C")]
    pub config: Option<PathBuf>,
    /// Name mapping: a built-in profile name (reference, blocks) or a profile JSON file.
    #[arg(long, value_name = "P", default_value = "reference")]
    pub profile: String,
    /// The base model GGUF: fills and checks the architecture, n_layer and n_embd.
    #[arg(long, value_name = "B")]
    pub base: Option<PathBuf>,
    /// Output dtype: keep the source dtype, convert every tensor, or (q8_0) quantize the two
    /// matrices (rows a multiple of 32 values) and keep the other tensors' dtypes.
    #[arg(long, value_name = "keep|f32|f16|bf16|q8_0", default_value = "keep")]
    pub dtype: DTypeChoice,
    /// The adapter to write; `.safetensors` or `.gguf` chooses the container.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
}

/// Checks every input file (the checkpoint, its shards, `--config`, a profile file, `--base`).
fn check_inputs(args: &Args) -> Result<Vec<files::Input>, crate::fail::Fail> {
    let mut list: Vec<(&str, std::path::PathBuf)> = vec![("the checkpoint", args.checkpoint.clone())];
    if iapt_convert::is_index_path(&args.checkpoint) {
        // Shards are checked when the index is readable; a broken index is reported by the converter.
        if let Ok(index) = iapt_convert::read_index(&args.checkpoint) {
            list.extend(index.shards.into_iter().map(|p| ("the shard", p)));
        }
    }
    if let Some(c) = &args.config {
        list.push(("the config", c.clone()));
    }
    let profile = std::path::Path::new(&args.profile);
    if profile.extension().is_some_and(|e| e == "json") {
        list.push(("the profile", profile.to_owned()));
    }
    if let Some(b) = &args.base {
        list.push(("the base model", b.clone()));
    }
    list.iter().map(|(label, p)| files::input(label, p)).collect()
}

/// Runs `iapt convert`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let inputs = check_inputs(args)?;
    files::output("-o", &args.output, &["safetensors", "gguf"], &inputs)?;
    let container = super::output_container(&args.output)?;
    let profile = match Profile::load(&args.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(exit(EXIT_USAGE));
        }
    };
    let base = match &args.base {
        Some(p) => Some(BaseModelInfo::read(p).context("--base")?),
        None => None,
    };
    let opts = Options { config: args.config.clone(), profile, base, dtype: args.dtype };

    let mut bar: Option<indicatif::ProgressBar> = None;
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |done: u64, total: u64| {
        if bar.is_none() && terminal && total >= PROGRESS_MIN_BYTES {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {elapsed}") {
                b.set_style(style);
            }
            bar = Some(b);
        }
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let result = convert_to_file(&args.checkpoint, &args.output, &opts, &mut progress);
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    match result {
        Ok(conv) => {
            let a = &conv.adapter;
            let shared: Vec<&str> = conv.shared.iter().map(|r| r.as_str()).collect();
            eprintln!(
                "wrote {} ({container}, {} tensors, {} parameters{}{})",
                args.output.display(),
                a.tensors().len(),
                a.param_count(),
                if shared.is_empty() { String::new() } else { format!("; shared across layers: {}", shared.join(", ")) },
                if conv.ignored.is_empty() { String::new() } else { format!("; {} unmapped keys ignored", conv.ignored.len()) },
            );
            if !conv.ignored.is_empty() {
                let some: Vec<&str> = conv.ignored.iter().take(3).map(String::as_str).collect();
                let more = if conv.ignored.len() > 3 { ", ..." } else { "" };
                eprintln!("note: the profile {:?} maps no tensor to {}{more}", opts.profile.name(), some.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("nothing was written to {}", args.output.display());
            Ok(exit(if e.is_unreadable() { EXIT_USAGE } else { EXIT_FAILURE }))
        }
    }
}
