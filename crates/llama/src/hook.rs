//! The injection hook: an [`EvalCallback`] that, while armed with a [`Plan`] for one decode, claims
//! the residual-stream node entering every layer, streams the instruction rows into the generator
//! and overwrites the soft-token rows with P_l before layer l runs.
//!
//! The callback does not see llama.cpp's ubatches, so the hook follows them: with one sequence
//! llama.cpp splits a batch into contiguous ubatches of `n_ubatch` tokens in batch order, each
//! computing layers 0..L in order. Layer 0's node starts a new ubatch; its row count (`ne[1]`) must
//! be the planned ubatch length, or the hook records an error and stops touching the graph. Errors
//! cannot abort a decode from inside the callback, so they are collected and reported by
//! [`IaptHook::finish`] after `llama_decode` returns.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iapt_generator::{Generator, LayerState};

use crate::arch::ArchSpec;
use crate::error::LlamaError;
use crate::ffi::{EvalCallback, NodeData, NodeInfo};

/// What the next decode contains: a batch that starts at position 0 of an empty sequence, with the
/// instruction at rows `0..n_instr` and the soft slots at `n_instr..n_instr + m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Instruction rows n.
    pub n_instr: usize,
    /// Tokens in the batch (at least `n_instr + m`).
    pub batch_len: usize,
    /// The context's `n_ubatch`.
    pub n_ubatch: usize,
}

/// One claimed node, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Ubatch index within the decode.
    pub ubatch: usize,
    /// Layer whose input the node holds.
    pub layer: usize,
    /// The node's name.
    pub node: String,
    /// The node's row count (`ne[1]`).
    pub rows: usize,
}

struct Armed {
    plan: Plan,
    /// Current ubatch index, start row and length (None before the first layer-0 node).
    ubatch: Option<(usize, usize, usize)>,
    /// Next layer expected within the current ubatch.
    next_layer: usize,
    states: Vec<LayerState>,
    soft: Vec<Option<Vec<f32>>>,
    /// Soft rows written per layer.
    written: Vec<usize>,
    failed: bool,
}

struct Inner {
    armed: Option<Armed>,
    errors: Vec<String>,
    claims: Vec<Claim>,
    buf: Vec<f32>,
    /// Wall time spent handling claimed nodes (reading, generating, writing) in the last armed decode.
    busy: Duration,
}

/// The IAPT injection hook for one context.
pub struct IaptHook {
    arch: ArchSpec,
    generator: Generator,
    inner: Mutex<Inner>,
}

impl IaptHook {
    /// A hook for a model of `arch` running `generator` (whose layer count is the model's).
    pub fn new(arch: ArchSpec, generator: Generator) -> IaptHook {
        IaptHook {
            arch,
            generator,
            inner: Mutex::new(Inner { armed: None, errors: Vec::new(), claims: Vec::new(), buf: Vec::new(), busy: Duration::ZERO }),
        }
    }

    /// Soft tokens per layer (m).
    pub fn n_soft_tokens(&self) -> usize {
        self.generator.n_soft_tokens()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means an earlier callback panicked; the state is reset on arm.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms the hook for the next decode.
    pub fn arm(&self, plan: Plan) {
        let l = self.generator.n_layer();
        let mut inner = self.lock();
        inner.errors.clear();
        inner.claims.clear();
        inner.busy = Duration::ZERO;
        inner.armed = Some(Armed {
            plan,
            ubatch: None,
            next_layer: 0,
            states: (0..l).map(|i| self.generator.begin(i)).collect(),
            soft: vec![None; l],
            written: vec![0; l],
            failed: false,
        });
    }

    /// Disarms the hook and reports what happened: `Ok` only if every ubatch of the planned batch
    /// was seen, every layer's input node was found in every ubatch, and all m soft rows of every
    /// layer were written.
    pub fn finish(&self) -> Result<(), LlamaError> {
        let l = self.generator.n_layer();
        let m = self.generator.n_soft_tokens();
        let mut inner = self.lock();
        let Some(a) = inner.armed.take() else {
            return Err(LlamaError::Hook { messages: vec!["the hook was not armed".to_owned()] });
        };
        let mut errors = std::mem::take(&mut inner.errors);
        if !a.failed {
            match a.ubatch {
                None => errors.push(format!(
                    "node {:?} (layer 0 input) never appeared in the graph: this llama.cpp names its nodes differently",
                    self.arch.layer0_node
                )),
                Some((_, start, len)) => {
                    if start + len != a.plan.batch_len {
                        errors.push(format!("saw ubatches covering {} of {} batch rows", start + len, a.plan.batch_len));
                    }
                    if a.next_layer != l {
                        errors.push(format!(
                            "node {:?} (layer {} input) never appeared in the last ubatch",
                            self.arch.layer_input_node(a.next_layer),
                            a.next_layer
                        ));
                    }
                }
            }
            if let Some(layer) = a.written.iter().position(|&w| w != m) {
                errors.push(format!("layer {layer}: {} of {m} soft rows written", a.written[layer]));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LlamaError::Hook { messages: errors })
        }
    }

    /// Disarms without checking (after a failed decode).
    pub fn disarm(&self) {
        self.lock().armed = None;
    }

    /// Wall time the hook spent in the data phase of the last armed decode (reading the instruction
    /// rows, running the generator, writing the soft rows): the cost IAPT adds to a prefill.
    pub fn busy_time(&self) -> Duration {
        self.lock().busy
    }

    /// The nodes claimed during the last armed decode, in order.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().claims.clone()
    }

