//! Pair ids of input rows, read without reading the rows: what a prep worker needs of the rows
//! other workers score to apply the duplicate-id rule as one process would.
//!
//! Per format: a Parquet file's id column alone (projection and row selection; a file without
//! it needs only its footer's row count, as ids then come from file name and row); a JSONL
//! line's id field alone (the rest of the line is skipped by the JSON lexer, not built into
//! values); an Arrow stream's id column alone (every batch is still read: a stream has no
//! index). The ids are exactly [`pair_id`] of what a full read would give.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::Path;

use parquet::arrow::ProjectionMask;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::pairs::pair_id;
use super::source::{
    batch_to_rows, blank_line, parquet_builder, parquet_selection, parse_jsonl_line, FileKind,
    SourceFile,
};
use super::DataError;

/// Calls `visit(row, pair_id)` for every input row whose index (in the whole input, all files
/// in order) lies in `ranges` (sorted, disjoint), reading as little of the input as its
/// format allows; stops after the last range.
pub fn scan_ids(
    files: &[SourceFile],
    id_column: &str,
    ranges: &[Range<u64>],
    mut visit: impl FnMut(u64, u64),
) -> Result<(), DataError> {
    let Some(last) = ranges.last().map(|r| r.end) else {
        return Ok(());
    };
    let mut base = 0u64;
    for file in files {
        if base >= last {
            break;
        }
        let mut at = |file_row: u64, id: u64| visit(base + file_row, id);
        let rows = match file.kind {
            FileKind::Parquet => parquet_ids(file, id_column, base, ranges, &mut at)?,
            FileKind::Jsonl => jsonl_ids(file, id_column, base, ranges, &mut at)?,
            FileKind::Arrow => arrow_ids(file, id_column, base, ranges, &mut at)?,
        };
        base += rows;
    }
    Ok(())
}

/// The parts of `ranges` inside rows [base, base + rows), as rows of that file.
fn local_ranges(ranges: &[Range<u64>], base: u64, rows: u64) -> Vec<Range<u64>> {
    ranges
        .iter()
        .filter_map(|r| {
            let (start, end) = (r.start.max(base), r.end.min(base + rows));
            (start < end).then(|| start - base..end - base)
        })
        .collect()
}

/// Whether file row `row` is in `ranges` (file rows, sorted), moving the cursor `next` along.
fn wanted(ranges: &[Range<u64>], next: &mut usize, row: u64) -> bool {
    while *next < ranges.len() && ranges[*next].end <= row {
        *next += 1;
    }
    ranges.get(*next).is_some_and(|r| r.contains(&row))
}

fn parquet_ids(
    file: &SourceFile,
    id_column: &str,
    base: u64,
    ranges: &[Range<u64>],
    visit: &mut impl FnMut(u64, u64),
) -> Result<u64, DataError> {
    let (builder, rows) = parquet_builder(file)?;
    let local = local_ranges(ranges, base, rows);
    let column = builder
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == id_column);
    let Some(column) = column.filter(|_| !local.is_empty()) else {
        // No id column: ids come from the file name and the row, no reading needed.
        for row in local.iter().flat_map(Clone::clone) {
            visit(row, pair_id(None, &file.path, row));
        }
        return Ok(rows);
    };
    let (groups, selection) = parquet_selection(builder.metadata(), &local);
    let mask = ProjectionMask::roots(builder.parquet_schema(), [column]);
    let batches = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_row_selection(selection)
        .with_batch_size(8192)
        .build()
        .map_err(|e| bad_parquet(file, e.to_string()))?;
    let mut selected = local.iter().flat_map(Clone::clone);
    for batch in batches {
        let batch = batch.map_err(|e| bad_parquet(file, e.to_string()))?;
        for fields in batch_to_rows(&batch, &file.path)? {
            let row = selected.next().expect("one selected row per row read");
            visit(row, pair_id(fields.get(id_column), &file.path, row));
        }
    }
    Ok(rows)
}

fn bad_parquet(file: &SourceFile, message: String) -> DataError {
    DataError::BadParquet {
        path: file.path.clone(),
        message,
    }
}

fn jsonl_ids(
    file: &SourceFile,
    id_column: &str,
    base: u64,
    ranges: &[Range<u64>],
    visit: &mut impl FnMut(u64, u64),
) -> Result<u64, DataError> {
    let io = |source| DataError::Io {
        path: file.path.clone(),
        source,
    };
    if file.bytes == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    let local = local_ranges(ranges, base, u64::MAX - base);
    let end = local.last().map_or(0, |r| r.end);
    let mut reader = BufReader::with_capacity(1 << 16, File::open(&file.path).map_err(io)?);
    let (mut buf, mut line, mut row, mut next) = (Vec::new(), 0u64, 0u64, 0usize);
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            break;
        }
        line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if blank_line(&buf) {
            continue;
        }
        if wanted(&local, &mut next, row) {
            let id = skim_id(&buf, id_column, &file.path, line)?;
            visit(row, pair_id(id.as_ref(), &file.path, row));
        } else if row >= end {
            // Past the last row wanted (of every file: `local` ends where `ranges` end).
            return Ok(row);
        }
        row += 1;
    }
    if row == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    Ok(row)
}

