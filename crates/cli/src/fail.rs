//! One classification of every error into the three exit codes (README, "CLI reference"):
//!
//! | kind | exit | examples |
//! | --- | --- | --- |
//! | [`Kind::Usage`] | 2 | a bad option value, an output path that is a directory, lies in a missing or read-only directory, has the wrong extension, or is the same file as an input |
//! | [`Kind::Unreadable`] | 2 | an input that does not exist, is a directory or not a regular file, cannot be opened or read, or a truncated base model |
//! | [`Kind::Invalid`] | 1 | readable input with wrong content (not an adapter, not a model, malformed, incompatible files), and any failure while working |
//!
//! Commands return `anyhow::Result`; an error carrying a [`Fail`] (or a typed library error that
//! says it is unreadable input) gets its kind's code, any other error is 1. A closed stdout (a
//! `BrokenPipe` error anywhere in the chain) ends the program quietly with 0, as ripgrep does.

use std::fmt;
use std::process::ExitCode;

/// Exit code for usage errors and unreadable inputs.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for invalid inputs and failures.
pub const EXIT_FAILURE: u8 = 1;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The command line asks for something impossible (exit 2).
    Usage,
    /// An input file cannot be read (exit 2).
    Unreadable,
    /// An input's content is wrong, or the work failed (exit 1).
    Invalid,
}

impl Kind {
    /// The exit code of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Usage | Kind::Unreadable => EXIT_USAGE,
            Kind::Invalid => EXIT_FAILURE,
        }
    }
}

/// A classified error: its kind and the message (which names the file and the fix).
#[derive(Debug)]
pub struct Fail {
    /// The kind.
    pub kind: Kind,
    /// The message.
    pub message: String,
}

impl Fail {
    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Fail {
        Fail { kind: Kind::Usage, message: message.into() }
    }

    /// An unreadable input.
    pub fn unreadable(message: impl Into<String>) -> Fail {
        Fail { kind: Kind::Unreadable, message: message.into() }
    }

    /// Invalid input content.
    pub fn invalid(message: impl Into<String>) -> Fail {
        Fail { kind: Kind::Invalid, message: message.into() }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fail {}

/// The kind of an error: the first classified error in its chain, else [`Kind::Invalid`].
pub fn kind_of(err: &anyhow::Error) -> Kind {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Fail>() {
            return f.kind;
        }
        if let Some(b) = cause.downcast_ref::<iapt_format::BaseModelError>() {
            return if b.is_unreadable() { Kind::Unreadable } else { Kind::Invalid };
        }
    }
    Kind::Invalid
}

/// Whether the error is a write to a closed pipe.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Reports an error on stderr and gives the exit code (a broken pipe: quietly, 0).
pub fn report(err: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {}", message(err));
    ExitCode::from(kind_of(err).exit_code())
}

/// The error and its causes joined with ": ", leaving out a cause whose text the message already
/// holds (library errors often print their source too, which would show an OS error twice).
pub fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_decide_exit_codes_and_causes_are_printed_once() {
        let os = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let lib = anyhow::Error::new(iapt_format::BaseModelError::Io { path: "m.gguf".into(), source: os });
        let err = lib.context("cannot read the base model's header");
        assert_eq!(kind_of(&err), Kind::Unreadable);
        let m = message(&err);
        assert_eq!(m.matches("os error 2").count(), 1, "{m}");
        assert!(m.starts_with("cannot read the base model's header: "), "{m}");
        assert_eq!(kind_of(&anyhow::Error::new(Fail::usage("x")).context("y")), Kind::Usage);
        assert_eq!(kind_of(&anyhow::anyhow!("decode failed")), Kind::Invalid);
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing to stdout");
        assert!(is_broken_pipe(&pipe));
        assert_eq!(Kind::Usage.exit_code(), 2);
        assert_eq!(Kind::Unreadable.exit_code(), 2);
        assert_eq!(Kind::Invalid.exit_code(), 1);
    }
}
