//! Unit tests of the hook on a simulated graph: a fake node type whose layer inputs are fixed
//! pseudo-random rows per (sequence, position, layer), so the soft rows the hook writes can be
//! checked against the float64 reference generator run on exactly the instruction rows it saw.
//!
//! - `chunk_boundaries_*`: a prompt prefilled in two decodes whose boundary falls one row before,
//!   exactly at, and one row after the instruction's end (and inside the soft slots), for several
//!   ubatch sizes: the soft rows equal the reference at every layer.
//! - `mixed_ubatch_*`: a decode token, a sequence without adapter, and three sequences with two
//!   adapters of different m in one ubatch: each gets its own soft rows, the other rows are
//!   untouched.
//! - `cancelled_*`: a sequence dropped after its first chunk does not disturb the other one.
//! - `short_prompt_*`: a prompt shorter than one chunk, beside a long one.
//! - `overflowing_adapter_*`: an adapter whose soft tokens overflow fails its own segment only, and
//!   writes nothing into the graph.
//! - `gpu_in_place_*`: the same on the GPU generator's emulator, whose in-place path reads and
//!   writes the fake node's host memory (what CUDA does with llama.cpp's device memory).
//! - `ubatch_mismatch_*`: a node with another row count than the ubatch plan fails the decode.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use iapt_format::{Activation, Adapter, Role, Tensor};
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_generator::Generator;
use iapt_generator_cuda::{DevRows, DevRowsMut, GpuRuntime};

use crate::{arch_spec, HookError, LayerRows, Prefill, Segment, Split, StreamHook};

const L: usize = 3;
const D: usize = 16;
/// What a soft-slot row holds before the hook writes it.
const PLACEHOLDER: f32 = 777.0;

#[derive(Debug)]
struct FakeError(String);

impl std::fmt::Display for FakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FakeError {}

/// A layer-input node of `rows.len() / D` rows in host memory.
struct FakeNode {
    name: String,
    rows: Vec<f32>,
}

impl FakeNode {
    fn range(&self, row0: usize, n: usize) -> Result<std::ops::Range<usize>, FakeError> {
        let end = (row0 + n) * D;
        if end > self.rows.len() {
            return Err(FakeError(format!("rows {row0}..{} outside {}", row0 + n, self.rows.len() / D)));
        }
        Ok(row0 * D..end)
    }
}

impl LayerRows for FakeNode {
    type Error = FakeError;
    fn name(&self) -> &str {
        &self.name
    }
    fn ne(&self) -> [i64; 4] {
        [D as i64, (self.rows.len() / D) as i64, 1, 1]
    }
    fn is_host(&self) -> bool {
        true
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<(), FakeError> {
        let r = self.range(row0, out.len() / D)?;
        out.copy_from_slice(&self.rows[r]);
        Ok(())
    }
    fn write_rows(&mut self, row0: usize, values: &[f32]) -> Result<(), FakeError> {
        let r = self.range(row0, values.len() / D)?;
        self.rows[r].copy_from_slice(values);
        Ok(())
    }
    fn host_rows(&self, row0: usize, n: usize) -> Option<Result<&[f32], FakeError>> {
        Some(self.range(row0, n).map(|r| &self.rows[r]))
    }
    #[allow(unsafe_code)]
    unsafe fn device_rows(&self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRows<'_>>, FakeError> {
        if !emulated {
            return Ok(None);
        }
        let r = self.range(row0, n)?;
        // SAFETY: the rows lie in `self.rows` (checked), which is borrowed for the view's lifetime;
        // the emulator computes on host memory; the caller synchronises before the borrow ends.
        Ok(Some(unsafe { DevRows::from_raw(self.rows[r].as_ptr() as u64, n, D) }))
    }
    #[allow(unsafe_code)]
    unsafe fn device_rows_mut(&mut self, emulated: bool, row0: usize, n: usize) -> Result<Option<DevRowsMut<'_>>, FakeError> {
        if !emulated {
            return Ok(None);
        }
        let r = self.range(row0, n)?;
        // SAFETY: as in `device_rows`, and the view borrows `self` mutably.
        Ok(Some(unsafe { DevRowsMut::from_raw(self.rows[r].as_mut_ptr() as u64, n, D) }))
    }
}

