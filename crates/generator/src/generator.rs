//! The f32 production path: [`Generator`] (W_down and W_up held as stored and widened block by
//! block in the products, the small tensors converted to f32 once, shared tensors held once) and
//! [`LayerState`] (streaming online softmax, any chunking).
//!
//! Two evaluation orders compute the same function (design note, "The function"):
//! - [`Strategy::DownFirst`] follows the formula: Z = H W_down^T block by block, scores Z Q^T s,
//!   and a running softmax-weighted sum of Z rows (m x r);
//! - [`Strategy::PoolFirst`] uses associativity: scores = (H K) s with K = W_down^T Q^T (d x m,
//!   precomputed in f64 at load and stored transposed), a running softmax-weighted sum of H rows
//!   (m x d), and the down-projection applied once to the m pooled rows at the end: A^T (H W^T) =
//!   (A^T H) W^T. Per instruction row this costs about 4·m·d FLOPs instead of 2·r·d, which for
//!   m = 4, r = 320 is 40x less arithmetic (measured 1.6-8x less time, see `BENCH.md`).
//!
//! Accumulation: f32 GEMMs sum at most [`POOL_SLICE`] rows (or one row's d products); the running
//! sums across slices, blocks, chunks and threads are f64, so the rounding error does not grow
//! with the instruction length. The m x r tail (bias, activation) is f64 too.
//!
//! In both, the down-projection bias is left out of the scores and added after pooling: it adds
//! the same constant b·q·s to every row's score for a soft token, which the softmax removes, and
//! the softmax weights sum to one, so pooling Z + b equals pooling Z, plus b.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iapt_format::{Activation, Adapter, Role, TensorName};

use crate::activation;
use crate::error::GeneratorError;
use crate::kernels;
use crate::matmul::{matmul, MatMut, MatRef};
use crate::weights::Weights;

/// Rows processed per block when pooling raw hidden states (a 64 x 4096 f32 block is 1 MiB and
/// stays in L2 between the score and the accumulation pass).
const POOL_FIRST_BLOCK: usize = 64;
/// Rows processed per block when down-projecting first (large enough for an efficient GEMM).
const DOWN_FIRST_BLOCK: usize = 256;
/// Rows summed in f32 (inside one GEMM) before the sum is added to the f64 accumulator.
const POOL_SLICE: usize = 32;
/// Fewest rows worth giving to one more thread.
const MIN_ROWS_PER_THREAD: usize = 64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Which evaluation order the production path uses. Both compute the same function; they differ
/// in cost and in what the streaming state holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Chooses [`Strategy::PoolFirst`] when `8 * n_soft_tokens <= bottleneck`, else
    /// [`Strategy::DownFirst`].
    Auto,
    /// Pool the raw hidden states, then down-project the m pooled rows (state: m x n_embd).
    PoolFirst,
    /// Down-project every row, then pool (state: m x bottleneck).
    DownFirst,
}

/// One layer's weights: the two large matrices as stored, the rest in f32. Tensors shared across
/// layers are the same `Arc`.
#[derive(Debug, Clone)]
struct Layer {
    /// W_down, r x d (f32 under [`Strategy::DownFirst`], whose GEMM reads it whole).
    down: Weights,
    /// b_down, r.
    down_bias: Option<Arc<[f32]>>,
    /// Q, m x r.
    query: Arc<[f32]>,
    /// W_up, d x r.
    up: Weights,
    /// b_up, d.
    up_bias: Option<Arc<[f32]>>,
    /// Rational numerator [G, M+1] (empty unless rational).
    num: Arc<[f32]>,
    /// Rational denominator [G, N] or [G, N+1] (empty unless rational).
    den: Arc<[f32]>,
    /// K^T = Q W_down, m x d (PoolFirst only).
    k: Option<Arc<[f32]>>,
}

/// The IAPT soft-prompt generator of every layer of one adapter, computing in f32.
///
/// Built once from an [`Adapter`]: W_down and W_up are held in their stored element type (F16,
/// BF16 or F32: resident memory is the stored size) and widened to f32 a block at a time inside
/// the products, exactly; the small tensors are converted to f32 at load; a tensor stored once for
/// all layers (`iapt.shared.*`) is held once.
#[derive(Debug, Clone)]
pub struct Generator {
    id: u64,
    n_layer: usize,
    d: usize,
    r: usize,
    m: usize,
    activation: Activation,
    pool_scale: f32,
    layers: Vec<Layer>,
    strategy: Strategy,
    threads: usize,
}

