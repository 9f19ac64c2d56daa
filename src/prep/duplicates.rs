//! The duplicate-id rule when a process reads only some shards: a row whose pair id repeats an
//! earlier row's (an earlier row that parsed into a pair) is skipped as `duplicate_id`, as in one
//! process reading everything.
//!
//! The rows this process reads give their own ids. Of the rows it does not read (other
//! workers' shards, complete shards) it needs only those before its last row, and of those only
//! the pair ids ([`scan_ids`]: an id column or field alone, or nothing at all when ids come from
//! file name and row). Rows whose id one of its own later rows repeats are candidates; only
//! they are parsed in full, since a row that is skipped for another reason does not count.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use crate::data::ids::scan_ids;
use crate::data::pairs::{RowOutcome, RowParser};
use crate::data::source::{RowStream, SourceFile};
use crate::Error;

/// Pair ids of rows that this process does not read and that parsed into pairs, each with its
/// first such row: the part of the rule that lies outside its own rows.
#[derive(Debug, Default)]
pub(super) struct EarlierPairs(HashMap<u64, u64>);

impl EarlierPairs {
    /// Whether a pair with id `id` at input row `row` repeats such a row before it.
    pub(super) fn repeats(&self, id: u64, row: u64) -> bool {
        self.0.get(&id).is_some_and(|&first| first < row)
    }
}

/// What the pass found and what it cost.
#[derive(Debug, Default)]
pub(super) struct DuplicatePass {
    pub earlier: EarlierPairs,
    /// Rows of others whose pair id was read.
    pub rows_scanned: u64,
    /// Of those, rows parsed in full because an own later row repeats their id.
    pub candidates: u64,
    pub seconds: f64,
}

/// The rows of `[0, end)` outside `own` (sorted, disjoint).
fn others_before(own: &[Range<u64>], end: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in own {
        if r.start > at {
            out.push(at..r.start.min(end));
        }
        at = at.max(r.end);
    }
    out.retain(|r| r.start < r.end);
    out
}

/// The pairs among the rows outside `own` (the row ranges this process reads) that rows in
/// `own_ids` ((row, pair id) of its rows that parsed into pairs) would repeat.
pub(super) fn earlier_pairs(
    files: &[SourceFile],
    parser: &RowParser<'_>,
    own: &[Range<u64>],
    own_ids: &[(u64, u64)],
) -> Result<DuplicatePass, Error> {
    let started = Instant::now();
    let mut last_own: HashMap<u64, u64> = HashMap::with_capacity(own_ids.len());
    for &(row, id) in own_ids {
        let last = last_own.entry(id).or_insert(row);
        *last = (*last).max(row);
    }
    let end = own_ids.iter().map(|&(row, _)| row + 1).max().unwrap_or(0);
    let others = others_before(own, end);
    let (mut rows_scanned, mut candidates) = (0u64, Vec::new());
    scan_ids(files, &parser.columns.id, &others, |row, id| {
        rows_scanned += 1;
        if last_own.get(&id).is_some_and(|&last| row < last) {
            candidates.push(row);
        }
    })?;
    tracing::debug!(?candidates, "rows whose ids rows read here repeat");
    let earlier = parse_candidates(files, parser, &candidates)?;
    Ok(DuplicatePass {
        earlier,
        rows_scanned,
        candidates: candidates.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Parses rows `rows` (sorted input rows) in full; those that are pairs, by id.
fn parse_candidates(
    files: &[SourceFile],
    parser: &RowParser<'_>,
    rows: &[u64],
) -> Result<EarlierPairs, Error> {
    let mut earlier = HashMap::new();
    let mut stream = RowStream::new(files.to_vec());
    let mut at = 0u64;
    for &row in rows {
        at += stream.skip_rows(row - at)?;
        let Some(read) = stream.next_row()? else {
            break;
        };
        at += 1;
        let path = &files[read.file_index].path;
        if let RowOutcome::Pair(pair) = parser.parse(&read, path, row)? {
            earlier.entry(pair.pair_id).or_insert(row);
        }
    }
    Ok(EarlierPairs(earlier))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_rows_are_the_gaps_before_the_last_own_row() {
        assert_eq!(others_before(&[0..10, 30..40], 35), vec![10..30]);
        assert_eq!(others_before(&[5..10, 20..30], 25), vec![0..5, 10..20]);
        assert_eq!(
            others_before(&[0..10, 10..20], 20),
            Vec::<Range<u64>>::new()
        );
        assert_eq!(others_before(&[], 0), Vec::<Range<u64>>::new());
    }
}