    /// Handles one claimed node; errors are returned to be recorded.
    fn handle(&self, inner: &mut Inner, node: &NodeData<'_>, layer: usize) -> Result<(), String> {
        let n_layer = self.generator.n_layer();
        let d = self.generator.n_embd();
        let m = self.generator.n_soft_tokens();
        let Inner { armed, claims, buf, .. } = inner;
        let Some(a) = armed.as_mut() else { return Ok(()) };
        if a.failed {
            return Ok(());
        }
        let ne = node.ne();
        let rows = ne[1].max(0) as usize;
        if layer == 0 {
            // A new ubatch starts.
            let (idx, start) = match a.ubatch {
                None => (0, 0),
                Some((i, s, len)) => {
                    if a.next_layer != n_layer {
                        return Err(format!("ubatch {i}: layer {} input never appeared before the next ubatch", a.next_layer));
                    }
                    (i + 1, s + len)
                }
            };
            if start >= a.plan.batch_len {
                return Err(format!("a ubatch beyond the planned batch of {} rows", a.plan.batch_len));
            }
            let want = a.plan.n_ubatch.min(a.plan.batch_len - start);
            if rows != want {
                return Err(format!(
                    "ubatch {idx} has {rows} rows but the plan expects {want} (batch {}, n_ubatch {}): llama.cpp split the batch differently",
                    a.plan.batch_len, a.plan.n_ubatch
                ));
            }
            a.ubatch = Some((idx, start, rows));
            a.next_layer = 0;
        }
        let Some((idx, start, len)) = a.ubatch else {
            return Err(format!("layer {layer} input seen before layer 0 input"));
        };
        if layer != a.next_layer {
            return Err(format!("ubatch {idx}: layer {layer} input seen when layer {} was expected", a.next_layer));
        }
        a.next_layer = layer + 1;
        claims.push(Claim { ubatch: idx, layer, node: node.name().to_owned(), rows });
        if ne[0] as usize != d || rows != len || ne[2] != 1 || ne[3] != 1 {
            return Err(format!("node {} has shape {:?}, expected [{d}, {len}, 1, 1]", node.name(), ne));
        }
        let n = a.plan.n_instr;
        let end = start + len;
        // Instruction rows of this ubatch: stream them into the layer's state.
        if start < n {
            let k = end.min(n) - start;
            buf.resize(k * d, 0.0);
            node.read_rows(0, &mut buf[..k * d])?;
            a.states[layer].feed(&self.generator, &buf[..k * d]).map_err(|e| format!("layer {layer}: {e}"))?;
        }
        // Soft rows of this ubatch: finish the layer's state once, then write the rows that fall here.
        let (s0, s1) = (start.max(n), end.min(n + m));
        if s0 < s1 {
            if a.soft[layer].is_none() {
                if a.states[layer].rows_seen() != n {
                    return Err(format!("layer {layer}: {} instruction rows seen, expected {n}", a.states[layer].rows_seen()));
                }
                let mut p = vec![0.0f32; m * d];
                a.states[layer].finish(&self.generator, &mut p).map_err(|e| format!("layer {layer}: {e}"))?;
                a.soft[layer] = Some(p);
            }
            let p = a.soft[layer].as_ref().expect("set above");
            node.write_rows(s0 - start, &p[(s0 - n) * d..(s1 - n) * d])?;
            a.written[layer] += s1 - s0;
        }
        Ok(())
    }
}

impl EvalCallback for IaptHook {
    fn wants(&self, node: &NodeInfo<'_>) -> bool {
        let inner = self.lock();
        match &inner.armed {
            Some(a) if !a.failed => self.arch.layer_of(node.name(), self.generator.n_layer()).is_some(),
            _ => false,
        }
    }

    fn on_data(&self, node: &NodeData<'_>) {
        let Some(layer) = self.arch.layer_of(node.name(), self.generator.n_layer()) else { return };
        let t0 = Instant::now();
        let mut inner = self.lock();
        let res = self.handle(&mut inner, node, layer);
        inner.busy += t0.elapsed();
        if let Err(e) = res {
            inner.errors.push(e);
            if let Some(a) = inner.armed.as_mut() {
                // Stop touching the graph: the decode's results are discarded by `finish`.
                a.failed = true;
            }
        }
    }
}