/// The layer input a fake model computes for (sequence, position, layer): fixed pseudo-random
/// values, the same whatever the batch around them.
fn hidden(seq: usize, pos: usize, layer: usize) -> Vec<f32> {
    let mut rng = Rng::new((seq as u64) << 40 | (pos as u64) << 8 | layer as u64);
    rng.vec_f32(D, 1.0)
}

/// One batch row: a sequence's position, and whether it is a soft slot.
#[derive(Debug, Clone, Copy)]
struct Row {
    seq: usize,
    pos: usize,
    soft: bool,
}

/// What the hook wrote: (sequence, position, layer) -> row, for soft slots.
type Written = HashMap<(usize, usize, usize), Vec<f32>>;

/// Runs one decode of `rows` in ubatches of `n_ubatch` through the armed hook, as llama.cpp calls
/// the callback (layer inputs in order, per ubatch); records the soft rows after the hook ran and
/// checks that it left every other row alone.
fn decode(hook: &StreamHook, rows: &[Row], n_ubatch: usize, written: &mut Written) {
    let ubatches: Vec<Vec<Range<usize>>> =
        (0..rows.len()).step_by(n_ubatch).map(|r| std::iter::once(r..(r + n_ubatch).min(rows.len())).collect()).collect();
    decode_split(hook, rows, &ubatches, written);
}

/// As [`decode`], with each ubatch's batch rows given in graph order (llama.cpp's equal split).
fn decode_split(hook: &StreamHook, rows: &[Row], ubatches: &[Vec<Range<usize>>], written: &mut Written) {
    let spec = arch_spec("llama").unwrap();
    for ranges in ubatches {
        let ub: Vec<Row> = ranges.iter().flat_map(|r| rows[r.clone()].iter().copied()).collect();
        for layer in 0..L {
            let name = spec.layer_input_node(layer);
            let data: Vec<f32> = ub.iter().flat_map(|r| if r.soft { vec![PLACEHOLDER; D] } else { hidden(r.seq, r.pos, layer) }).collect();
            let mut node = FakeNode { name: name.clone(), rows: data.clone() };
            if hook.wants(&name) {
                hook.on_data(&mut node);
            }
            for (i, r) in ub.iter().enumerate() {
                let got = &node.rows[i * D..(i + 1) * D];
                if r.soft {
                    written.insert((r.seq, r.pos, layer), got.to_vec());
                } else {
                    assert_eq!(got, &data[i * D..(i + 1) * D], "the hook changed a row that is not a soft slot: {r:?} layer {layer}");
                }
            }
        }
    }
}

fn adapter(m: u32, seed: u64) -> Adapter {
    random_adapter(&AdapterSpec::small(L as u32, D as u32, m, 8, Activation::Gelu), &mut Rng::new(seed)).unwrap()
}

fn cpu_prefill(a: &Adapter, n_instr: usize) -> Prefill {
    Prefill::cpu(Arc::new(Generator::from_adapter(a).unwrap()), n_instr)
}

/// The float64 reference for sequence `seq`'s soft tokens at `layer` with an instruction of `n` rows.
fn reference(a: &Adapter, seq: usize, n: usize, layer: usize) -> Vec<f64> {
    let rows: Vec<f64> = (0..n).flat_map(|p| hidden(seq, p, layer)).map(f64::from).collect();
    iapt_generator::reference::generate(a, layer, &rows).unwrap()
}

/// Asserts that sequence `seq`'s soft rows at every layer match the reference (rel 1e-5).
fn assert_soft(written: &Written, a: &Adapter, seq: usize, n: usize, label: &str) {
    let m = a.config().n_soft_tokens as usize;
    for layer in 0..L {
        let want = reference(a, seq, n, layer);
        let got: Vec<f32> = (n..n + m).flat_map(|p| written[&(seq, p, layer)].clone()).collect();
        let err = iapt_generator::reference::rel_err(&got, &want);
        assert!(err <= 1e-5, "{label}: seq {seq} layer {layer}: rel err {err:e}");
    }
}

