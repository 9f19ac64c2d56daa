//! Scoring many pairs with the scoring graph: their rows (batch layout) grouped into
//! length-bucketed batches under a token budget, padded, run, and handed back row by row
//! (shared by `edpo prep` and `edpo eval`). A graph that shares each pair's prefix is given
//! whole pairs, bucketed by their packed length.

use crate::batch::{bucket_batches, pad_rows, pair_of_row, pair_rows, row_of, RowTokens};
use crate::data::tokenize::TokenizedPair;
use crate::graphs::{GraphError, ReferenceGraph, ScoreOutputs};

/// Token statistics of a set of batches.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    /// The rows' tokens (both rows of a pair in full), padding excluded.
    pub sequence_tokens: u64,
    /// The tokens the graph ran, padding included.
    pub padded_tokens: u64,
    /// Tokens of the common prefixes that a pair's two rows ran once (graphs that share it).
    pub shared_tokens: u64,
}

/// Scores every row of `pairs` (prompt + chosen, prompt + rejected, in the batch layout's
/// order) with top-`topk` outputs; calls `each(row, outputs, r)` once per row with the batch
/// outputs and the row's index `r` in them. Only the row's response positions are scored: with
/// a sliced scoring graph the prompt and padding positions hold zeros.
pub fn score_pair_rows(
    graph: &mut ReferenceGraph,
    pairs: &[&TokenizedPair],
    topk: usize,
    batch_tokens: usize,
    pad_id: u32,
    mut each: impl FnMut(usize, &ScoreOutputs, usize),
) -> Result<BatchStats, crate::Error> {
    if graph.shares_prefix() {
        return score_packed_pairs(graph, pairs, topk, batch_tokens, pad_id, each);
    }
    let rows = pair_rows(pairs);
    let lengths: Vec<usize> = rows.iter().map(RowTokens::len).collect();
    let mut stats = BatchStats::default();
    for batch in bucket_batches(&lengths, batch_tokens) {
        let batch_rows: Vec<RowTokens> = batch.iter().map(|&i| rows[i]).collect();
        stats.sequence_tokens += batch.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        let longest = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        stats.padded_tokens += (batch.len() * longest) as u64;
        let out = score_rows(graph, &batch_rows, topk, pad_id)?;
        for (r, &row) in batch.iter().enumerate() {
            each(row, &out, r);
        }
    }
    Ok(stats)
}

/// One batch: `rows` right-padded to the longest and scored, the outputs in the rows' order.
fn score_rows(
    graph: &mut ReferenceGraph,
    rows: &[RowTokens],
    topk: usize,
    pad_id: u32,
) -> Result<ScoreOutputs, GraphError> {
    let padded = pad_rows(rows, pad_id, 0);
    graph.score(
        padded.input_ids.view(),
        padded.attention_mask.view(),
        Some(padded.loss_mask.view()),
        topk as i64,
    )
}

/// The tokens of a pair's two rows and of its packed row (their common prefix once).
fn packed_tokens(pair: &TokenizedPair) -> (usize, usize) {
    let (chosen, rejected) = (&pair.chosen_ids, &pair.rejected_ids);
    let common = chosen
        .iter()
        .zip(rejected)
        .take_while(|(a, b)| a == b)
        .count();
    let rows = 2 * pair.prompt_ids.len() + chosen.len() + rejected.len();
    (rows, rows - pair.prompt_ids.len() - common)
}

/// `score_pair_rows` for a graph that shares each pair's prefix: batches of whole pairs under
/// the token budget (pairs × longest packed row), each batch's rows in the batch layout.
fn score_packed_pairs(
    graph: &mut ReferenceGraph,
    pairs: &[&TokenizedPair],
    topk: usize,
    batch_tokens: usize,
    pad_id: u32,
    mut each: impl FnMut(usize, &ScoreOutputs, usize),
) -> Result<BatchStats, crate::Error> {
    let tokens: Vec<(usize, usize)> = pairs.iter().map(|p| packed_tokens(p)).collect();
    let packed: Vec<usize> = tokens.iter().map(|&(_, packed)| packed).collect();
    let mut stats = BatchStats::default();
    for batch in bucket_batches(&packed, batch_tokens) {
        let batch_pairs: Vec<&TokenizedPair> = batch.iter().map(|&i| pairs[i]).collect();
        for &i in &batch {
            stats.sequence_tokens += tokens[i].0 as u64;
            stats.shared_tokens += (tokens[i].0 - tokens[i].1) as u64;
        }
        let longest = batch.iter().map(|&i| packed[i]).max().unwrap_or(0);
        stats.padded_tokens += (batch.len() * longest) as u64;
        let out = score_rows(graph, &pair_rows(&batch_pairs), topk, pad_id)?;
        for r in 0..2 * batch.len() {
            let (local, side) = pair_of_row(r, batch.len());
            each(row_of(batch[local], side, pairs.len()), &out, r);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairs_packed_row_holds_its_prompt_and_common_start_once() {
        let pair = TokenizedPair {
            pair_id: 0,
            source_row: 0,
            prompt_ids: vec![1, 2, 3],
            chosen_ids: vec![4, 5, 6],
            rejected_ids: vec![4, 7],
            prompt_truncated: false,
            response_truncated: false,
        };
        // Rows: 6 + 5 tokens; packed: the prompt and token 4 once, then 5 6, then 7.
        assert_eq!(packed_tokens(&pair), (11, 7));
    }
}