impl Generator {
    /// Reads every tensor of `adapter` (the large matrices as stored, the rest as f32) and prepares
    /// the default strategy ([`Strategy::Auto`]) with one thread.
    pub fn from_adapter(adapter: &Adapter) -> Result<Generator, GeneratorError> {
        let cfg = adapter.config();
        let n_layer = cfg.n_layer as usize;
        let (d, r, m) = (cfg.n_embd as usize, cfg.bottleneck as usize, cfg.n_soft_tokens as usize);
        d.checked_mul(r).and_then(|x| x.checked_mul(4)).ok_or(GeneratorError::TooLarge)?;
        d.checked_mul(m).and_then(|x| x.checked_mul(8)).ok_or(GeneratorError::TooLarge)?;
        let mut cache: HashMap<TensorName, Arc<[f32]>> = HashMap::new();
        let mut big: HashMap<TensorName, Weights> = HashMap::new();
        let tensor = |layer: u32, role: Role| -> Result<Option<&iapt_format::Tensor>, GeneratorError> {
            let Some(t) = adapter.tensor(layer, role) else {
                return if role.is_required(cfg) { Err(GeneratorError::MissingTensor { layer, role }) } else { Ok(None) };
            };
            let expected = role.expected_shape(cfg);
            if t.shape() != expected.as_slice() {
                return Err(GeneratorError::TensorShape { name: t.name().to_string(), expected, got: t.shape().to_vec() });
            }
            Ok(Some(t))
        };
        let read_err = |t: &iapt_format::Tensor| {
            let name = t.name().to_string();
            move |source| GeneratorError::TensorRead { name, source }
        };
        let mut load = |layer: u32, role: Role| -> Result<Option<Arc<[f32]>>, GeneratorError> {
            let Some(t) = tensor(layer, role)? else { return Ok(None) };
            if let Some(v) = cache.get(&t.name()) {
                return Ok(Some(v.clone()));
            }
            let v: Arc<[f32]> = t.to_f32().map_err(read_err(t))?.into();
            cache.insert(t.name(), v.clone());
            Ok(Some(v))
        };
        let mut load_big = |layer: u32, role: Role| -> Result<Weights, GeneratorError> {
            let t = tensor(layer, role)?.ok_or(GeneratorError::MissingTensor { layer, role })?;
            if let Some(v) = big.get(&t.name()) {
                return Ok(v.clone());
            }
            let v = Weights::from_tensor(t).map_err(read_err(t))?;
            big.insert(t.name(), v.clone());
            Ok(v)
        };
        let rational = cfg.activation.rational().is_some();
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..cfg.n_layer {
            let req = |v: Option<Arc<[f32]>>, role| v.ok_or(GeneratorError::MissingTensor { layer: l, role });
            let empty: Arc<[f32]> = Arc::from(Vec::new());
            layers.push(Layer {
                down: load_big(l, Role::DownWeight)?,
                down_bias: load(l, Role::DownBias)?,
                query: req(load(l, Role::PoolQuery)?, Role::PoolQuery)?,
                up: load_big(l, Role::UpWeight)?,
                up_bias: load(l, Role::UpBias)?,
                num: if rational { req(load(l, Role::ActNum)?, Role::ActNum)? } else { empty.clone() },
                den: if rational { req(load(l, Role::ActDen)?, Role::ActDen)? } else { empty },
                k: None,
            });
        }
        let gen = Generator {
            id: 0,
            n_layer,
            d,
            r,
            m,
            activation: cfg.activation,
            pool_scale: cfg.pool_scale,
            layers,
            strategy: Strategy::Auto,
            threads: 1,
        };
        Ok(gen.with_strategy(Strategy::Auto))
    }