fn hook() -> StreamHook {
    StreamHook::new(*arch_spec("llama").unwrap(), L, D)
}

/// The rows of positions `p0..p1` of a sequence with `n` instruction rows.
fn seq_rows(seq: usize, n: usize, p0: usize, p1: usize) -> Vec<Row> {
    (p0..p1).map(|pos| Row { seq, pos, soft: pos >= n }).collect()
}

/// Prefills one sequence in two decodes split at position `split`, with `make` giving its state.
fn two_chunks(make: &dyn Fn(&Adapter, usize) -> Prefill, a: &Adapter, n: usize, split: usize, n_ubatch: usize) -> Written {
    let h = hook();
    let m = a.config().n_soft_tokens as usize;
    let mut written = Written::new();
    let mut state = Some(make(a, n));
    for (p0, p1) in [(0, split), (split, n + m)] {
        let rows = seq_rows(0, n, p0, p1);
        let seg = Segment { row0: 0, first: p0, len: p1 - p0, prefill: state.take().unwrap() };
        h.arm(vec![seg], Split::Simple { batch_len: rows.len(), n_ubatch });
        decode(&h, &rows, n_ubatch, &mut written);
        let (mut states, res) = h.finish();
        res.unwrap_or_else(|e| panic!("split {split} n_ubatch {n_ubatch}: {e:?}"));
        state = states.pop();
    }
    written
}

fn chunk_boundaries(make: &dyn Fn(&Adapter, usize) -> Prefill) {
    let a = adapter(4, 11);
    let n = 7;
    for split in [n - 1, n, n + 1, n + 3] {
        for n_ubatch in [512, 3, 1] {
            let written = two_chunks(make, &a, n, split, n_ubatch);
            assert_soft(&written, &a, 0, n, &format!("split {split}, n_ubatch {n_ubatch}"));
        }
    }
}

#[test]
fn chunk_boundaries_before_at_and_after_the_instruction_end() {
    chunk_boundaries(&cpu_prefill);
}

fn emulated_prefill(a: &Adapter, n: usize) -> Prefill {
    let rt = GpuRuntime::emulated();
    let ga = Arc::new(rt.upload(a).unwrap());
    Prefill::gpu(rt, ga, n).unwrap()
}

#[test]
fn gpu_in_place_chunk_boundaries_on_the_emulator() {
    chunk_boundaries(&emulated_prefill);
    // All in one decode: the soft rows are written in place; the claims say so.
    let a = adapter(4, 12);
    let (h, n) = (hook(), 5);
    let rows = seq_rows(0, n, 0, n + 4);
    h.arm(
        vec![Segment { row0: 0, first: 0, len: rows.len(), prefill: emulated_prefill(&a, n) }],
        Split::Simple { batch_len: rows.len(), n_ubatch: 512 },
    );
    let mut written = Written::new();
    decode(&h, &rows, 512, &mut written);
    h.finish().1.unwrap();
    assert_soft(&written, &a, 0, n, "one decode on the emulator");
    let claims = h.claims();
    assert_eq!(claims.len(), L);
    assert!(claims.iter().all(|c| c.on_device), "{claims:?}");
}

#[test]
fn mixed_ubatch_of_adapters_plain_sequences_and_decode_tokens() {
    let (a4, a2) = (adapter(4, 21), adapter(2, 22));
    for n_ubatch in [512, 4] {
        let h = hook();
        // A decode token of sequence 9, sequence 1 without adapter, then sequences 2 (a4), 3 (a2),
        // 4 (a4, another instruction length).
        let mut rows = vec![Row { seq: 9, pos: 30, soft: false }];
        rows.extend((0..5).map(|pos| Row { seq: 1, pos, soft: false }));
        let mut segs = Vec::new();
        for (seq, a, n) in [(2, &a4, 6), (3, &a2, 3), (4, &a4, 1)] {
            let m = a.config().n_soft_tokens as usize;
            segs.push(Segment { row0: rows.len(), first: 0, len: n + m, prefill: cpu_prefill(a, n) });
            rows.extend(seq_rows(seq, n, 0, n + m));
        }
        h.arm(segs, Split::Simple { batch_len: rows.len(), n_ubatch });
        let mut written = Written::new();
        decode(&h, &rows, n_ubatch, &mut written);
        let (states, res) = h.finish();
        res.unwrap();
        assert_eq!(states.len(), 3);
        assert_soft(&written, &a4, 2, 6, "a4, 6 rows");
        assert_soft(&written, &a2, 3, 3, "a2, 3 rows");
        assert_soft(&written, &a4, 4, 1, "a4, 1 row");
    }
}

