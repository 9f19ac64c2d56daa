//! Each pair's chosen and rejected rows as one packed row, their common prefix once: the extra
//! inputs of a joint or scoring graph that shares the prefix (`edpo_export
//! --train-shared-prefix on`, `--scoring-shared-prefix on`; the same layout as `pack_pairs` in
//! python/edpo_export/objective.py, checked by `edpo verify`).
//!
//! Pair i of a micro-batch is rows i (chosen) and B + i (rejected), padded on the right. Its
//! packed row holds the two rows' common prefix (the longest run of equal tokens from the
//! start, within both rows' real tokens: the prompt at least), then the rest of the chosen row,
//! then the rest of the rejected row, then padding. The transformer body runs on the packed rows,
//! so a prompt's tokens are computed once instead of twice; in the graph, rejected tokens do not
//! attend to chosen ones, so every token sees exactly the tokens before it in its own row.

use ndarray::{Array1, Array2, ArrayD, ArrayView2};

/// The joint graph's packed inputs, in `PackedPairs::into_named` order.
pub const INPUTS: [&str; 4] = [
    "packed_ids",
    "packed_positions",
    "packed_branch",
    "hidden_at",
];

/// `packed_branch` of a prefix token (attended to by both rows' rest).
pub const PREFIX: i64 = 0;
/// `packed_branch` of the chosen row's tokens after the prefix.
pub const CHOSEN: i64 = 1;
/// `packed_branch` of the rejected row's tokens after the prefix (they skip CHOSEN keys).
pub const REJECTED: i64 = 2;
/// `packed_branch` of padding.
pub const PADDING: i64 = -1;

/// The joint graph's packed inputs for one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedPairs {
    /// [B, S] token ids of the packed rows (0 at padding).
    pub ids: Array2<i64>,
    /// [B, S] each token's position in its own row (the rotary's; 0 at padding).
    pub positions: Array2<i64>,
    /// [B, S] PREFIX, CHOSEN, REJECTED or PADDING.
    pub branch: Array2<i64>,
    /// [M] per label position r·T + t: the flat index b·S + s of the packed token holding row
    /// r's token t − 1, whose final state predicts token t.
    pub hidden_at: Array1<i64>,
}

impl PackedPairs {
    /// The four arrays by their graph input names (`INPUTS`).
    pub fn into_named(self) -> [(&'static str, ArrayD<i64>); 4] {
        let [ids, positions, branch, hidden_at] = INPUTS;
        [
            (ids, self.ids.into_dyn()),
            (positions, self.positions.into_dyn()),
            (branch, self.branch.into_dyn()),
            (hidden_at, self.hidden_at.into_dyn()),
        ]
    }
}

/// One pair's packed row: the common prefix's length and the two rows' real lengths.
#[derive(Debug, Clone, Copy)]
struct PairLayout {
    shared: usize,
    chosen: usize,
    rejected: usize,
}

impl PairLayout {
    fn of(ids: ArrayView2<i64>, mask: ArrayView2<i64>, pair: usize, pairs: usize) -> Self {
        let real = |row: usize| match row < mask.nrows() {
            true => mask.row(row).iter().filter(|&&m| m != 0).count(),
            false => 0, // the partner of an odd row count's last chosen row
        };
        let (chosen, rejected) = (real(pair), real(pairs + pair));
        let shared = (0..chosen.min(rejected))
            .take_while(|&t| ids[[pair, t]] == ids[[pairs + pair, t]])
            .count();
        PairLayout {
            shared,
            chosen,
            rejected,
        }
    }

    fn packed_len(&self) -> usize {
        self.chosen + self.rejected - self.shared
    }

