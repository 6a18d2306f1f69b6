//! llama.cpp's sampler chain on logits rows we own ([`SamplerChain`]): greedy is the first
//! maximum (computed here), a seeded chain repeats itself, top-k 1 is greedy whatever the
//! temperature, the repetition penalty acts on accepted tokens, and bad settings or rows are refused
//! before llama.cpp sees them.

use iapt_llama::{SamplerChain, SamplerSettings};

/// The index of the first largest value.
fn argmax(row: &[f32]) -> i32 {
    row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as i32
}

/// Pseudo-random logits rows (splitmix64), with ties.
fn rows(n: usize, n_vocab: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % 1000) as f32 / 100.0
    };
    (0..n).map(|_| (0..n_vocab).map(|_| next()).collect()).collect()
}

#[test]
fn greedy_is_the_first_maximum() {
    let mut chain = SamplerChain::new(50, &SamplerSettings::default()).unwrap();
    for row in rows(40, 50, 1) {
        assert_eq!(chain.sample(&row).unwrap(), Some(argmax(&row)));
    }
}

#[test]
fn a_seeded_chain_repeats_itself_and_seeds_differ() {
    let settings = |seed| SamplerSettings { temperature: 1.5, top_k: 20, top_p: 0.95, min_p: 0.01, seed, ..Default::default() };
    let draw = |seed| {
        let mut chain = SamplerChain::new(50, &settings(seed)).unwrap();
        rows(60, 50, 2).iter().map(|r| chain.sample(r).unwrap().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    assert!(draw(7).iter().zip(rows(60, 50, 2)).any(|(&t, r)| t != argmax(&r)), "temperature 1.5 is not greedy");
}

#[test]
fn top_k_1_is_greedy_at_any_temperature() {
    let mut chain = SamplerChain::new(50, &SamplerSettings { temperature: 5.0, top_k: 1, seed: 3, ..Default::default() }).unwrap();
    for row in rows(30, 50, 4) {
        assert_eq!(chain.sample(&row).unwrap(), Some(argmax(&row)));
    }
}

#[test]
fn the_repetition_penalty_acts_on_accepted_tokens() {
    let settings = SamplerSettings { repeat_penalty: 10.0, penalty_last_n: 8, ..Default::default() };
    let mut row = vec![0.0f32; 10];
    row[3] = 2.0;
    row[5] = 1.5;
    let mut chain = SamplerChain::new(10, &settings).unwrap();
    assert_eq!(chain.sample(&row).unwrap(), Some(3), "nothing accepted yet");
    // Token 3 was accepted by the draw: its logit is now divided by 10, so 5 wins.
    assert_eq!(chain.sample(&row).unwrap(), Some(5));
    // The prompt's tokens count too when accepted; without a penalty nothing changes.
    let mut fresh = SamplerChain::new(10, &settings).unwrap();
    fresh.accept(3).unwrap();
    assert_eq!(fresh.sample(&row).unwrap(), Some(5));
    let mut plain = SamplerChain::new(10, &SamplerSettings::default()).unwrap();
    plain.accept(3).unwrap();
    assert_eq!(plain.sample(&row).unwrap(), Some(3));
}

#[test]
fn bad_settings_and_rows_are_refused() {
    let bad = SamplerSettings { top_p: 0.0, ..Default::default() };
    assert_eq!(SamplerChain::new(10, &bad).err().unwrap().field, "top_p");
    let mut chain = SamplerChain::new(10, &SamplerSettings::default()).unwrap();
    assert_eq!(chain.sample(&[0.0; 9]).unwrap(), None, "a row of the wrong length");
    // Ids outside the vocabulary are ignored by accept (the penalties index by id).
    chain.accept(-1).unwrap();
    chain.accept(10).unwrap();
    assert_eq!(chain.sample(&[0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap(), Some(1));
}
