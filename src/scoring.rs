//! Scoring many token sequences with the scoring graph: length-bucketed batches under a token
//! budget, padded, run, and handed back row by row (shared by `edpo prep` and `edpo eval`).

use ndarray::Array2;

use crate::data::tokenize::TokenizedPair;
use crate::graphs::{GraphError, ReferenceGraph, ScoreOutputs};

/// Padding statistics of a set of batches.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub sequence_tokens: u64,
    pub padded_tokens: u64,
}

/// Groups sequence indices into batches of similar length under a token budget
/// (rows × longest length ≤ budget; a sequence longer than the budget is batched alone).
pub fn bucket_batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = lengths[i];
        let new_longest = longest.max(len);
        if !current.is_empty() && (current.len() + 1) * new_longest > budget {
            batches.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Prompt + chosen and prompt + rejected of every pair, interleaved: sequence 2i is pair i's
/// chosen response, 2i + 1 its rejected one.
pub fn pair_sequences<'a>(pairs: impl IntoIterator<Item = &'a TokenizedPair>) -> Vec<Vec<u32>> {
    pairs
        .into_iter()
        .flat_map(|p| {
            [&p.chosen_ids, &p.rejected_ids].map(|response| {
                let mut ids = p.prompt_ids.clone();
                ids.extend_from_slice(response);
                ids
            })
        })
        .collect()
}

/// Scores every sequence with top-`k` outputs; calls `each(sequence index, outputs, row)` once
/// per sequence with the batch outputs and the sequence's row in them (positions beyond the
/// sequence's length are padding).
pub fn score_sequences(
    graph: &mut ReferenceGraph,
    seqs: &[Vec<u32>],
    k: usize,
    batch_tokens: usize,
    pad_id: u32,
    mut each: impl FnMut(usize, &ScoreOutputs, usize),
) -> Result<BatchStats, GraphError> {
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let mut stats = BatchStats::default();
    for batch in bucket_batches(&lengths, batch_tokens) {
        let t = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        let n = batch.len();
        let mut ids = Array2::<i64>::from_elem((n, t), i64::from(pad_id));
        let mut mask = Array2::<i64>::zeros((n, t));
        for (row, &si) in batch.iter().enumerate() {
            for (j, &tok) in seqs[si].iter().enumerate() {
                ids[[row, j]] = i64::from(tok);
                mask[[row, j]] = 1;
            }
        }
        stats.sequence_tokens += batch.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        stats.padded_tokens += (n * t) as u64;
        let out = graph.score(ids.view(), mask.view(), k as i64)?;
        for (row, &si) in batch.iter().enumerate() {
            each(si, &out, row);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_the_budget_and_cover_every_sequence() {
        let lengths = [5, 100, 7, 6, 98, 3, 300];
        let batches = bucket_batches(&lengths, 200);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 200, "{b:?}");
        }
        // Similar lengths share batches: the two ~100-token sequences go together.
        assert!(batches.iter().any(|b| b.contains(&1) && b.contains(&4)));
    }
}
