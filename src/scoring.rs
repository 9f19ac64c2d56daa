//! Scoring many pairs with the scoring graph: their rows (batch layout) grouped into
//! length-bucketed batches under a token budget, padded, run, and handed back row by row
//! (shared by `edpo prep` and `edpo eval`).

use crate::batch::{bucket_batches, pad_rows, pair_rows, RowTokens};
use crate::data::tokenize::TokenizedPair;
use crate::graphs::{ReferenceGraph, ScoreOutputs};

/// Padding statistics of a set of batches.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub sequence_tokens: u64,
    pub padded_tokens: u64,
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
    let rows = pair_rows(pairs);
    let lengths: Vec<usize> = rows.iter().map(RowTokens::len).collect();
    let mut stats = BatchStats::default();
    for batch in bucket_batches(&lengths, batch_tokens) {
        let batch_rows: Vec<RowTokens> = batch.iter().map(|&i| rows[i]).collect();
        let padded = pad_rows(&batch_rows, pad_id, 0);
        stats.sequence_tokens += batch.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        stats.padded_tokens += padded.input_ids.len() as u64;
        let out = graph.score(
            padded.input_ids.view(),
            padded.attention_mask.view(),
            Some(padded.loss_mask.view()),
            topk as i64,
        )?;
        for (r, &row) in batch.iter().enumerate() {
            each(row, &out, r);
        }
    }
    Ok(stats)
}
