//! A failed decode fails only the sequences that brought new rows into it (issue 27, finding 2):
//! the failpoint `decode@2` (debug builds, `iapt_engine`'s `fault` module) fails the second step,
//! which holds request A's decode token and request B's prefill. B fails with the decode's error;
//! A's cells at the failed position are removed and A is retried: its tokens equal its tokens
//! alone, and every cell is free at the end. Its own test binary: the failpoint is per process.

use std::path::PathBuf;

use iapt_engine::{Engine, EngineConfig, EngineError, EventKind, Request};
use iapt_llama::{KvType, Model};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures/models")
}

fn config(parallel: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        seq_ctx: 64,
        batch_tokens: 64,
        n_ubatch: 64,
        queue_capacity: 4,
        n_threads: 1,
        kv_type: KvType::F32,
        flash_attn: Some(false),
        ..EngineConfig::default()
    }
}

fn request(prompt: &[i32]) -> Request {
    Request { stop_at_eog: false, ..Request::new(prompt.to_vec(), 8) }
}

#[test]
#[cfg_attr(not(debug_assertions), ignore = "the failpoints exist in debug builds only")]
fn a_failed_decode_fails_the_new_sequence_and_retries_the_decoding_one() {
    std::env::set_var("IAPT_FAULT", "decode@2");
    let m = Model::load(&fixtures().join("llama-tiny-f32.gguf")).unwrap();
    let (a_prompt, b_prompt) = ([1, 5, 9, 13, 17], [1, 2, 3]);
    let mut e = Engine::new(&m, config(2)).unwrap();
    let a = e.submit(request(&a_prompt)).unwrap();
    let mut a_tokens = Vec::new();
    let mut b_error = None;
    let record = |evs: Vec<iapt_engine::Event>, a_tokens: &mut Vec<i32>, b_error: &mut Option<EngineError>| {
        for ev in evs {
            match ev.kind {
                EventKind::Token(t) if ev.id == a => a_tokens.push(t.token),
                EventKind::Failed(err) if ev.id != a => *b_error = Some(err),
                EventKind::Failed(err) => panic!("A failed: {err}"),
                _ => {}
            }
        }
    };
    // Step 1: A's prefill. Then B arrives: step 2 holds A's decode token and B's prefill, and fails.
    let evs = e.step();
    record(evs, &mut a_tokens, &mut b_error);
    let b = e.submit(request(&b_prompt)).unwrap();
    assert_ne!(a, b);
    while !e.is_idle() {
        let evs = e.step();
        record(evs, &mut a_tokens, &mut b_error);
    }
    let err = b_error.expect("B failed");
    assert!(matches!(&err, EngineError::DecodeFailed { detail } if detail.contains("failpoint decode@2")), "{err}");
    assert_eq!(e.cells_in_use(), 0, "every cell freed");
    // A alone, on a fresh engine whose failpoint step is spent first: one request of one step,
    // then one that meets the failed step 2 (and fails: its prefill is blamed).
    let mut fresh = Engine::new(&m, config(1)).unwrap();
    assert!(fresh.complete(Request::new(vec![1], 1), &mut |_| {}).is_ok());
    assert!(matches!(fresh.complete(Request::new(vec![1], 1), &mut |_| {}), Err(EngineError::DecodeFailed { .. })));
    assert_eq!(fresh.cells_in_use(), 0);
    let alone: Vec<i32> = fresh.complete(request(&a_prompt), &mut |_| {}).unwrap().tokens.iter().map(|t| t.token).collect();
    assert_eq!(a_tokens, alone, "A, retried after the failed step, equals A alone");
}
