//! The generator with W_down and W_up held as stored (F16, or Q8_0 blocks) against the same values
//! held as f32, side by side in one run (issue 29: resident as stored must keep >= 0.9x the f32
//! throughput).
//!
//! Shape: LLaMA-2-7B's paper generator (n_embd 4096, 32 layers, m 4, r 320, rational B 6/5) and the
//! bench model's (n_embd 2048, 22 layers, r 160). For each instruction length, one whole prefill's
//! generator work (every layer: feed the rows, finish) alternating F16 / F32, `REPS` pairs after a
//! warm-up; prints the medians, the median of the per-pair ratios and the bytes each holds.
//!
//! `cargo run --release -p iapt-generator --example stored_vs_f32 -- [THREADS] [REPS] [f16|q8_0]`

use std::time::Instant;

use iapt_format::{Activation, Adapter, DType, RationalConfig, RationalVariant};
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_generator::Generator;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of one prefill's generator work: every layer fed `hidden[l]` and finished.
fn prefill(gen: &Generator, hidden: &[Vec<f32>], out: &mut [f32]) -> f64 {
    let t = Instant::now();
    for (l, rows) in hidden.iter().enumerate() {
        let mut st = gen.begin(l);
        st.feed(gen, rows).expect("feed");
        st.finish(gen, out).expect("finish");
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(1, |a| a.parse().expect("THREADS"));
    let reps: usize = args.next().map_or(15, |a| a.parse().expect("REPS"));
    let dtype = args.next().map_or(DType::F16, |a| DType::from_lowercase(&a).expect("DTYPE: f16 or q8_0"));
    let act = Activation::Rational(RationalConfig { variant: RationalVariant::B, numerator_degree: 6, denominator_degree: 5, groups: 1 });
    println!("| shape | n | {dtype} held: ms (median) | f32 held: ms (median) | {dtype} / f32 throughput (median of {reps} pairs) | bytes held {dtype} / f32 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, layers, d, r) in [("7B (d 4096, r 320)", 32u32, 4096u32, 320u32), ("bench (d 2048, r 160)", 22, 2048, 160)] {
        let mut spec = AdapterSpec::small(layers, d, 4, r, act);
        spec.dtype = DType::F16;
        let stored = random_adapter(&spec, &mut Rng::new(42)).expect("valid adapter").with_dtype(dtype).expect("in memory");
        let wide = stored.tensors().iter().map(|t| t.to_dtype(DType::F32).expect("f32")).collect();
        let wide = Adapter::from_parts(stored.config().clone(), stored.extras().clone(), wide).expect("f32 twin");
        let a = Generator::from_adapter(&stored).expect("generator").with_threads(threads).expect("threads");
        let b = Generator::from_adapter(&wide).expect("generator").with_threads(threads).expect("threads");
        let mut out = vec![0.0f32; 4 * d as usize];
        for n in [64usize, 512] {
            let hidden: Vec<Vec<f32>> = (0..layers).map(|l| Rng::new(100 + u64::from(l)).vec_f32(n * d as usize, 1.0)).collect();
            prefill(&a, &hidden, &mut out);
            prefill(&b, &hidden, &mut out);
            let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps {
                let x = prefill(&a, &hidden, &mut out);
                let y = prefill(&b, &hidden, &mut out);
                ta.push(x);
                tb.push(y);
                ratio.push(y / x);
            }
            println!(
                "| {name} | {n} | {:.2} | {:.2} | {:.3}x (min {:.3}x) | {:.1} / {:.1} MiB |",
                median(ta) * 1e3,
                median(tb) * 1e3,
                median(ratio.clone()),
                ratio.iter().copied().fold(f64::INFINITY, f64::min),
                a.weight_bytes() as f64 / 1048576.0,
                b.weight_bytes() as f64 / 1048576.0
            );
        }
    }
}
