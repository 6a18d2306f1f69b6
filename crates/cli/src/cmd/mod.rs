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
pub mod rpc_server;
pub mod run;
pub mod serve;
pub mod validate;

use std::process::ExitCode;

pub use crate::fail::{EXIT_FAILURE, EXIT_USAGE};

/// `println!` that returns the write's `io::Result` instead of panicking, so that a closed stdout
/// ends the command quietly (see `crate::fail`).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `ExitCode` for a code above.
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

/// The container an output path's extension names (`.safetensors` or `.gguf`), or the usage error.
pub fn output_container(path: &std::path::Path) -> Result<iapt_format::Container, crate::fail::Fail> {
    iapt_format::Container::from_extension(path).ok_or_else(|| {
        crate::fail::Fail::usage(format!(
            "{}: cannot tell the container from the extension; name the output *.safetensors or *.gguf",
            path.display()
        ))
    })
}