    /// This generator using `strategy` (precomputing what it needs). States begun before the
    /// change cannot be fed to the result ([`GeneratorError::ForeignState`]).
    pub fn with_strategy(mut self, strategy: Strategy) -> Generator {
        let resolved = match strategy {
            Strategy::Auto if 8 * self.m <= self.r => Strategy::PoolFirst,
            Strategy::Auto => Strategy::DownFirst,
            s => s,
        };
        self.strategy = resolved;
        self.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut cache: HashMap<(usize, usize), Arc<[f32]>> = HashMap::new();
        let mut widened: HashMap<usize, Weights> = HashMap::new();
        for layer in &mut self.layers {
            layer.k = match resolved {
                Strategy::PoolFirst => {
                    let key = (layer.down.key(), Arc::as_ptr(&layer.query) as *const f32 as usize);
                    let (d, r, m) = (self.d, self.r, self.m);
                    Some(cache.entry(key).or_insert_with(|| score_matrix(&layer.down, &layer.query, d, r, m)).clone())
                }
                _ => {
                    // The down-first GEMM reads W_down whole, as f32 (shared tensors widened once).
                    if layer.down.as_f32().is_none() {
                        let key = layer.down.key();
                        layer.down = widened.entry(key).or_insert_with(|| Weights::F32(layer.down.to_f32().into())).clone();
                    }
                    None
                }
            };
        }
        self
    }

    /// This generator using `threads` threads per call (default 1). Rows are split among the
    /// threads, each keeps a partial softmax state, and the partial states are merged exactly.
    pub fn with_threads(mut self, threads: usize) -> Result<Generator, GeneratorError> {
        if threads == 0 {
            return Err(GeneratorError::ZeroThreads);
        }
        self.threads = threads;
        Ok(self)
    }

    /// Number of layers (L).
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Hidden size of the base model (d).
    pub fn n_embd(&self) -> usize {
        self.d
    }

    /// This generator's id, unique in the process: the streaming states it makes carry it
    /// ([`LayerState::generator_id`]), so a state is never fed to another generator, nor to the
    /// same adapter loaded again.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Soft tokens per layer (m).
    pub fn n_soft_tokens(&self) -> usize {
        self.m
    }

    /// Bottleneck width (r).
    pub fn bottleneck(&self) -> usize {
        self.r
    }

    /// The strategy in use (never [`Strategy::Auto`]).
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Threads used per call.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The activation.
    pub fn activation(&self) -> &Activation {
        &self.activation
    }