    /// The packed slot of row token `t` of the chosen (`rejected` false) or rejected row.
    fn slot(&self, t: usize, rejected: bool) -> usize {
        if rejected && t >= self.shared {
            t + self.chosen - self.shared
        } else {
            t
        }
    }
}

/// Packs the right-padded rows `input_ids` / `attention_mask` ([2·B, T]) for the label
/// positions `label_positions` (flat r·T + t, t ≥ 1, at real tokens, as `graphs::label_positions`
/// lists them). An odd number of rows (the scoring graph scores any rows) packs the last chosen
/// row alone, as if its rejected row were empty.
pub fn pack_pairs(
    input_ids: ArrayView2<i64>,
    attention_mask: ArrayView2<i64>,
    label_positions: &[i64],
) -> PackedPairs {
    let (n, t) = input_ids.dim();
    let pairs = n.div_ceil(2);
    let layouts: Vec<PairLayout> = (0..pairs)
        .map(|i| PairLayout::of(input_ids, attention_mask, i, pairs))
        .collect();
    let width = layouts
        .iter()
        .map(PairLayout::packed_len)
        .max()
        .unwrap_or(0);
    let mut ids = Array2::zeros((pairs, width));
    let mut positions = Array2::zeros((pairs, width));
    let mut branch = Array2::from_elem((pairs, width), PADDING);
    for (i, layout) in layouts.iter().enumerate() {
        for (rejected, row, len) in [
            (false, i, layout.chosen),
            (true, pairs + i, layout.rejected),
        ] {
            let start = if rejected { layout.shared } else { 0 };
            for u in start..len {
                let slot = layout.slot(u, rejected);
                ids[[i, slot]] = input_ids[[row, u]];
                positions[[i, slot]] = u as i64;
                branch[[i, slot]] = match (u < layout.shared, rejected) {
                    (true, _) => PREFIX,
                    (false, false) => CHOSEN,
                    (false, true) => REJECTED,
                };
            }
        }
    }
    let hidden_at = label_positions
        .iter()
        .map(|&pos| {
            let (row, u) = (pos as usize / t, pos as usize % t);
            let (pair, rejected) = (row % pairs, row >= pairs);
            (pair * width + layouts[pair].slot(u - 1, rejected)) as i64
        })
        .collect();
    PackedPairs {
        ids,
        positions,
        branch,
        hidden_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// Two pairs: the first's rows share 3 tokens (a prompt and the responses' first token);
    /// the second's rejected row equals its chosen one.
    fn batch() -> (Array2<i64>, Array2<i64>) {
        let ids = array![
            [5, 6, 7, 8, 9, 0],
            [1, 2, 3, 0, 0, 0],
            [5, 6, 7, 4, 3, 0],
            [1, 2, 3, 0, 0, 0],
        ];
        let mask = ids.mapv(|x| i64::from(x != 0));
        (ids, mask)
    }

    #[test]
    fn the_common_prefix_is_packed_once_then_each_rows_rest() {
        let (ids, mask) = batch();
        let packed = pack_pairs(ids.view(), mask.view(), &[]);
        assert_eq!(
            packed.ids,
            array![[5, 6, 7, 8, 9, 4, 3], [1, 2, 3, 0, 0, 0, 0]]
        );
        assert_eq!(
            packed.positions,
            array![[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 0, 0, 0, 0]]
        );
        assert_eq!(
            packed.branch,
            array![[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, -1, -1, -1, -1]]
        );
    }

    #[test]
    fn each_label_reads_the_packed_state_of_its_rows_previous_token() {
        let (ids, mask) = batch();
        let t = 6;
        // Chosen row 0: token 3 ← its token 2 (slot 2), token 4 ← token 3 (slot 3). Rejected
        // row 2: token 3 ← token 2 (shared, slot 2), token 4 ← token 3 (its first own token,
        // slot 5). Rejected row 3 (pair 1): token 2 ← token 1 (slot 1 of packed row 1: 7 + 1).
        let labels = [3, 4, 2 * t + 3, 2 * t + 4, 3 * t + 2];
        let packed = pack_pairs(ids.view(), mask.view(), &labels.map(|p| p as i64));
        assert_eq!(packed.hidden_at, array![2, 3, 2, 5, 8]);
    }

    #[test]
    fn rows_without_a_common_prefix_are_packed_one_after_the_other() {
        let ids = array![[1, 2, 0], [3, 4, 5]];
        let mask = ids.mapv(|x| i64::from(x != 0));
        let packed = pack_pairs(ids.view(), mask.view(), &[1, 3 + 1]);
        assert_eq!(packed.ids, array![[1, 2, 3, 4, 5]]);
        assert_eq!(packed.positions, array![[0, 1, 0, 1, 2]]);
        assert_eq!(packed.branch, array![[1, 1, 2, 2, 2]]);
        assert_eq!(packed.hidden_at, array![0, 2]);
    }

    #[test]
    fn an_odd_row_is_packed_alone() {
        let ids = array![[1, 2, 0], [1, 2, 3], [1, 4, 0]];
        let mask = ids.mapv(|x| i64::from(x != 0));
        // Rows 0 and 2 are a pair (shared token 1); row 1 has no partner.
        let packed = pack_pairs(ids.view(), mask.view(), &[1, 3 + 2, 2 * 3 + 1]);
        assert_eq!(packed.ids, array![[1, 2, 4], [1, 2, 3]]);
        assert_eq!(packed.branch, array![[0, 1, 2], [1, 1, 1]]);
        assert_eq!(packed.hidden_at, array![0, 3 + 1, 0]);
    }
}
