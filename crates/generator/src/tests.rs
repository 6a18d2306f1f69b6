//! Tests of the production path against the independent f64 reference: every activation, both
//! strategies, every storage dtype, shared tensors, streaming with random chunkings, threads, the
//! numerical edge cases of issue 3, and every error. Each test draws a fresh seed (printed in every
//! failure message; replay with `IAPT_TEST_SEED=<seed>`). Shapes are small so debug builds stay fast.

use iapt_format::{Activation, DType, RationalConfig, RationalVariant, Role};
use proptest::prelude::*;

use crate::testing::{all_activations, fresh_seed, random_adapter, rel_err, AdapterSpec, Rng};
use crate::{reference, Generator, GeneratorError, Strategy};

/// The bound of issue 3 on the f32 path's max-norm relative error against the f64 reference.
const TOL: f64 = 1e-5;
/// The bound between two f32 evaluations of the same function that differ only in rounding
/// (chunking, threads, block boundaries, identical rows): a few f32 ulps amplified by the
/// activation's and the up-projection's conditioning.
const PAIR_TOL: f64 = 5e-6;

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Runs the production path (one shot) on `rows` for `layer`.
fn run(gen: &Generator, layer: usize, rows: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; gen.n_soft_tokens() * gen.n_embd()];
    gen.generate(layer, rows, &mut out).unwrap();
    out
}

/// A random spec with small dims and the given activation.
fn random_spec(rng: &mut Rng, activation: Activation) -> AdapterSpec {
    let r = match activation {
        Activation::Rational(rc) => rc.groups * (1 + rng.below(6) as u32),
        _ => 1 + rng.below(12) as u32,
    };
    let mut spec = AdapterSpec::small(1 + rng.below(3) as u32, 8 + rng.below(33) as u32, 1 + rng.below(5) as u32, r, activation);
    spec.pool_scale = rng.range(0.2, 3.0) as f32;
    spec.dtype = DType::FLOATS[rng.below(3)];
    spec.biases = rng.below(2) == 0;
    spec.shared = Role::ALL.into_iter().filter(|_| rng.below(3) == 0).collect();
    spec
}

#[test]
fn f32_path_matches_f64_reference_for_every_activation() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for act in all_activations(4) {
        let spec = random_spec(&mut rng, act);
        let adapter = random_adapter(&spec, &mut rng).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
            let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
            for layer in 0..gen.n_layer() {
                let n = 1 + rng.below(30);
                let rows = rng.vec_f32(n * gen.n_embd(), 1.0);
                let want = reference::generate(&adapter, layer, &to_f64(&rows)).unwrap();
                let err = rel_err(&run(&gen, layer, &rows), &want);
                assert!(err <= TOL, "seed {seed}: {act:?} {strategy:?} layer {layer} n {n} spec {spec:?}: rel err {err:e}");
            }
        }
    }
}

#[test]
fn strategies_agree_and_auto_picks_pool_first_for_small_m() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let adapter = random_adapter(&AdapterSpec::small(1, 24, 2, 16, Activation::Silu), &mut rng).unwrap();
    let auto = Generator::from_adapter(&adapter).unwrap();
    assert_eq!(auto.strategy(), Strategy::PoolFirst);
    let down = auto.clone().with_strategy(Strategy::DownFirst);
    let rows = rng.vec_f32(37 * 24, 2.0);
    let (a, b) = (run(&auto, 0, &rows), run(&down, 0, &rows));
    assert!(rel_err(&a, &to_f64(&b)) <= 2.0 * TOL, "seed {seed}");
    let wide = random_adapter(&AdapterSpec::small(1, 8, 4, 8, Activation::Silu), &mut rng).unwrap();
    assert_eq!(Generator::from_adapter(&wide).unwrap().strategy(), Strategy::DownFirst);
}

