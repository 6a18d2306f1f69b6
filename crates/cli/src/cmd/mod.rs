//! One module per subcommand: each has its clap `Args` and a `run` returning the exit code.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod pack;
pub mod quantize;
pub mod run;
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
