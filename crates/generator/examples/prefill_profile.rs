//! One prefill's generator work at the shape of `iapt bench` (TinyLlama-1.1B: n_embd 2048,
//! 22 layers; adapter m 4, r 256, rational B 6/5, F16 storage; 508 instruction rows), repeated, for
//! profilers: `perf record` or `valgrind --tool=callgrind` on this binary shows where the hook's
//! "generating" time goes, free of llama.cpp's own work.
//!
//! `cargo run --release -p iapt-generator --example prefill_profile -- [THREADS] [REPS]`
//! prints the minimum and median wall time of one prefill (all 22 layers, one `LayerState`
//! fed once and finished per layer, as the hook does).

use std::time::Instant;

use iapt_format::{Activation, DType, RationalConfig, RationalVariant};
use iapt_generator::testing::{random_adapter, AdapterSpec, Rng};
use iapt_generator::Generator;

const LAYERS: u32 = 22;
const D: u32 = 2048;
const M: u32 = 4;
const R: u32 = 256;
const ROWS: usize = 508;

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(1, |a| a.parse().expect("THREADS"));
    let reps: usize = args.next().map_or(20, |a| a.parse().expect("REPS"));
    let act = Activation::Rational(RationalConfig { variant: RationalVariant::B, numerator_degree: 6, denominator_degree: 5, groups: 1 });
    let mut spec = AdapterSpec::small(LAYERS, D, M, R, act);
    spec.dtype = DType::F16;
    let adapter = random_adapter(&spec, &mut Rng::new(42)).expect("valid adapter");
    let gen = Generator::from_adapter(&adapter).expect("generator").with_threads(threads).expect("threads");
    let hidden: Vec<Vec<f32>> = (0..LAYERS).map(|l| Rng::new(100 + u64::from(l)).vec_f32(ROWS * D as usize, 1.0)).collect();
    let mut out = vec![0.0f32; (M * D) as usize];
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        for (l, rows) in hidden.iter().enumerate() {
            let mut st = gen.begin(l);
            st.feed(&gen, rows).expect("feed");
            st.finish(&gen, &mut out).expect("finish");
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&out);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "threads {threads}: one prefill's generator work ({LAYERS} layers x {ROWS} rows): min {:.2} ms, median {:.2} ms over {reps}",
        times[0],
        times[reps / 2]
    );
}