    /// Bytes of weights held: W_down and W_up as stored, the rest in f32 (shared tensors counted
    /// once).
    pub fn weight_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for l in &self.layers {
            for w in [&l.down, &l.up] {
                if seen.insert(w.key()) {
                    total += w.bytes();
                }
            }
            let small = [l.down_bias.as_ref(), Some(&l.query), l.up_bias.as_ref(), Some(&l.num), Some(&l.den), l.k.as_ref()];
            for t in small.into_iter().flatten() {
                if seen.insert(Arc::as_ptr(t) as *const f32 as usize) {
                    total += t.len() * 4;
                }
            }
        }
        total
    }

    /// One shot: `rows` is n x n_embd row-major (the instruction's hidden states entering `layer`),
    /// `out` receives the m x n_embd soft tokens P_l.
    pub fn generate(&self, layer: usize, rows: &[f32], out: &mut [f32]) -> Result<(), GeneratorError> {
        self.check_out(out)?;
        let mut st = self.begin(layer);
        st.feed(self, rows)?;
        st.finish(self, out)
    }

    /// An empty streaming state for one sequence and one layer.
    pub fn begin(&self, layer: usize) -> LayerState {
        let w = self.width();
        LayerState { gen_id: self.id, layer, part: Partial::new(self.m, w) }
    }

    /// Width of the pooled rows: d (PoolFirst) or r (DownFirst).
    fn width(&self) -> usize {
        match self.strategy {
            Strategy::PoolFirst => self.d,
            _ => self.r,
        }
    }

    fn check_out(&self, out: &[f32]) -> Result<(), GeneratorError> {
        let expected = self.m * self.d;
        if out.len() != expected {
            return Err(GeneratorError::OutputSize { len: out.len(), expected });
        }
        Ok(())
    }

    fn layer(&self, layer: usize) -> Result<&Layer, GeneratorError> {
        self.layers.get(layer).ok_or(GeneratorError::LayerOutOfRange { layer, n_layer: self.n_layer })
    }

    /// Pools `n` rows into a fresh partial state, block by block, on this thread. On a non-finite
    /// score returns the offending row's index.
    fn pool(&self, layer: &Layer, rows: &[f32]) -> Result<Partial, usize> {
        let (d, r, m) = (self.d, self.r, self.m);
        let w = self.width();
        let mut part = Partial::new(m, w);
        let block = match self.strategy {
            Strategy::PoolFirst => POOL_FIRST_BLOCK,
            _ => DOWN_FIRST_BLOCK,
        };
        let block = block.min(rows.len() / d).max(1);
        let mut z = match self.strategy {
            Strategy::PoolFirst => Vec::new(),
            _ => vec![0.0f32; block * r],
        };
        // Scores transposed, m x nr (soft token k's scores contiguous, as the softmax and the
        // weighted sum read them).
        let mut st = vec![0.0f32; m * block];
        let mut blk = vec![0.0f32; m * w];
        let mut f = vec![1.0f64; m];
        for (bi, chunk) in rows.chunks(block * d).enumerate() {
            let nr = chunk.len() / d;
            let scores = &mut st[..m * nr];
            // x: the rows being pooled, nr x w (H itself, or Z).
            let x: &[f32] = match self.strategy {
                Strategy::PoolFirst => {
                    // S^T = K^T H^T, K^T stored m x d.
                    let kt = layer.k.as_deref().unwrap_or(&[]);
                    kernels::dot_rows(kt, m, chunk, d, self.pool_scale, scores);
                    chunk
                }
                _ => {
                    let h = MatRef::row_major(chunk, nr, d);
                    let down = layer.down.as_f32().expect("with_strategy holds W_down as f32 for DownFirst");
                    matmul(MatMut::row_major(&mut z, nr, r), None, h, MatRef::row_major(down, r, d).t(), 1.0);
                    // S^T = Q Z^T.
                    kernels::dot_rows(&layer.query, m, &z[..nr * r], r, self.pool_scale, scores);
                    &z
                }
            };
            let st = &mut st[..m * nr];
            if let Some(bad) = st.chunks(nr).filter_map(|row| row.iter().position(|v| !v.is_finite())).min() {
                return Err(bi * block + bad);
            }
            // Online softmax: raise each soft token's running max; f[k] rescales what was
            // accumulated (0 for the first block, whose previous max is -inf).
            for (k, row) in st.chunks_mut(nr).enumerate() {
                let bmax = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                f[k] = 1.0;
                if bmax > part.max[k] {
                    f[k] = f64::from(part.max[k] - bmax).exp();
                    part.max[k] = bmax;
                }
                let mut sum = 0.0f64;
                for e in row.iter_mut() {
                    *e = (*e - part.max[k]).exp();
                    sum += f64::from(*e);
                }
                part.sum[k] = part.sum[k] * f[k] + sum;
            }
            // Per slice of POOL_SLICE rows: blk (m x w) = E^T (m x ns) X (ns x w) in f32, then
            // acc = acc * f + blk in f64, so the f32 rounding error is that of a sum of at most
            // POOL_SLICE terms however many rows are pooled.
            let mut i0 = 0;
            while i0 < nr {
                let ns = POOL_SLICE.min(nr - i0);
                kernels::weighted_sum(&st[i0..], nr, m, &x[i0 * w..(i0 + ns) * w], w, &mut blk);
                for k in 0..m {
                    let (acc, b) = (&mut part.acc[k * w..(k + 1) * w], &blk[k * w..(k + 1) * w]);
                    if f[k] == 1.0 {
                        acc.iter_mut().zip(b).for_each(|(a, &b)| *a += f64::from(b));
                    } else {
                        acc.iter_mut().zip(b).for_each(|(a, &b)| *a = *a * f[k] + f64::from(b));
                    }
                }
                f.iter_mut().for_each(|v| *v = 1.0);
                i0 += ns;
            }
            part.rows += nr;
        }
        Ok(part)
    }

    /// Pools `rows` using up to `self.threads` threads and returns the merged partial state.
    fn pool_parallel(&self, layer: &Layer, rows: &[f32]) -> Result<Partial, GeneratorError> {
        let d = self.d;
        let err = |row| GeneratorError::NonFiniteInput { row };
        let per = self.rows_per_part(rows.len() / d);
        if per * d >= rows.len() {
            return self.pool(layer, rows).map_err(err);
        }
        let results = on_threads(rows.chunks(per * d), |i, part| self.pool(layer, part).map_err(|row| i * per + row));
        let mut merged = Partial::new(self.m, self.width());
        for r in results {
            merged.merge(&r.map_err(err)?);
        }
        Ok(merged)
    }

    /// From a non-empty pooled state to the m x d soft tokens.
    fn finish(&self, layer: &Layer, part: &Partial, out: &mut [f32]) {
        let (d, r, m) = (self.d, self.r, self.m);
        // The pooled rows: the weighted sums divided by the sums of the weights (m x w).
        let w = self.width();
        let mut pooled = part.acc.clone();
        for k in 0..m {
            let inv = 1.0 / part.sum[k];
            pooled[k * w..(k + 1) * w].iter_mut().for_each(|v| *v *= inv);
        }
        // Pbar = pooled (DownFirst), or pooled W_down^T (PoolFirst); plus b_down.
        let mut tail: Vec<f64> = match self.strategy {
            Strategy::PoolFirst => {
                let p32: Vec<f32> = pooled.iter().map(|&v| v as f32).collect();
                let mut pbar = vec![0.0f32; m * r];
                self.par_dot_rows(&p32, &layer.down, d, &mut pbar);
                pbar.iter().map(|&v| f64::from(v)).collect()
            }
            _ => pooled,
        };
        if let Some(b) = &layer.down_bias {
            tail.chunks_exact_mut(r).for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(v, &b)| *v += f64::from(b)));
        }
        activation::apply(&self.activation, &layer.num, &layer.den, r, &mut tail);
        let u: Vec<f32> = tail.iter().map(|&v| v as f32).collect();
        self.par_dot_rows(&u, &layer.up, r, out);
        if let Some(b) = &layer.up_bias {
            out.chunks_exact_mut(d).for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(v, &b)| *v += b));
        }
    }
}

