//! The CUDA device for a test. A CUDA variant of a test is compiled with
//! `#[cfg_attr(not(feature = "cuda"), ignore = ...)]`: in a build without CUDA (CI) the harness
//! reports it as ignored, with the reason; in a build with CUDA (the GPU machine's) it runs, and a
//! missing device fails it ([`cuda_for_test`]): no CUDA test passes after doing nothing. Tests that
//! check what happens without a device (availability reports, NVRTC) fail instead of reporting it
//! when `IAPT_REQUIRE_CUDA=1` ([`cuda_required`]), which the GPU machine's scripts set.

use std::sync::Arc;

use crate::{GpuError, GpuRuntime};

/// The environment variable that turns every CUDA skip into a failure.
pub const REQUIRE_CUDA_VAR: &str = "IAPT_REQUIRE_CUDA";

/// Whether `IAPT_REQUIRE_CUDA` asks for a CUDA device (`1`, `true` or `yes`).
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// Why the CUDA variants of tests are ignored in a build without the `cuda` feature (the reason
/// `#[cfg_attr(not(feature = "cuda"), ignore = ...)]` gives, repeated for callers that print it).
pub const IGNORED_WITHOUT_CUDA: &str = "built without the `cuda` feature: the CUDA variant runs on a GPU machine (scripts/gpu/)";

/// The message of a CUDA test that cannot open device 0: in a build with the `cuda` feature the
/// device is required (such a build is for a GPU machine), so the test fails instead of passing
/// after doing nothing.
pub fn missing_device(test: &str, err: &GpuError) -> String {
    format!("{test}: CUDA device 0 is missing or unusable in a build with the `cuda` feature: {err}")
}

/// CUDA device 0 for test `test`. Call it only from tests compiled with the `cuda` feature (the
/// others are ignored with [`IGNORED_WITHOUT_CUDA`]); it fails the test when there is no usable
/// device.
pub fn cuda_for_test(test: &str) -> Arc<GpuRuntime> {
    GpuRuntime::cuda(0).unwrap_or_else(|e| panic!("{}", missing_device(test, &e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_message_names_the_device_and_the_reason() {
        let err = GpuError::CudaUnavailable { reason: "libcuda cannot be loaded".to_owned() };
        let msg = missing_device("t", &err);
        assert!(msg.contains("CUDA device 0") && msg.contains("`cuda` feature") && msg.contains("libcuda"), "{msg}");
    }
}