/// Feeds `rows` in the chunks (in rows) given by `cuts` and finishes.
fn streamed(gen: &Generator, layer: usize, rows: &[f32], cuts: &[usize]) -> Vec<f32> {
    let d = gen.n_embd();
    let mut st = gen.begin(layer);
    let mut at = 0;
    for &c in cuts {
        let end = (at + c).min(rows.len() / d);
        st.feed(gen, &rows[at * d..end * d]).unwrap();
        at = end;
    }
    st.feed(gen, &rows[at * d..]).unwrap();
    assert_eq!(st.rows_seen(), rows.len() / d);
    let mut out = vec![f32::NAN; gen.n_soft_tokens() * d];
    st.finish(gen, &mut out).unwrap();
    out
}

#[test]
fn streaming_with_random_chunkings_equals_one_shot() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for trial in 0..24 {
        let act = all_activations(2)[rng.below(26)];
        let spec = random_spec(&mut rng, act);
        let adapter = random_adapter(&spec, &mut rng).unwrap();
        let strategy = [Strategy::PoolFirst, Strategy::DownFirst][trial % 2];
        let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
        // More rows than one block (64 / 256) so chunk and block boundaries interleave.
        let n = 1 + rng.below(300);
        let rows = rng.vec_f32(n * gen.n_embd(), 1.5);
        let cuts: Vec<usize> = (0..rng.below(8)).map(|_| rng.below(n + 1)).collect();
        let one = run(&gen, 0, &rows);
        let st = streamed(&gen, 0, &rows, &cuts);
        let err = rel_err(&st, &to_f64(&one));
        assert!(err <= PAIR_TOL, "seed {seed} trial {trial}: {strategy:?} n {n} cuts {cuts:?}: streamed vs one-shot {err:e}");
        let want = reference::generate(&adapter, 0, &to_f64(&rows)).unwrap();
        assert!(rel_err(&st, &want) <= TOL, "seed {seed} trial {trial}: streamed vs reference");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Streaming = one shot for arbitrary chunkings (proptest draws and shrinks the chunk sizes).
    #[test]
    fn streaming_property(seed in any::<u64>(), n in 1usize..150, cuts in proptest::collection::vec(0usize..150, 0..10)) {
        let mut rng = Rng::new(seed);
        let adapter = random_adapter(&AdapterSpec::small(1, 12, 3, 6, Activation::Gelu), &mut rng).unwrap();
        for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
            let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
            let rows = rng.vec_f32(n * 12, 1.0);
            let err = rel_err(&streamed(&gen, 0, &rows, &cuts), &to_f64(&run(&gen, 0, &rows)));
            prop_assert!(err <= PAIR_TOL, "{:?}: {:e}", strategy, err);
        }
    }
}

#[test]
fn threads_give_the_single_thread_result() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // d 16 / r 12: only the pooling splits rows; d 160 / r 136: the tail's two products split
    // W_down's and W_up's rows among the threads too.
    for (d, r) in [(16u32, 12u32), (160, 136)] {
        let adapter = random_adapter(&AdapterSpec::small(2, d, 3, r, Activation::Tanh), &mut rng).unwrap();
        for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
            let one = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
            let three = one.clone().with_threads(3).unwrap();
            for n in [1, 64, 200, 513] {
                let rows = rng.vec_f32(n * d as usize, 1.0);
                let err = rel_err(&run(&three, 1, &rows), &to_f64(&run(&one, 1, &rows)));
                assert!(err <= PAIR_TOL, "seed {seed}: d {d} {strategy:?} n {n}: {err:e}");
                let want = reference::generate(&adapter, 1, &to_f64(&rows)).unwrap();
                assert!(rel_err(&run(&three, 1, &rows), &want) <= TOL, "seed {seed}: d {d}");
            }
        }
    }
    let adapter = random_adapter(&AdapterSpec::small(2, 16, 3, 12, Activation::Tanh), &mut rng).unwrap();
    assert!(matches!(Generator::from_adapter(&adapter).unwrap().with_threads(0), Err(GeneratorError::ZeroThreads)));
}

