//! Generator speed at the LLaMA-2-7B shape (n_embd 4096, bottleneck 320, 4 soft tokens, 32
//! layers) for instruction lengths 64, 512 and 2048, both strategies, 1 and 2 threads, next to the
//! core's practical peak f32 FMA rate, measured in the same run.
//!
//! Peak: the best single-threaded `gemm` throughput on cache-resident square f32 matrices (128,
//! 192, 256). A register-resident `mul_add` loop would need FMA enabled at compile time (the
//! workspace builds for baseline x86-64, where `f32::mul_add` is a libm call), and intrinsics need
//! `unsafe`; gemm dispatches to its AVX2/AVX-512 FMA kernels at run time, so its best cache-resident
//! rate is the practical ceiling for this crate's own GEMM calls.
//!
//! Criterion measures one layer per iteration (cycling through the 32 layers so weights are not
//! cache-hot); its throughput line counts the nominal FLOPs, 2·n·4096·320 per layer (the
//! down-projection), so "Gelem/s" reads as nominal GFLOP/s. After the criterion groups a summary
//! table (minimum of repeated whole-prompt runs, 32 layers, peak re-measured next to each row) is
//! printed in Markdown for `BENCH.md`. `IAPT_BENCH_QUICK=1` skips criterion and prints only the table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use iapt_format::Activation;
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_generator::{Generator, Strategy};

const D: usize = 4096;
const R: usize = 320;
const M: usize = 4;
const LAYERS: usize = 32;
const LENGTHS: [usize; 3] = [64, 512, 2048];

/// FLOPs of the nominal count: the down-projection, 2·n·d·r.
fn nominal_flops(n: usize) -> f64 {
    2.0 * (n * D * R) as f64
}

/// FLOPs each strategy actually executes per layer (GEMMs only; the O(n·m) softmax is ignored).
fn executed_flops(strategy: Strategy, n: usize) -> f64 {
    let (n, d, r, m) = (n as f64, D as f64, R as f64, M as f64);
    let tail = 2.0 * m * r * d; // up-projection
    match strategy {
        // scores H K (2nmd) + pooling E^T H (2nmd) + pooled W_down^T (2mdr) + up.
        Strategy::PoolFirst => 4.0 * n * m * d + 2.0 * m * d * r + tail,
        // Z = H W^T (2ndr) + scores (2nrm) + pooling (2nmr) + up.
        _ => 2.0 * n * d * r + 4.0 * n * r * m + tail,
    }
}

/// Practical peak: best GFLOP/s of a square f32 GEMM that fits in L2, run by `threads` threads
/// at once (each on its own matrices; the figure is their sum, so it shows how many cores the
/// machine really gives this process at the moment).
fn peak_gflops(threads: usize, reps: usize) -> f64 {
    // Each thread multiplies for 0.5 s, long enough that both threads really run together.
    let one = |size: usize| -> f64 {
        let a = Rng::new(1).vec_f32(size * size, 1.0);
        let b = Rng::new(2).vec_f32(size * size, 1.0);
        let mut c = vec![0.0f32; size * size];
        square(&mut c, &a, &b, size); // warm
        let t = Instant::now();
        let mut iters = 0;
        while t.elapsed() < Duration::from_millis(500) {
            square(&mut c, &a, &b, size);
            iters += 1;
        }
        2.0 * (size * size * size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let mut best: f64 = 0.0;
    for size in [128usize, 192, 256] {
        for _ in 0..reps {
            let total: f64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || one(size))).collect();
                hs.into_iter().map(|h| h.join().expect("peak thread")).sum()
            });
            best = best.max(total);
        }
    }
    best
}

/// c = a b for square row-major n x n matrices, through the same GEMM wrapper the generator uses.
fn square(c: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    iapt_generator::bench_support::matmul_f32(c, a, b, n, n, n);
    black_box(&c[0]);
}

struct Setup {
    adapter: iapt_format::Adapter,
    gen: Generator,
    rows: Vec<Vec<f32>>,
}

fn setup() -> Setup {
    let t = Instant::now();
    let act = Activation::Rational(iapt_format::RationalConfig {
        variant: iapt_format::RationalVariant::B,
        numerator_degree: 6,
        denominator_degree: 5,
        groups: 1,
    });
    let mut spec = AdapterSpec::small(LAYERS as u32, D as u32, M as u32, R as u32, act);
    spec.dtype = iapt_format::DType::BF16;
    let adapter = random_adapter(&spec, &mut Rng::new(42)).expect("valid adapter");
    let gen = Generator::from_adapter(&adapter).expect("generator");
    let mut rng = Rng::new(7);
    let rows = LENGTHS.iter().map(|&n| rng.vec_f32(n * D, 1.0)).collect();
    eprintln!("setup: {:.1} s, {} MiB of f32 weights", t.elapsed().as_secs_f64(), gen.weight_bytes() >> 20);
    Setup { adapter, gen, rows }
}

