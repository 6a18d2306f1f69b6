//! One module per subcommand: each has its clap `Args` and a `run` returning the exit code.

pub mod batch;
pub mod bench;
pub mod bench_gpu;
pub mod convert;
pub mod demo;
pub mod devices;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod pack;
pub mod quantize;
pub mod run;
pub mod serve;
pub mod validate;

use std::process::ExitCode;

/// Exit code for usage errors and unreadable inputs.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for failures and invalid inputs.
pub const EXIT_FAILURE: u8 = 1;

/// `ExitCode` for a code above.
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

/// The container an output path's extension names (`.safetensors` or `.gguf`); otherwise prints
/// the usage error and returns `None` (the caller exits with [`EXIT_USAGE`]).
pub fn output_container(path: &std::path::Path) -> Option<iapt_format::Container> {
    let c = iapt_format::Container::from_extension(path);
    if c.is_none() {
        eprintln!("error: {}: cannot tell the container from the extension; name the output *.safetensors or *.gguf", path.display());
    }
    c
}