#[test]
fn shared_tensors_are_held_once_and_used_by_every_layer() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut spec = AdapterSpec::small(4, 16, 2, 8, Activation::Relu);
    let per_layer = Generator::from_adapter(&random_adapter(&spec, &mut rng).unwrap()).unwrap().with_strategy(Strategy::DownFirst);
    spec.shared = vec![Role::DownWeight, Role::UpWeight];
    let adapter = random_adapter(&spec, &mut rng).unwrap();
    let shared = Generator::from_adapter(&adapter).unwrap().with_strategy(Strategy::DownFirst);
    // Two of the four layers' big matrices are stored once: 2 x (4 - 1) x 16 x 8 floats fewer.
    assert_eq!(per_layer.weight_bytes() - shared.weight_bytes(), 2 * 3 * 16 * 8 * 4);
    let rows = rng.vec_f32(5 * 16, 1.0);
    for layer in 0..4 {
        let want = reference::generate(&adapter, layer, &to_f64(&rows)).unwrap();
        assert!(rel_err(&run(&shared, layer, &rows), &want) <= TOL, "seed {seed} layer {layer}");
    }
}

#[test]
fn large_magnitude_scores_do_not_overflow() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
        let mut spec = AdapterSpec::small(1, 16, 3, 8, Activation::Identity);
        spec.pool_scale = 1e4; // scores of order 1e4: exp would overflow without the running max
        let adapter = random_adapter(&spec, &mut rng).unwrap();
        let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
        // Identical rows, each scored ~1e4 and ~1e7 (hidden states of magnitude 1e3): a naive
        // exp(score) overflows to inf and inf / inf is NaN; the result must be that of one row.
        for mag in [1.0f32, 1e3] {
            let row: Vec<f32> = rng.vec_f32(16, 1.0).into_iter().map(|v| v * mag).collect();
            let same: Vec<f32> = row.iter().copied().cycle().take(16 * 70).collect();
            let want = reference::generate(&adapter, 0, &to_f64(&row)).unwrap();
            let err = rel_err(&run(&gen, 0, &same), &want);
            assert!(err <= TOL, "seed {seed}: {strategy:?} magnitude {mag}: rel err {err:e}");
        }
        // Distinct rows with scores of order 1e4: finite, and as close to the reference as the
        // problem's conditioning allows. An f32 score of magnitude 1e4 carries an absolute error
        // of about 1e4 x 2^-24 x sqrt(d) ~ 1e-3, which moves the softmax weights by that relative
        // amount, so this comparison cannot be held to 1e-5 by any f32 implementation.
        let rows = rng.vec_f32(20 * 16, 1.0);
        let got = run(&gen, 0, &rows);
        let want = reference::generate(&adapter, 0, &to_f64(&rows)).unwrap();
        let err = rel_err(&got, &want);
        assert!(err <= 1e-2, "seed {seed}: {strategy:?} distinct rows: rel err {err:e}");
        // Hidden states of magnitude 1e4 too (scores of order 1e8): still finite.
        let big: Vec<f32> = rows.iter().map(|v| v * 1e4).collect();
        assert!(run(&gen, 0, &big).iter().all(|v| v.is_finite()), "seed {seed}: {strategy:?}");
    }
}

#[test]
fn single_row_and_identical_rows() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let act = Activation::Rational(RationalConfig { variant: RationalVariant::B, numerator_degree: 6, denominator_degree: 5, groups: 2 });
    let adapter = random_adapter(&AdapterSpec::small(1, 20, 4, 10, act), &mut rng).unwrap();
    for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
        let gen = Generator::from_adapter(&adapter).unwrap().with_strategy(strategy);
        let row = rng.vec_f32(20, 1.0);
        let one = run(&gen, 0, &row);
        let want = reference::generate(&adapter, 0, &to_f64(&row)).unwrap();
        assert!(rel_err(&one, &want) <= TOL, "seed {seed}: n = 1");
        // n identical rows: uniform weights, so the pooled row is that row.
        let same: Vec<f32> = row.iter().copied().cycle().take(20 * 100).collect();
        let err = rel_err(&run(&gen, 0, &same), &to_f64(&one));
        assert!(err <= PAIR_TOL, "seed {seed}: {strategy:?} identical rows: {err:e}");
    }
}

