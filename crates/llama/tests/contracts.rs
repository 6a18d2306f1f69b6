//! The FFI contracts the safe wrapper claims, each checked where it can break (the hook's own,
//! such as GPU work waited for on every exit of the callback, are tested in `iapt-hook` and, through
//! llama.cpp, in `iapt-engine`'s tests):
//! - `logits_only_for_rows_that_asked`: `Context::logits` refuses batch rows that did not ask
//!   for logits, and rows beyond the batch;
//! - `callback_state_survives_moves_and_is_freed_once`: the callback state handed to llama.cpp
//!   stays valid when the `Context` moves, and is released exactly once when it drops;
//! - `chat_messages_keep_every_message_in_order`: `Model::apply_chat_messages` with one user message
//!   is `apply_chat_template`, and a conversation renders every message once, in order, longer than
//!   its first turn; a model without a template and a NUL in a message are errors, not aborts;
//! - `split_matches_llama_cpp`: `iapt_llama::split` (which batch rows each ubatch's graph holds,
//!   in graph order) is what the linked llama.cpp does, with one KV stream and with one stream per
//!   sequence, read back from the graph's token embeddings over random batches.
//!
//! The f32-rows check over all four strides is a unit test of `ffi`; "one writable view of a node
//! at a time" is a `compile_fail` doctest on `NodeData::gpu_rows_mut`; "no C++ exception crosses
//! the boundary" is `text_path.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use iapt_generator::testing::Rng;
use iapt_hook::Split;
use iapt_llama::{Batch, Context, ContextParams, EvalCallback, KvType, LlamaError, Model, NodeData, NodeInfo};

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../../converters/python/fixtures/models")
}

fn params(n_seq_max: u32) -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_batch: 256,
        n_ubatch: 256,
        n_threads: 1,
        flash_attn: Some(false),
        kv_type: KvType::F32,
        n_seq_max,
        kv_unified: true,
    }
}

fn model() -> Model {
    Model::load(&fixtures().join("llama-tiny-f32.gguf")).expect("fixture model")
}

#[test]
fn logits_only_for_rows_that_asked() {
    let model = model();
    let mut ctx = Context::new(&model, &params(1), None).expect("context");
    let mut batch = Batch::new(8);
    for i in 0..3 {
        batch.push(1 + i, i, i == 2).unwrap();
    }
    assert!(ctx.logits(2).is_none(), "nothing decoded yet");
    ctx.decode(&batch).unwrap();
    assert_eq!(ctx.logits(2).map(<[f32]>::len), Some(model.n_vocab()));
    assert!(ctx.logits(0).is_none() && ctx.logits(1).is_none(), "rows 0 and 1 did not ask for logits");
    assert!(ctx.logits(3).is_none() && ctx.logits(usize::MAX).is_none(), "rows beyond the batch");
    ctx.clear_kv();
    assert!(ctx.logits(2).is_none(), "a cleared context has no logits");
}

/// Counts the nodes it is offered and claims none.
struct Counting(AtomicUsize);

impl EvalCallback for Counting {
    fn wants(&self, _node: &NodeInfo<'_>) -> bool {
        self.0.fetch_add(1, Ordering::SeqCst);
        false
    }
    fn on_data(&self, _node: &mut NodeData<'_>) {}
}

#[test]
fn callback_state_survives_moves_and_is_freed_once() {
    let model = model();
    let cb = Arc::new(Counting(AtomicUsize::new(0)));
    let ctx = Context::new(&model, &params(1), Some(cb.clone() as Arc<dyn EvalCallback>)).expect("context");
    assert_eq!(Arc::strong_count(&cb), 2, "the context holds the callback");
    // Move the context twice (into a box, then out of a vector) before llama.cpp calls back.
    let mut moved = vec![Box::new(ctx)].pop().unwrap();
    let mut batch = Batch::new(4);
    batch.push(1, 0, true).unwrap();
    moved.decode(&batch).unwrap();
    assert!(cb.0.load(Ordering::SeqCst) > 0, "llama.cpp reached the callback through the moved context");
    drop(moved);
    assert_eq!(Arc::strong_count(&cb), 1, "dropping the context released the callback state");
}

/// Claims `l_out-0` and compares the in-place view of its rows with a copy through the backend API.
struct ViewVsCopy(std::sync::Mutex<Vec<String>>);

impl EvalCallback for ViewVsCopy {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        node.name() == "l_out-0"
    }
    fn on_data(&self, node: &mut NodeData<'_>) {
        let mut log = self.0.lock().unwrap();
        let [d, rows, ..] = node.ne().map(|v| v as usize);
        if !node.rows_in_host_memory() {
            log.push("a CPU node is not in host memory".to_owned());
            return;
        }
        let view = node.host_rows(1, rows - 1).map(<[f32]>::to_vec);
        let mut copy = vec![0.0f32; (rows - 1) * d];
        node.read_rows(1, &mut copy).unwrap();
        match view {
            Ok(v) if v == copy => log.push("equal".to_owned()),
            Ok(_) => log.push("the view differs from the copy".to_owned()),
            Err(e) => log.push(format!("view failed: {e}")),
        }
        if node.host_rows(1, rows).is_ok() {
            log.push("a view past the last row was allowed".to_owned());
        }
    }
}

#[test]
fn rows_viewed_in_place_equal_a_copy_and_stay_in_bounds() {
    let model = model();
    let cb = Arc::new(ViewVsCopy(std::sync::Mutex::new(Vec::new())));
    let mut ctx = Context::new(&model, &params(1), Some(cb.clone() as Arc<dyn EvalCallback>)).expect("context");
    let mut batch = Batch::new(8);
    for i in 0..5 {
        batch.push(1 + i, i, i == 4).unwrap();
    }
    ctx.decode(&batch).unwrap();
    assert_eq!(*cb.0.lock().unwrap(), vec!["equal".to_owned()]);
}

