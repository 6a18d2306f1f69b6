//! Failpoints for the tests of failure handling, in debug builds only (compiled to `false` in
//! release builds): a panic inside a step, or a step whose decode fails as llama.cpp's would.
//! Neither can be provoked from outside otherwise (the engine's admission rules keep llama.cpp
//! from failing, and it has no panicking path on purpose). `IAPT_FAULT` holds comma-separated
//! `NAME@STEP` entries, STEP counting the steps that decoded something from 1:
//! `panic@3` panics in the third such step, `decode@2` fails the second one's decode.

/// Whether failpoint `name` fires at decoding step `step`.
#[cfg(debug_assertions)]
pub(crate) fn hit(name: &str, step: u64) -> bool {
    use std::sync::OnceLock;
    static SPEC: OnceLock<Vec<(String, u64)>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        std::env::var("IAPT_FAULT")
            .unwrap_or_default()
            .split(',')
            .filter_map(|e| e.trim().split_once('@').and_then(|(n, s)| Some((n.to_owned(), s.parse().ok()?))))
            .collect()
    });
    spec.iter().any(|(n, s)| n == name && *s == step)
}

/// Whether failpoint `name` fires at decoding step `step` (never, in a release build).
#[cfg(not(debug_assertions))]
pub(crate) fn hit(_name: &str, _step: u64) -> bool {
    false
}