#[test]
fn rational_denominators_at_and_near_their_minimum() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // Near the minimum: every x of a fine grid around the roots of the denominator polynomial,
    // production evaluation (Horner, f64) against the reference (powers) per variant.
    for variant in [RationalVariant::A, RationalVariant::B, RationalVariant::C, RationalVariant::D] {
        let rc = RationalConfig { variant, numerator_degree: 3, denominator_degree: 2, groups: 1 };
        let act = Activation::Rational(rc);
        let root = rng.range(-2.0, 2.0);
        // t(x) = (x - root)^2 - 1e-3 (C: b_0..b_2), x (x - root) (A, B, D: b_1, b_2): both vanish nearby.
        let den: Vec<f64> = match variant {
            RationalVariant::C => vec![root * root - 1e-3, -2.0 * root, 1.0],
            _ => vec![-root, 1.0],
        };
        let num: Vec<f64> = vec![0.3, -1.0, 0.5, 0.25];
        let (num32, den32): (Vec<f32>, Vec<f32>) = (num.iter().map(|&v| v as f32).collect(), den.iter().map(|&v| v as f32).collect());
        let num64: Vec<f64> = num32.iter().map(|&v| f64::from(v)).collect();
        let den64: Vec<f64> = den32.iter().map(|&v| f64::from(v)).collect();
        let xs: Vec<f64> = (-200..=200).map(|i| root + f64::from(i) * 1e-4).chain([0.0, root]).collect();
        let mut got = xs.clone();
        crate::activation::apply(&act, &num32, &den32, 1, &mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = reference::activation(&act, &num64, &den64, 1, 0, *x);
            assert!(g.is_finite() && (g - want).abs() <= 1e-12 * (1.0 + want.abs()), "seed {seed}: {variant:?} x {x}: {g} vs {want}");
        }
    }
    // At the minimum: all denominator coefficients zero (Q = 1, or 0.1 for C), whole pipeline.
    for variant in [RationalVariant::A, RationalVariant::B, RationalVariant::C, RationalVariant::D] {
        let act = Activation::Rational(RationalConfig { variant, numerator_degree: 8, denominator_degree: 8, groups: 1 });
        let spec = AdapterSpec::small(1, 12, 2, 6, act);
        let base = random_adapter(&spec, &mut rng).unwrap();
        let tensors: Vec<_> = base
            .tensors()
            .iter()
            .map(|t| {
                if t.name().role == Role::ActDen {
                    iapt_format::Tensor::from_f32(t.name(), t.dtype(), t.shape().to_vec(), &vec![0.0; t.numel() as usize]).unwrap()
                } else {
                    t.clone()
                }
            })
            .collect();
        let adapter = iapt_format::Adapter::from_parts(spec.config(), Vec::new(), tensors).unwrap();
        let gen = Generator::from_adapter(&adapter).unwrap();
        let rows = rng.vec_f32(9 * 12, 1.0);
        let want = reference::generate(&adapter, 0, &to_f64(&rows)).unwrap();
        let err = rel_err(&run(&gen, 0, &rows), &want);
        assert!(err <= TOL, "seed {seed}: {variant:?} zero denominator: {err:e}");
    }
}

