//! A panic on the engine thread (issue 27, finding 7): the failpoint `panic@3` (debug builds)
//! panics in the third step. The request in flight gets `EngineError::Panicked`, the handle
//! reports the failure, and later calls fail with `Stopped` instead of hanging. Its own test
//! binary: the failpoint is per process.

use std::path::PathBuf;

use iapt_engine::{EngineConfig, EngineError, EngineHandle, EngineSpec, EventKind, Request};
use iapt_llama::KvType;

#[test]
#[cfg_attr(not(debug_assertions), ignore = "the failpoints exist in debug builds only")]
fn a_panicking_step_fails_the_requests_in_flight_and_is_reported() {
    std::env::set_var("IAPT_FAULT", "panic@3");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models/llama-tiny-f32.gguf");
    let config = EngineConfig { parallel: 2, seq_ctx: 64, batch_tokens: 64, n_threads: 1, kv_type: KvType::F32, ..EngineConfig::default() };
    let h = EngineHandle::spawn(EngineSpec { model, model_params: Default::default(), config, adapters: Vec::new() }).unwrap();
    assert_eq!(h.failure(), None);
    let (_, events) = h.submit(Request { stop_at_eog: false, ..Request::new(vec![1, 2, 3], 16) }).unwrap();
    let mut tokens = 0;
    let mut failed = None;
    for ev in events {
        match ev.kind {
            EventKind::Token(_) => tokens += 1,
            EventKind::Failed(e) => failed = Some(e),
            EventKind::Done(_) => panic!("the request cannot finish: step 3 panics"),
        }
    }
    assert_eq!(tokens, 2, "steps 1 and 2 each gave a token");
    let e = failed.expect("the request fails");
    assert!(matches!(&e, EngineError::Panicked { detail } if detail.contains("failpoint panic@3")), "{e}");
    assert!(h.failure().is_some_and(|f| f.contains("panicked")), "{:?}", h.failure());
    assert!(matches!(h.submit(Request::new(vec![1], 1)), Err(EngineError::Stopped)));
    assert!(matches!(h.status(), Err(EngineError::Stopped)));
}