#[test]
fn cancelled_sequence_mid_prefill_leaves_the_other_alone() {
    let a = adapter(4, 31);
    let (h, n) = (hook(), 6);
    let mut written = Written::new();
    // Decode 1: the first 4 rows of sequences 0 and 1.
    let mut rows = seq_rows(0, n, 0, 4);
    rows.extend(seq_rows(1, n, 0, 4));
    let segs = vec![
        Segment { row0: 0, first: 0, len: 4, prefill: cpu_prefill(&a, n) },
        Segment { row0: 4, first: 0, len: 4, prefill: cpu_prefill(&a, n) },
    ];
    h.arm(segs, Split::Simple { batch_len: rows.len(), n_ubatch: 512 });
    decode(&h, &rows, 512, &mut written);
    let (mut states, res) = h.finish();
    res.unwrap();
    // Sequence 0 is cancelled: its state is dropped. Sequence 1 goes on alone.
    let s1 = states.pop().unwrap();
    drop(states);
    let rows = seq_rows(1, n, 4, n + 4);
    h.arm(vec![Segment { row0: 0, first: 4, len: rows.len(), prefill: s1 }], Split::Simple { batch_len: rows.len(), n_ubatch: 512 });
    decode(&h, &rows, 512, &mut written);
    h.finish().1.unwrap();
    assert_soft(&written, &a, 1, n, "the sequence that went on");
}

#[test]
fn short_prompt_beside_a_long_one_in_one_chunk() {
    let a = adapter(4, 41);
    let h = hook();
    let (long, short) = (40, 1);
    let mut rows = seq_rows(0, long, 0, long + 4);
    let row0 = rows.len();
    rows.extend(seq_rows(1, short, 0, short + 4));
    let segs = vec![
        Segment { row0: 0, first: 0, len: long + 4, prefill: cpu_prefill(&a, long) },
        Segment { row0, first: 0, len: short + 4, prefill: cpu_prefill(&a, short) },
    ];
    h.arm(segs, Split::Simple { batch_len: rows.len(), n_ubatch: 16 });
    let mut written = Written::new();
    decode(&h, &rows, 16, &mut written);
    h.finish().1.unwrap();
    assert_soft(&written, &a, 0, long, "long");
    assert_soft(&written, &a, 1, short, "short");
}

/// `a` with its up-projection weights multiplied by 1e30 (finite, structurally valid).
fn overflowing(a: &Adapter) -> Adapter {
    let tensors = a
        .tensors()
        .iter()
        .map(|t| {
            if t.name().role != Role::UpWeight {
                return t.clone();
            }
            let v: Vec<f32> = t.to_f32().unwrap().iter().map(|x| x * 1e30).collect();
            Tensor::from_f32(t.name(), t.dtype(), t.shape().to_vec(), &v).unwrap()
        })
        .collect();
    Adapter::from_parts(a.config().clone(), Default::default(), tensors).unwrap()
}