fn criterion_groups(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("peak");
    g.throughput(Throughput::Elements(2 * 256 * 256 * 256));
    let a = Rng::new(1).vec_f32(256 * 256, 1.0);
    let b = Rng::new(2).vec_f32(256 * 256, 1.0);
    let mut out = vec![0.0f32; 256 * 256];
    g.bench_function("gemm_f32_256", |bch| bch.iter(|| square(&mut out, &a, &b, 256)));
    g.finish();

    for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
        for threads in [1usize, 2] {
            let gen = s.gen.clone().with_strategy(strategy).with_threads(threads).expect("threads");
            let mut g = c.benchmark_group(format!("layer/{strategy:?}/{threads}t"));
            g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
            for (i, &n) in LENGTHS.iter().enumerate() {
                g.throughput(Throughput::Elements(nominal_flops(n) as u64));
                let rows = &s.rows[i];
                let mut out = vec![0.0f32; M * D];
                let mut layer = 0;
                g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bch, _| {
                    bch.iter(|| {
                        layer = (layer + 1) % LAYERS;
                        gen.generate(layer, rows, &mut out).expect("generate");
                        black_box(out[0])
                    })
                });
            }
            g.finish();
        }
    }
}

/// Per-layer times (seconds) of `calls` one-shot calls cycling through the 32 layers (so each
/// call meets weights that are not cache-hot), sorted.
fn layer_times(gen: &Generator, rows: &[f32], calls: usize) -> Vec<f64> {
    let mut out = vec![0.0f32; M * D];
    let mut times: Vec<f64> = (0..calls)
        .map(|i| {
            let t = Instant::now();
            gen.generate(i % LAYERS, rows, &mut out).expect("generate");
            black_box(&out);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// The f32 path's max-norm relative error against the f64 reference at the full shape (layer 0).
fn accuracy(s: &Setup) {
    println!();
    for (i, &n) in LENGTHS.iter().enumerate().take(2) {
        let rows = &s.rows[i];
        let r64: Vec<f64> = rows.iter().map(|&v| f64::from(v)).collect();
        let want = iapt_generator::reference::generate(&s.adapter, 0, &r64).expect("reference");
        for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
            let gen = s.gen.clone().with_strategy(strategy);
            let mut out = vec![0.0f32; M * D];
            gen.generate(0, rows, &mut out).expect("generate");
            let err = iapt_generator::testing::rel_err(&out, &want);
            println!("accuracy: n {n} {strategy:?}: max |f32 - f64| / max |f64| = {err:.2e}");
        }
    }
}

fn summary(s: &Setup) {
    let (p1, p2) = (peak_gflops(1, 2), peak_gflops(2, 2));
    println!("\npractical peak (cache-resident f32 GEMM): 1 thread {p1:.1} GFLOP/s, 2 threads together {p2:.1} GFLOP/s");
    println!("\n| strategy | n | threads | ms / layer (min) | ms / layer (median) | ms / prompt (32 x min) | nominal GFLOP/s | executed GFLOP/s | executed / peak | speed-up 1t -> 2t (min) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
        for (i, &n) in LENGTHS.iter().enumerate() {
            let mut t1 = 0.0;
            for threads in [1usize, 2] {
                let gen = s.gen.clone().with_strategy(strategy).with_threads(threads).expect("threads");
                let calls = match (strategy, n) {
                    (Strategy::DownFirst, 2048) => 12,
                    (Strategy::DownFirst, 512) => 32,
                    _ => 64,
                };
                layer_times(&gen, &s.rows[i], 4); // warm
                let times = layer_times(&gen, &s.rows[i], calls);
                let (t, med) = (times[0], times[times.len() / 2]);
                let peak = if threads == 1 { p1 } else { p2 };
                let nominal = nominal_flops(n) / t / 1e9;
                let executed = executed_flops(strategy, n) / t / 1e9;
                let speedup = if threads == 1 {
                    t1 = t;
                    String::new()
                } else {
                    format!("{:.2}x", t1 / t)
                };
                println!(
                    "| {strategy:?} | {n} | {threads} | {:.3} | {:.3} | {:.1} | {nominal:.1} | {executed:.1} | {:.0}% | {speedup} |",
                    t * 1e3,
                    med * 1e3,
                    t * 1e3 * LAYERS as f64,
                    100.0 * executed / peak
                );
            }
        }
    }
    let (q1, q2) = (peak_gflops(1, 2), peak_gflops(2, 2));
    println!("\npractical peak again after the table: 1 thread {q1:.1} GFLOP/s, 2 threads together {q2:.1} GFLOP/s");
}
fn main() {
    let s = setup();
    if std::env::var_os("IAPT_BENCH_QUICK").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_groups(&mut c, &s);
        c.final_summary();
    }
    accuracy(&s);
    summary(&s);
}
