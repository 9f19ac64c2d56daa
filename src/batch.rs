//! The batch layout shared by prep, eval and train: which row holds which response, how rows
//! are padded, how sequences are grouped by length, and the joint graph's micro-batches.
//!
//! Row order: for B pairs, rows 0..B are the chosen responses of pairs 0..B and rows B..2B
//! their rejected responses (the joint graph's contract, objective.md). Every sequence is the
//! pair's prompt followed by one response, right-padded with the pad id.

use ndarray::{Array1, Array2, Array3};

use crate::data::tokenize::TokenizedPair;
use crate::data::Side;
use crate::graphs::{ScoreOutputs, TrainBatch};
use crate::runtime::Device;
use crate::shards::ScoredPair;

/// The row of `side` of pair `pair` among the rows of `pairs` pairs.
pub fn row_of(pair: usize, side: Side, pairs: usize) -> usize {
    match side {
        Side::Chosen => pair,
        Side::Rejected => pairs + pair,
    }
}

/// Which pair and side row `row` holds among the rows of `pairs` pairs.
pub fn pair_of_row(row: usize, pairs: usize) -> (usize, Side) {
    if row < pairs {
        (row, Side::Chosen)
    } else {
        (row - pairs, Side::Rejected)
    }
}

/// One row's tokens: the prompt, then the response.
#[derive(Debug, Clone, Copy)]
pub struct RowTokens<'a> {
    pub prompt: &'a [u32],
    pub response: &'a [u32],
}

impl RowTokens<'_> {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.response.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The 2B rows of B pairs, in the layout's order.
pub fn pair_rows<'a>(pairs: &[&'a TokenizedPair]) -> Vec<RowTokens<'a>> {
    Side::BOTH
        .into_iter()
        .flat_map(|side| {
            pairs.iter().map(move |p| RowTokens {
                prompt: &p.prompt_ids,
                response: p.response(side),
            })
        })
        .collect()
}

/// Right-padded token tensors of some rows.
#[derive(Debug, Clone)]
pub struct PaddedRows {
    pub input_ids: Array2<i64>,
    /// 1 on tokens, 0 on padding.
    pub attention_mask: Array2<i64>,
    /// 1 on response tokens only.
    pub loss_mask: Array2<i64>,
    /// (prompt length, prompt + response length) per row.
    pub spans: Vec<(usize, usize)>,
}

/// Pads `rows` to the longest row (at least `min_len` positions) with `pad_id`.
pub fn pad_rows(rows: &[RowTokens], pad_id: u32, min_len: usize) -> PaddedRows {
    let t = rows
        .iter()
        .map(RowTokens::len)
        .max()
        .unwrap_or(0)
        .max(min_len);
    let n = rows.len();
    let mut input_ids = Array2::<i64>::from_elem((n, t), i64::from(pad_id));
    let mut attention_mask = Array2::<i64>::zeros((n, t));
    let mut loss_mask = Array2::<i64>::zeros((n, t));
    let mut spans = Vec::with_capacity(n);
    for (r, row) in rows.iter().enumerate() {
        for (j, &tok) in row.prompt.iter().chain(row.response).enumerate() {
            input_ids[[r, j]] = i64::from(tok);
            attention_mask[[r, j]] = 1;
            if j >= row.prompt.len() {
                loss_mask[[r, j]] = 1;
            }
        }
        spans.push((row.prompt.len(), row.len()));
    }
    PaddedRows {
        input_ids,
        attention_mask,
        loss_mask,
        spans,
    }
}