fn overflowing_adapter(make: &dyn Fn(&Adapter, usize) -> Prefill) {
    let good = adapter(4, 51);
    let evil = overflowing(&adapter(4, 52));
    let h = hook();
    let n = 5;
    let mut rows = seq_rows(0, n, 0, n + 4);
    rows.extend(seq_rows(1, n, 0, n + 4));
    let segs = vec![
        Segment { row0: 0, first: 0, len: n + 4, prefill: make(&evil, n) },
        Segment { row0: n + 4, first: 0, len: n + 4, prefill: make(&good, n) },
    ];
    h.arm(segs, Split::Simple { batch_len: rows.len(), n_ubatch: 512 });
    let mut written = Written::new();
    decode(&h, &rows, 512, &mut written);
    let (_, res) = h.finish();
    let errors = res.unwrap_err();
    assert!(errors.iter().all(|e| matches!(e, HookError::NonFinite { seg: 0, .. })), "{errors:?}");
    assert!(!errors.is_empty());
    // Nothing out of range reached the graph; the good sequence is exact.
    assert!(written.values().flatten().all(|v| v.abs() <= crate::SOFT_TOKEN_LIMIT), "an overflowing value was written");
    assert_soft(&written, &good, 1, n, "the good sequence beside the overflowing one");
}

#[test]
fn overflowing_adapter_fails_its_segment_alone() {
    overflowing_adapter(&cpu_prefill);
}

#[test]
fn gpu_in_place_overflowing_adapter_fails_its_segment_alone() {
    overflowing_adapter(&emulated_prefill);
}

#[test]
fn ubatch_mismatch_fails_the_decode() {
    let a = adapter(4, 61);
    let h = hook();
    let rows = seq_rows(0, 6, 0, 10);
    // Armed for ubatches of 4 rows, decoded in ubatches of 5: the first layer-0 node has 5 rows.
    h.arm(vec![Segment { row0: 0, first: 0, len: 10, prefill: cpu_prefill(&a, 6) }], Split::Simple { batch_len: 10, n_ubatch: 4 });
    let mut written = Written::new();
    decode(&h, &rows, 5, &mut written);
    let errors = h.finish().1.unwrap_err();
    assert!(matches!(errors[0], HookError::UbatchRows { rows: 5, want: 4, .. }), "{errors:?}");
    assert!(errors[0].segment().is_none());
    // The hook stopped touching the graph: every soft row still holds the placeholder.
    assert!(written.values().flatten().all(|&v| v == PLACEHOLDER));
}

#[test]
fn equal_split_ubatches_interleave_sequences_and_stay_exact() {
    // One stream per sequence: llama.cpp's equal split with n_ubatch 4 of a decode token of
    // sequence 0 (no adapter), a 10-row prefill of sequence 1 and a 6-row prefill of sequence 2
    // (batch rows 0, 1..11, 11..17): each ubatch takes as many rows of each of its sequences.
    let (a4, a2) = (adapter(4, 71), adapter(2, 72));
    let h = hook();
    let mut rows = vec![Row { seq: 0, pos: 9, soft: false }];
    rows.extend(seq_rows(1, 6, 0, 10));
    rows.extend(seq_rows(2, 4, 0, 6));
    let ubatches = vec![vec![0..1, 1..2, 11..12], vec![2..4, 12..14], vec![4..6, 14..16], vec![6..7, 16..17], vec![7..11]];
    let segs = vec![
        Segment { row0: 1, first: 0, len: 10, prefill: cpu_prefill(&a4, 6) },
        Segment { row0: 11, first: 0, len: 6, prefill: cpu_prefill(&a2, 4) },
    ];
    h.arm(segs, Split::Planned(ubatches.clone()));
    let mut written = Written::new();
    decode_split(&h, &rows, &ubatches, &mut written);
    h.finish().1.unwrap();
    assert_soft(&written, &a4, 1, 6, "sequence 1");
    assert_soft(&written, &a2, 2, 4, "sequence 2");
    // The same ubatches announced in batch order (a wrong plan) do not pass unnoticed.
    let h = hook();
    let segs = vec![Segment { row0: 1, first: 0, len: 10, prefill: cpu_prefill(&a4, 6) }];
    h.arm(segs, Split::Simple { batch_len: rows.len(), n_ubatch: 4 });
    decode_split(&h, &rows, &ubatches, &mut Written::new());
    let errors = h.finish().1.unwrap_err();
    assert!(matches!(errors[0], HookError::UbatchRows { ubatch: 0, rows: 3, want: 4, .. }), "{errors:?}");
}
