//! `iapt`: the IAPT toolkit's command line.
//!
//! Exit codes (every subcommand):
//! - 0: success (for `validate`: the file is valid);
//! - 1: failure (for `validate`: the file is invalid; elsewhere: bad input, incompatible files);
//! - 2: usage error or an unreadable input file.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// IAPT adapters from PyTorch training to llama.cpp inference.
#[derive(Parser)]
#[command(name = "iapt", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show an adapter's config, tensor table, parameter count and size.
    Inspect(cmd::inspect::Args),
    /// Check an adapter against every rule of spec v1 (exit 0 valid, 1 invalid, 2 unreadable).
    Validate(cmd::validate::Args),
    /// Re-write an adapter in the container named by the output's extension (.safetensors or .gguf).
    Pack(cmd::pack::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Pack(a) => cmd::pack::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