#[test]
fn errors() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let adapter = random_adapter(&AdapterSpec::small(2, 8, 2, 4, Activation::Gelu), &mut rng).unwrap();
    let gen = Generator::from_adapter(&adapter).unwrap();
    let mut out = vec![0.0; 16];
    let rows = rng.vec_f32(24, 1.0);
    assert!(matches!(gen.generate(2, &rows, &mut out), Err(GeneratorError::LayerOutOfRange { layer: 2, n_layer: 2 })));
    assert!(matches!(gen.generate(0, &rows[..7], &mut out), Err(GeneratorError::RowsNotMultiple { len: 7, n_embd: 8 })));
    assert!(matches!(gen.generate(0, &rows, &mut out[..15]), Err(GeneratorError::OutputSize { len: 15, expected: 16 })));
    assert!(matches!(gen.generate(0, &[], &mut out), Err(GeneratorError::NoRows)));
    let mut st = gen.begin(0);
    assert!(matches!(st.finish(&gen, &mut out), Err(GeneratorError::NoRows)));
    st.feed(&gen, &rows[..16]).unwrap();
    let mut bad = rows.clone();
    bad[8 + 3] = f32::NAN;
    assert!(matches!(st.feed(&gen, &bad), Err(GeneratorError::NonFiniteInput { row: 1 })));
    bad[8 + 3] = f32::INFINITY;
    assert!(matches!(st.feed(&gen, &bad), Err(GeneratorError::NonFiniteInput { .. })));
    assert_eq!(st.rows_seen(), 2, "a failed feed leaves the state unchanged");
    st.feed(&gen, &rows[16..]).unwrap();
    st.finish(&gen, &mut out).unwrap();
    let want = reference::generate(&adapter, 0, &to_f64(&rows)).unwrap();
    assert!(rel_err(&out, &want) <= TOL, "seed {seed}");
    let other = gen.clone().with_strategy(Strategy::DownFirst);
    assert!(matches!(st.feed(&other, &rows), Err(GeneratorError::ForeignState)));
    assert!(matches!(gen.begin(5).feed(&gen, &rows), Err(GeneratorError::LayerOutOfRange { .. })));
    assert!(matches!(reference::generate(&adapter, 9, &[0.0; 8]), Err(GeneratorError::LayerOutOfRange { .. })));
}

#[test]
fn state_is_send_and_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<crate::LayerState>();
    check::<Generator>();
}

/// W_down and W_up are held as stored (issue 29): an F16 or BF16 adapter's generator holds them at
/// 2 bytes a value, and its soft tokens have the same bits as the generator of the same values
/// stored as F32 (widening is exact; every product is computed as before), for both strategies and
/// with threads, and stay within the f64 reference's tolerance.
#[test]
fn weights_held_as_stored_give_the_bits_of_f32_weights() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for dtype in [DType::F16, DType::BF16] {
        let mut spec = AdapterSpec::small(3, 96, 4, 40, Activation::Gelu);
        spec.dtype = dtype;
        let stored = random_adapter(&spec, &mut rng).unwrap();
        let wide: Vec<iapt_format::Tensor> = stored.tensors().iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        let wide = iapt_format::Adapter::from_parts(stored.config().clone(), stored.extras().clone(), wide).unwrap();
        let rows = rng.vec_f32(150 * 96, 1.0);
        for strategy in [Strategy::PoolFirst, Strategy::DownFirst] {
            for threads in [1, 2] {
                let a = Generator::from_adapter(&stored).unwrap().with_strategy(strategy).with_threads(threads).unwrap();
                let b = Generator::from_adapter(&wide).unwrap().with_strategy(strategy).with_threads(threads).unwrap();
                for layer in 0..3 {
                    let (x, y) = (run(&a, layer, &rows), run(&b, layer, &rows));
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&x), bits(&y), "seed {seed} {dtype:?} {strategy:?} threads {threads} layer {layer}");
                    let want = reference::generate(&stored, layer, &to_f64(&rows)).unwrap();
                    assert!(rel_err(&x, &want) <= TOL, "seed {seed} {dtype:?} {strategy:?}");
                }
            }
        }
        // Held as stored under PoolFirst: the two matrices (3 layers x 2 x 40 x 96 values) at 2
        // bytes instead of 4.
        let a = Generator::from_adapter(&stored).unwrap().with_strategy(Strategy::PoolFirst);
        let b = Generator::from_adapter(&wide).unwrap().with_strategy(Strategy::PoolFirst);
        assert_eq!(b.weight_bytes() - a.weight_bytes(), 3 * 2 * 40 * 96 * 2, "{dtype:?}");
    }
}