#[test]
fn chat_messages_keep_every_message_in_order() {
    let m = model();
    assert_eq!(m.apply_chat_messages(&[("user", "alpha")]).unwrap(), m.apply_chat_template("alpha").unwrap());
    let conv = [("system", "be brief"), ("user", "alpha"), ("assistant", "beta"), ("user", "gamma")];
    let text = m.apply_chat_messages(&conv).unwrap();
    let first = m.apply_chat_messages(&conv[..2]).unwrap();
    assert!(text.len() > first.len(), "{text:?}");
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle:?} missing from {text:?}"));
    assert!(at("alpha") < at("gamma"), "{text:?}");
    assert!(matches!(m.apply_chat_messages(&[("user", "a\0b")]), Err(LlamaError::ChatTemplate { .. })));
    let demo = Model::load(&fixtures().join("../../demo/assets/base-q4_k_m.gguf")).expect("demo model");
    assert!(demo.chat_template().is_some_and(|t| t.contains("raise_exception")), "the demo model ships a Jinja template");
    assert!(
        matches!(demo.apply_chat_messages(&[("user", "x")]), Err(LlamaError::ChatTemplate { .. })),
        "llama.cpp's built-in formats do not cover it (iapt-engine renders it with Jinja)"
    );
    let names = iapt_llama::builtin_chat_templates();
    assert!(["chatml", "llama2", "llama3", "gemma"].iter().all(|n| names.iter().any(|m| m == n)), "{names:?}");
    for n in &names {
        assert!(iapt_llama::apply_chat_template_named(n, &[("user", "x")]).is_ok(), "built-in {n} applies");
    }
}

/// Records the rows of every `embd` node (the token embeddings: layer 0's input), one entry per
/// ubatch.
struct Embeddings(std::sync::Mutex<Vec<Vec<Vec<f32>>>>);

impl EvalCallback for Embeddings {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        node.name() == "embd"
    }
    fn on_data(&self, node: &mut NodeData<'_>) {
        let [d, rows, ..] = node.ne().map(|v| v as usize);
        let mut all = vec![0.0f32; d * rows];
        node.read_rows(0, &mut all).unwrap();
        self.0.lock().unwrap().push(all.chunks(d).map(<[f32]>::to_vec).collect());
    }
}

#[test]
fn split_matches_llama_cpp() {
    let model = model();
    let n_vocab = model.n_vocab() as i32;
    // Each token's embedding row, from one decode of tokens 1..=200 in one sequence.
    let cb = Arc::new(Embeddings(std::sync::Mutex::new(Vec::new())));
    let mut ctx = Context::new(&model, &params(1), Some(cb.clone() as Arc<dyn EvalCallback>)).unwrap();
    let mut batch = Batch::new(256);
    for t in 1..=200 {
        batch.push(t, t - 1, t == 200).unwrap();
    }
    ctx.decode(&batch).unwrap();
    let table: Vec<Vec<f32>> = cb.0.lock().unwrap().concat();
    assert_eq!(table.len(), 200);
    let mut rng = Rng::new(20261207);
    for (unified, n_ubatch) in [(false, 256), (false, 7), (false, 12), (true, 7)] {
        let n_seq = 6;
        let p = ContextParams { n_ctx: 256 * n_seq, n_batch: 256, n_ubatch, n_seq_max: n_seq, kv_unified: unified, ..params(1) };
        let cb = Arc::new(Embeddings(std::sync::Mutex::new(Vec::new())));
        let mut ctx = Context::new(&model, &p, Some(cb.clone() as Arc<dyn EvalCallback>)).unwrap();
        let mut len = [0i32; 6];
        for step in 0..12 {
            // Each sequence: absent, one decode token, or a chunk of up to 20 rows; sequences in a
            // random order, each one's rows together (as the engine and libiapt's hosts make them).
            let mut order: Vec<i32> = (0..n_seq as i32).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            batch.clear();
            for &s in &order {
                let k = [0, 1, 1 + rng.below(20)][rng.below(3)];
                for _ in 0..k {
                    let t = 1 + batch.len() as i32;
                    batch.push_seq(t, len[s as usize], s, false).unwrap();
                    len[s as usize] += 1;
                }
            }
            if batch.is_empty() {
                continue;
            }
            let tokens: Vec<usize> = (0..batch.len()).collect();
            let ubatches = match ctx.split(&batch) {
                Split::Planned(u) => u,
                Split::Simple { batch_len, n_ubatch } => {
                    (0..batch_len).step_by(n_ubatch).map(|r| std::iter::once(r..(r + n_ubatch).min(batch_len)).collect()).collect()
                }
            };
            cb.0.lock().unwrap().clear();
            ctx.decode(&batch).unwrap();
            let seen = cb.0.lock().unwrap().clone();
            let want: Vec<Vec<Vec<f32>>> =
                ubatches.iter().map(|u| u.iter().flat_map(|r| tokens[r.clone()].iter().map(|&t| table[t].clone())).collect()).collect();
            assert!(seen == want, "unified {unified}, n_ubatch {n_ubatch}, step {step}: llama.cpp split the batch of {} rows into ubatches of {:?} rows, the plan says {:?}",
                batch.len(), seen.iter().map(Vec::len).collect::<Vec<_>>(), ubatches);
        }
        assert!(len.iter().all(|&l| l < 256) && n_vocab > 200);
    }
}