/// The token budget of one scoring batch (prep's and eval's `--batch-tokens`) when none is
/// given. On CPU a small one: a batch's activations then stay in the CPU's caches (SmolLM2's
/// prep on a 2-core AMD EPYC: 1.15–1.3× faster at 1,024 tokens than at 8,192, at 0.55× the
/// memory; README, "Prep's token budget"); on CUDA a large one keeps the device busy.
pub fn default_batch_tokens(device: Device) -> usize {
    match device {
        Device::Cpu => 1024,
        Device::Cuda(_) => 8192,
    }
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

/// The joint graph needs at least two positions (one predicted token).
const MIN_TRAIN_LEN: usize = 2;

/// A micro-batch for the joint graph with the cached reference (the shards' top-K); the
/// cached values of `topk` ids per token are used (the shards may hold more).
pub fn cached_batch(pairs: &[ScoredPair], pad_id: u32, topk: usize) -> TrainBatch {
    let tokenized: Vec<&TokenizedPair> = pairs.iter().map(|p| &p.pair).collect();
    let padded = pad_rows(&pair_rows(&tokenized), pad_id, MIN_TRAIN_LEN);
    let (n, t) = padded.input_ids.dim();
    let mut ref_logps = Array1::<f32>::zeros(n);
    let mut ref_token_logps = Array2::<f32>::zeros((n, t));
    let mut ref_topk_ids = Array3::<i64>::zeros((n, t, topk));
    let mut ref_topk_logps = Array3::<f32>::zeros((n, t, topk));
    for (row, &(start, end)) in padded.spans.iter().enumerate() {
        let (index, side) = pair_of_row(row, pairs.len());
        let pair = &pairs[index];
        let scores = pair.scores(side);
        ref_logps[row] = scores.logps;
        let used = pair.topk.min(topk);
        for (j, pos) in (start..end).enumerate() {
            ref_token_logps[[row, pos]] = scores.token_logps[j];
            for c in 0..used {
                ref_topk_ids[[row, pos, c]] = i64::from(scores.topk_ids[j * pair.topk + c]);
                ref_topk_logps[[row, pos, c]] = scores.topk_logps[j * pair.topk + c];
            }
        }
    }
    TrainBatch {
        input_ids: padded.input_ids,
        attention_mask: padded.attention_mask,
        loss_mask: padded.loss_mask,
        ref_logps,
        ref_token_logps,
        ref_topk_ids,
        ref_topk_logps,
    }
}

/// The padded rows of a micro-batch whose reference is scored online.
pub fn online_rows(pairs: &[ScoredPair], pad_id: u32) -> PaddedRows {
    let tokenized: Vec<&TokenizedPair> = pairs.iter().map(|p| &p.pair).collect();
    pad_rows(&pair_rows(&tokenized), pad_id, MIN_TRAIN_LEN)
}

/// A micro-batch with the reference scored online (the scoring graph's outputs for `rows`).
pub fn online_batch(rows: PaddedRows, scores: ScoreOutputs) -> TrainBatch {
    let n = rows.input_ids.nrows();
    let mut ref_logps = Array1::<f32>::zeros(n);
    for (row, &(start, end)) in rows.spans.iter().enumerate() {
        ref_logps[row] = (start..end)
            .map(|t| f64::from(scores.token_logps[[row, t]]))
            .sum::<f64>() as f32;
    }
    TrainBatch {
        input_ids: rows.input_ids,
        attention_mask: rows.attention_mask,
        loss_mask: rows.loss_mask,
        ref_logps,
        ref_token_logps: scores.token_logps,
        ref_topk_ids: scores.topk_ids,
        ref_topk_logps: scores.topk_logps,
    }
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

    #[test]
    fn rows_are_chosen_then_rejected_and_padded_on_the_right() {
        let pair =
            |id: u64, prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32>| TokenizedPair {
                pair_id: id,
                source_row: id,
                prompt_ids: prompt,
                chosen_ids: chosen,
                rejected_ids: rejected,
                prompt_truncated: false,
                response_truncated: false,
            };
        let a = pair(0, vec![1, 2], vec![3], vec![4, 5]);
        let b = pair(1, vec![6], vec![7, 8, 9], vec![10]);
        let rows = pair_rows(&[&a, &b]);
        let padded = pad_rows(&rows, 0, 2);
        assert_eq!(padded.input_ids.dim(), (4, 4));
        assert_eq!(padded.input_ids.row(0).to_vec(), vec![1, 2, 3, 0]);
        assert_eq!(padded.input_ids.row(1).to_vec(), vec![6, 7, 8, 9]);
        assert_eq!(padded.input_ids.row(2).to_vec(), vec![1, 2, 4, 5]);
        assert_eq!(padded.loss_mask.row(2).to_vec(), vec![0, 0, 1, 1]);
        assert_eq!(padded.attention_mask.row(3).to_vec(), vec![1, 1, 0, 0]);
        assert_eq!(padded.spans[3], (1, 2));
        for row in 0..4 {
            let (p, side) = pair_of_row(row, 2);
            assert_eq!(row_of(p, side, 2), row);
        }
    }
}
