//! How llama.cpp splits a batch into ubatches: which batch rows each ubatch's graph holds, in
//! graph-row order. The evaluation callback sees only graph nodes, so the injection hook needs this
//! to know which of its rows a node holds ([`iapt_hook::Split`]).
//!
//! Written by hand because llama.cpp does not expose it: this is the rule of the pinned llama.cpp
//! (`llama_batch_allocr::split_simple` and `split_equal` in `src/llama-batch.cpp`, used by
//! `llama_kv_cache::init_batch`), for batches whose rows each belong to one sequence (what
//! [`crate::Batch`] makes). With one KV stream (`kv_unified`, or one sequence) the batch is cut
//! into consecutive runs of `n_ubatch` rows. With one stream per sequence every ubatch holds the
//! same number of rows of each of its sequences, whose ids must follow each other (`sequential`),
//! and a sequence's rows keep their batch order. The contract test
//! `split_matches_llama_cpp` (`tests/contracts.rs`) decodes random batches and reads each ubatch's
//! token embeddings back from the graph to check this against the linked llama.cpp.

use std::collections::BTreeMap;
use std::ops::Range;

use iapt_hook::Split;

/// The ubatches llama.cpp makes of a batch whose row `i` belongs to sequence `seqs[i]`: with one
/// KV stream, runs of `n_ubatch` rows; with one stream per sequence, llama.cpp's equal split.
pub fn split(seqs: &[i32], n_ubatch: usize, one_stream: bool) -> Split {
    let n_ubatch = n_ubatch.max(1);
    if one_stream {
        return Split::Simple { batch_len: seqs.len(), n_ubatch };
    }
    Split::Planned(split_equal(seqs, n_ubatch))
}

/// `split_equal(n_ubatch, sequential = true, n_keep_tail = 0)`, repeated until every row is used.
fn split_equal(seqs: &[i32], n_ubatch: usize) -> Vec<Vec<Range<usize>>> {
    // Each sequence's rows in batch order (llama.cpp's `seq_set_map` for one-sequence rows).
    let mut rows_of: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, &s) in seqs.iter().enumerate() {
        rows_of.entry(s).or_default().push(i);
    }
    let mut used = vec![false; seqs.len()];
    let mut next: BTreeMap<i32, usize> = rows_of.keys().map(|&s| (s, 0)).collect();
    let mut ubatches = Vec::new();
    loop {
        // The sequences of this ubatch: scanning unused rows in batch order, each new sequence
        // whose id follows the last one taken.
        let mut chosen: Vec<i32> = Vec::new();
        for (i, &s) in seqs.iter().enumerate() {
            if used[i] || chosen.contains(&s) {
                continue;
            }
            if chosen.last().is_none_or(|&last| s == last + 1) {
                chosen.push(s);
                if chosen.len() > n_ubatch {
                    break;
                }
            }
        }
        if chosen.is_empty() {
            return ubatches;
        }
        // Equal rows per sequence: one more of each while all have one left and the next round fits.
        let mut taken: Vec<Vec<usize>> = vec![Vec::new(); chosen.len()];
        loop {
            let can_expand = chosen.iter().all(|s| next[s] < rows_of[s].len());
            if !can_expand {
                break;
            }
            for (k, s) in chosen.iter().enumerate() {
                let cursor = next.get_mut(s).expect("every sequence has a cursor");
                let row = rows_of[s][*cursor];
                used[row] = true;
                taken[k].push(row);
                *cursor += 1;
            }
            if (taken[0].len() + 1) * chosen.len() > n_ubatch {
                break;
            }
        }
        ubatches.push(runs(&taken.concat()));
    }
}

/// Batch rows in graph order as ranges of consecutive rows.
fn runs(rows: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &r in rows {
        match out.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => out.push(r..r + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(seqs: &[i32], n_ubatch: usize) -> Vec<Vec<Range<usize>>> {
        match split(seqs, n_ubatch, false) {
            Split::Planned(u) => u,
            Split::Simple { .. } => unreachable!(),
        }
    }

    #[test]
    fn one_stream_is_runs_of_n_ubatch() {
        assert_eq!(split(&[0, 1, 1, 2], 512, true), Split::Simple { batch_len: 4, n_ubatch: 512 });
    }

    #[test]
    fn decode_tokens_of_consecutive_sequences_are_one_ubatch() {
        let seqs: Vec<i32> = (0..16).collect();
        assert_eq!(planned(&seqs, 512), vec![vec![0..16]]);
    }

    #[test]
    fn a_gap_in_sequence_ids_starts_a_new_ubatch() {
        // Slots 0, 1, 3 decode; slot 2 is idle.
        assert_eq!(planned(&[0, 1, 3], 512), vec![vec![0..2], vec![2..3]]);
    }

    #[test]
    fn a_prefill_chunk_beside_decode_tokens_is_split_equally() {
        // Slots 0, 1 and 3 decode one token each; slot 2 prefills 5 rows (batch rows 3..8).
        let seqs = [0, 1, 3, 2, 2, 2, 2, 2];
        assert_eq!(planned(&seqs, 512), vec![vec![0..2, 3..4], vec![2..3], vec![4..8]]);
    }

    #[test]
    fn n_ubatch_caps_rows_per_ubatch() {
        let seqs = [5; 10];
        assert_eq!(planned(&seqs, 4), vec![vec![0..4], vec![4..8], vec![8..10]]);
        // Two sequences of 5 rows, 4 rows a ubatch: 2 of each.
        let seqs = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
        assert_eq!(planned(&seqs, 4), vec![vec![0..2, 5..7], vec![2..4, 7..9], vec![4..5, 9..10]]);
    }
}