/// The id field of a JSONL line (None when absent): the line is lexed but only that field is
/// built into a value. A line that does not lex gets the error a full read gives.
fn skim_id(
    bytes: &[u8],
    id_column: &str,
    path: &Path,
    line: u64,
) -> Result<Option<Value>, DataError> {
    let skimmed = std::str::from_utf8(bytes).ok().and_then(|text| {
        let mut de = serde_json::Deserializer::from_str(text.trim());
        let id = IdField(id_column).deserialize(&mut de).ok()?;
        de.end().ok().map(|()| id)
    });
    if let Some(id) = skimmed {
        return Ok(id);
    }
    // Not UTF-8, not JSON or not an object: the full read's error (or its value, should
    // the skim have refused something the full read accepts).
    let fields = parse_jsonl_line(bytes, path, line)?;
    Ok(fields.and_then(|mut f| f.remove(id_column)))
}

/// Deserialises a JSON object's field `.0` (the last one, as a map keeps it), ignoring the rest.
struct IdField<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for IdField<'_> {
    type Value = Option<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for IdField<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        while let Some(is_id) = map.next_key_seed(KeyIs(self.0))? {
            if is_id {
                id = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(id)
    }
}

/// Whether a key is `.0`, without allocating it.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

fn arrow_ids(
    file: &SourceFile,
    id_column: &str,
    base: u64,
    ranges: &[Range<u64>],
    visit: &mut impl FnMut(u64, u64),
) -> Result<u64, DataError> {
    let bad = |message: String| DataError::BadArrow {
        path: file.path.clone(),
        message,
    };
    let open = |projection: Option<Vec<usize>>| {
        let handle = File::open(&file.path).map_err(|source| DataError::Io {
            path: file.path.clone(),
            source,
        })?;
        arrow::ipc::reader::StreamReader::try_new(BufReader::new(handle), projection)
            .map_err(|e| bad(e.to_string()))
    };
    if file.bytes == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    let column = open(None)?
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == id_column);
    // Without an id column any one column gives the row counts.
    let local = local_ranges(ranges, base, u64::MAX - base);
    let (mut row, mut next) = (0u64, 0usize);
    for batch in open(Some(vec![column.unwrap_or(0)]))? {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let n = batch.num_rows() as u64;
        let first = row;
        row += n;
        if local.last().is_none_or(|r| first >= r.end) {
            // Past the last row wanted, of every file.
            break;
        }
        if !local.iter().any(|r| r.start < row && r.end > first) {
            continue;
        }
        let fields = match column {
            Some(_) => batch_to_rows(&batch, &file.path)?,
            None => Vec::new(),
        };
        for i in 0..n {
            if wanted(&local, &mut next, first + i) {
                let value = fields.get(i as usize).and_then(|f| f.get(id_column));
                visit(first + i, pair_id(value, &file.path, first + i));
            }
        }
    }
    if row == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    Ok(row)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one range is a list of ranges here
mod tests {
    use super::*;
    use crate::data::source::{resolve, tests::mixed_inputs, RowStream};

    /// What a full read says: pair ids of the rows in `ranges`.
    fn full_read(files: &[SourceFile], column: &str, ranges: &[Range<u64>]) -> Vec<(u64, u64)> {
        let mut stream = RowStream::new(files.to_vec());
        let mut out = Vec::new();
        let mut row = 0u64;
        while let Some(r) = stream.next_row().unwrap() {
            if ranges.iter().any(|x| x.contains(&row)) {
                let path = &files[r.file_index].path;
                out.push((row, pair_id(r.fields.get(column), path, r.file_row)));
            }
            row += 1;
        }
        out
    }

    fn scanned(files: &[SourceFile], column: &str, ranges: &[Range<u64>]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        scan_ids(files, column, ranges, |row, id| out.push((row, id))).unwrap();
        out
    }

    #[test]
    fn scanned_ids_equal_a_full_read_s_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let files = mixed_inputs(dir.path());
        let range_sets: [&[Range<u64>]; 4] = [
            &[0..77],
            &[3..9, 20..25, 30..31, 50..60, 70..77],
            &[22..23, 23..24, 52..54],
            &[60..61],
        ];
        for ranges in range_sets {
            for column in ["id", "text", "absent"] {
                let want = full_read(&files, column, ranges);
                assert_eq!(scanned(&files, column, ranges), want, "{column} {ranges:?}");
            }
        }
    }

    #[test]
    fn jsonl_ids_follow_json_not_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"id": "a", "prompt": "x"}"#,
            r#"{"\u0069d": "escaped key", "p": 1}"#,
            r#"{"id": 1, "id": 2}"#,
            r#"{"p": {"id": "nested, not the row's"}}"#,
            r#"{"id": 1.50, "p": [1, {"id": 3}]}"#,
            r#"{"id": null}"#,
            r#"{"id": {"b": [1, 2]}, "text": "\"id\": \"fake\""}"#,
        ];
        std::fs::write(dir.path().join("x.jsonl"), lines.join("\n")).unwrap();
        let files = resolve(&[dir.path().join("x.jsonl")]).unwrap();
        let ranges = [0..lines.len() as u64];
        assert_eq!(
            scanned(&files, "id", &ranges),
            full_read(&files, "id", &ranges)
        );
    }

    #[test]
    fn a_bad_line_gets_the_full_read_s_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.jsonl"), "{\"id\": 1}\n[1, 2]\n").unwrap();
        let files = resolve(&[dir.path().join("x.jsonl")]).unwrap();
        let err = scan_ids(&files, "id", &[0..2], |_, _| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2: invalid JSON (the line is not a JSON object)"),
            "{err}"
        );
    }
}
