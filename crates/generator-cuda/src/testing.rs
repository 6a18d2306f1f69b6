//! The CUDA device for a test: [`cuda_for_test`] opens device 0, or explains why the test is
//! skipped. On a machine that must have a GPU (the GPU machine's scripts set `IAPT_REQUIRE_CUDA=1`),
//! a missing device fails the test instead, so a GPU run cannot pass by skipping.

use std::sync::Arc;

use crate::{GpuError, GpuRuntime};

/// The environment variable that turns every CUDA skip into a failure.
pub const REQUIRE_CUDA_VAR: &str = "IAPT_REQUIRE_CUDA";

/// Whether `IAPT_REQUIRE_CUDA` asks for a CUDA device (`1`, `true` or `yes`).
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// What a test does when device 0 cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Skip, printing this line (`skipped: ...`) to stderr.
    Skip(String),
    /// Fail with this message: `IAPT_REQUIRE_CUDA=1` and no device.
    Fail(String),
}

/// Decides what a test named `test` does about `err` (why device 0 could not be opened), given
/// whether a device is required.
pub fn on_missing(test: &str, err: &GpuError, required: bool) -> Missing {
    if required {
        Missing::Fail(format!("{test}: {REQUIRE_CUDA_VAR}=1 but CUDA device 0 is missing or unusable: {err}"))
    } else {
        Missing::Skip(format!("{test}: skipped on CUDA: {err} (set {REQUIRE_CUDA_VAR}=1 to make this a failure)"))
    }
}

/// CUDA device 0 for test `test`, or `None` after printing why the test is skipped. Panics (fails
/// the test) instead when `IAPT_REQUIRE_CUDA=1`.
pub fn cuda_for_test(test: &str) -> Option<Arc<GpuRuntime>> {
    match GpuRuntime::cuda(0) {
        Ok(rt) => Some(rt),
        Err(e) => match on_missing(test, &e, cuda_required()) {
            Missing::Skip(line) => {
                eprintln!("{line}");
                None
            }
            Missing::Fail(msg) => panic!("{msg}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_required_device_that_is_missing_fails_and_names_the_device() {
        let err = GpuError::CudaUnavailable { reason: "libcuda cannot be loaded".to_owned() };
        match on_missing("t", &err, true) {
            Missing::Fail(msg) => {
                assert!(msg.contains("CUDA device 0") && msg.contains("IAPT_REQUIRE_CUDA=1") && msg.contains("libcuda"), "{msg}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(on_missing("t", &err, false), Missing::Skip(l) if l.contains("skipped")));
    }
}