impl Generator {
    /// Rows per thread when `n` rows are split: all of them (one part, no thread) unless each of
    /// up to `self.threads` parts gets at least [`MIN_ROWS_PER_THREAD`].
    fn rows_per_part(&self, n: usize) -> usize {
        n.div_ceil(self.threads.min(n / MIN_ROWS_PER_THREAD).max(1)).max(1)
    }

    /// [`Weights::dot_rows`] with scale 1 over every row of `rows` (`out` is m x n, n =
    /// `rows.len() / c`), the rows split among up to `self.threads` threads: the tail's two
    /// products (pooled W_down^T and u W_up^T) each read a whole weight matrix, which the threads
    /// share. Each thread writes its own m x (its rows) block, copied into `out` in order, so the
    /// result does not depend on the thread count.
    fn par_dot_rows(&self, vecs: &[f32], rows: &Weights, c: usize, out: &mut [f32]) {
        let (m, n) = (self.m, rows.len() / c);
        let per = self.rows_per_part(n);
        if per >= n {
            rows.dot_rows(vecs, m, 0..n, c, 1.0, out);
            return;
        }
        let ranges = (0..n).step_by(per).map(|i| i..(i + per).min(n));
        let parts = on_threads(ranges, |_, part| {
            let mut o = vec![0.0f32; m * part.len()];
            rows.dot_rows(vecs, m, part, c, 1.0, &mut o);
            o
        });
        let mut i0 = 0;
        for o in parts {
            let len = o.len() / m.max(1);
            for k in 0..m {
                out[k * n + i0..k * n + i0 + len].copy_from_slice(&o[k * len..(k + 1) * len]);
            }
            i0 += len;
        }
    }
}

/// `f(i, part)` for every part, the first on the calling thread and each other one on a thread of
/// its own (so t parts cost t - 1 thread starts); the results in the parts' order. A panic in a
/// thread is resumed on the caller.
fn on_threads<P: Send, T: Send>(parts: impl Iterator<Item = P>, f: impl Fn(usize, P) -> T + Sync) -> Vec<T> {
    let mut parts = parts.enumerate();
    let Some((_, first)) = parts.next() else { return Vec::new() };
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts.map(|(i, part)| scope.spawn(move || f(i, part))).collect();
        let mut out = vec![f(0, first)];
        out.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))));
        out
    })
}

/// K^T = Q W_down (m x d; K = W_down^T Q^T), computed in f64 and rounded once.
fn score_matrix(down: &Weights, query: &[f32], d: usize, r: usize, m: usize) -> Arc<[f32]> {
    let w: Vec<f64> = down.to_f32().iter().map(|&v| f64::from(v)).collect();
    let q: Vec<f64> = query.iter().map(|&v| f64::from(v)).collect();
    let mut k = vec![0.0f64; m * d];
    matmul(MatMut::row_major(&mut k, m, d), None, MatRef::row_major(&q, m, r), MatRef::row_major(&w, r, d), 1.0);
    k.iter().map(|&v| v as f32).collect()
}

/// A running softmax-weighted sum: for each soft token k, the largest score seen, the sum of
/// exp(score - max), and the sum of exp(score - max) x row.
#[derive(Debug, Clone)]
struct Partial {
    max: Vec<f32>,
    sum: Vec<f64>,
    /// m x w.
    acc: Vec<f64>,
    rows: usize,
}

impl Partial {
    fn new(m: usize, w: usize) -> Partial {
        Partial { max: vec![f32::NEG_INFINITY; m], sum: vec![0.0; m], acc: vec![0.0; m * w], rows: 0 }
    }

    /// Adds `other` to `self` exactly (the online-softmax merge).
    fn merge(&mut self, other: &Partial) {
        if other.rows == 0 {
            return;
        }
        if self.rows == 0 {
            *self = other.clone();
            return;
        }
        let w = self.acc.len() / self.max.len().max(1);
        for k in 0..self.max.len() {
            let mx = self.max[k].max(other.max[k]);
            let (fa, fb) = (f64::from(self.max[k] - mx).exp(), f64::from(other.max[k] - mx).exp());
            self.sum[k] = self.sum[k] * fa + other.sum[k] * fb;
            for (a, b) in self.acc[k * w..(k + 1) * w].iter_mut().zip(&other.acc[k * w..(k + 1) * w]) {
                *a = *a * fa + *b * fb;
            }
            self.max[k] = mx;
        }
        self.rows += other.rows;
    }
}

/// The streaming state of one sequence at one layer: feed the instruction's rows in any number of
/// chunks, then [`LayerState::finish`] gives the same soft tokens as [`Generator::generate`] on
/// all rows at once (up to f32 rounding).
///
/// Size: m running maxima and sums, and an m x w f64 running weighted sum, w = n_embd for
/// [`Strategy::PoolFirst`] (128 KiB at the LLaMA-2-7B shape) or bottleneck for
/// [`Strategy::DownFirst`].
#[derive(Debug, Clone)]
pub struct LayerState {
    gen_id: u64,
    layer: usize,
    part: Partial,
}

impl LayerState {
    /// Feeds any number of rows (`rows.len()` a multiple of n_embd; zero rows is a no-op). On error
    /// the state is unchanged.
    pub fn feed(&mut self, gen: &Generator, rows: &[f32]) -> Result<(), GeneratorError> {
        let layer = self.check(gen)?;
        if rows.len() % gen.d != 0 {
            return Err(GeneratorError::RowsNotMultiple { len: rows.len(), n_embd: gen.d });
        }
        if rows.is_empty() {
            return Ok(());
        }
        let part = gen.pool_parallel(layer, rows)?;
        self.part.merge(&part);
        Ok(())
    }

    /// The id of the generator it belongs to ([`Generator::id`]).
    pub fn generator_id(&self) -> u64 {
        self.gen_id
    }

    /// Bytes of its running maxima and sums.
    pub fn bytes(&self) -> usize {
        self.part.max.len() * 4 + (self.part.sum.len() + self.part.acc.len()) * 8
    }

    /// Rows fed so far.
    pub fn rows_seen(&self) -> usize {
        self.part.rows
    }

    /// The layer this state belongs to.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Writes the m x n_embd soft tokens into `out`. Fails with [`GeneratorError::NoRows`] if no
    /// row was fed. The state is not consumed: feeding more rows and finishing again is allowed.
    pub fn finish(&self, gen: &Generator, out: &mut [f32]) -> Result<(), GeneratorError> {
        let layer = self.check(gen)?;
        gen.check_out(out)?;
        if self.part.rows == 0 {
            return Err(GeneratorError::NoRows);
        }
        gen.finish(layer, &self.part, out);
        Ok(())
    }

    fn check<'g>(&self, gen: &'g Generator) -> Result<&'g Layer, GeneratorError> {
        if self.gen_id != gen.id {
            return Err(GeneratorError::ForeignState);
        }
        gen.layer(self.layer)
    }
}
