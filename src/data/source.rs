//! Input files: resolving `--data` paths (files, folders, globs) and streaming their rows as
//! JSON objects, one source at a time, with file and row positions for error messages; rows
//! another prep worker reads are skipped without being parsed.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use serde_json::{Map, Value};

use super::DataError;

/// The kinds of file prep reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Parquet,
    Jsonl,
    /// An Arrow IPC stream (`.arrow`), as Hugging Face `datasets` writes with `save_to_disk`.
    Arrow,
}

/// One resolved input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub kind: FileKind,
    pub bytes: u64,
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".arrow") {
        Some(FileKind::Arrow)
    } else {
        None
    }
}

fn source(path: PathBuf) -> Result<SourceFile, DataError> {
    let kind = kind_of(&path).ok_or_else(|| DataError::UnsupportedFile { path: path.clone() })?;
    let bytes = std::fs::metadata(&path)
        .map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    Ok(SourceFile { path, kind, bytes })
}

/// The data files of a folder that Hugging Face `datasets` wrote with `save_to_disk`
/// (`state.json` lists its `.arrow` files in order); None for other folders.
fn saved_dataset(dir: &Path) -> Result<Option<Vec<SourceFile>>, DataError> {
    if let Ok(text) = std::fs::read_to_string(dir.join("dataset_dict.json")) {
        let splits: Vec<String> = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("splits").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        return Err(DataError::DatasetDict {
            path: dir.to_path_buf(),
            example: dir.join(splits.first().map_or("train", String::as_str)),
            splits: splits.join(", "),
        });
    }
    let state_path = dir.join("state.json");
    let Ok(text) = std::fs::read_to_string(&state_path) else {
        return Ok(None);
    };
    let bad = |message: String| DataError::BadDatasetFolder {
        path: state_path.clone(),
        message,
    };
    let state: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let names: Vec<&str> = state
        .get("_data_files")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `_data_files` list".into()))?
        .iter()
        .map(|f| f.get("filename").and_then(Value::as_str))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a `_data_files` entry has no `filename`".into()))?;
    if names.is_empty() {
        return Err(bad("`_data_files` is empty".into()));
    }
    let files = names
        .into_iter()
        .map(|name| source(dir.join(name)))
        .collect::<Result<_, _>>()?;
    Ok(Some(files))
}

/// The input files of a folder: a `datasets` folder's Arrow files, else its Parquet, JSONL and
/// Arrow files sorted by name.
fn folder_sources(dir: &Path) -> Result<Vec<SourceFile>, DataError> {
    if let Some(files) = saved_dataset(dir)? {
        return Ok(files);
    }
    let mut inside: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && kind_of(p).is_some())
        .collect();
    inside.sort();
    if inside.is_empty() {
        return Err(DataError::EmptyFolder {
            path: dir.to_path_buf(),
        });
    }
    inside.into_iter().map(source).collect()
}

/// Resolves every `--data` argument, in order: a file, a folder (a `datasets` `save_to_disk`
/// folder, or its Parquet/JSONL/Arrow files sorted by name) or a glob pattern (matches sorted).
pub fn resolve(inputs: &[PathBuf]) -> Result<Vec<SourceFile>, DataError> {
    let mut files = Vec::new();
    for input in inputs {
        let text = input.to_string_lossy();
        if text.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(&text)
                .map_err(|e| DataError::BadGlob {
                    pattern: text.to_string(),
                    message: e.to_string(),
                })?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            matched.sort();
            if matched.is_empty() {
                return Err(DataError::NothingMatched {
                    pattern: text.to_string(),
                });
            }
            for p in matched {
                files.push(source(p)?);
            }
        } else if input.is_dir() {
            files.extend(folder_sources(input)?);
        } else if input.is_file() {
            files.push(source(input.clone())?);
        } else {
            return Err(DataError::NotFound {
                path: input.clone(),
            });
        }
    }
    Ok(files)
}

/// One input row as a JSON object, with where it came from.
#[derive(Debug, Clone)]
pub struct SourceRow {
    /// Index of the file in the resolved list.
    pub file_index: usize,
    /// 0-based row within the file (for JSONL: the data line, blank lines not counted).
    pub file_row: u64,
    /// 1-based line number in a JSONL file (None for Parquet).
    pub line: Option<u64>,
    pub fields: Map<String, Value>,
}

/// Streams rows from the resolved files in order, and skips rows cheaply: a Parquet file is
/// opened at the row wanted (its row groups before it are not read), a JSONL file's lines are
/// counted by a byte scan without parsing them, an Arrow stream's batches are decoded but not
/// turned into rows (an IPC stream has no index to seek with).
pub struct RowStream {
    files: Vec<SourceFile>,
    current: usize,
    reader: Option<FileRows>,
    /// The row of the current (Parquet) file where its next opening starts.
    start: u64,
    /// Rows the caller will read before it skips again (None: until the end): a Parquet file
    /// is opened for those rows only.
    window: Option<u64>,
    /// Row counts of Parquet files, read from their footers once.
    parquet_rows: Vec<Option<u64>>,
}

enum FileRows {
    Jsonl {
        reader: BufReader<File>,
        line: u64,
        row: u64,
    },
    /// Parquet or Arrow: record batches, turned into rows one batch at a time.
    Batches {
        kind: FileKind,
        batches: Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>,
        pending: std::vec::IntoIter<Map<String, Value>>,
        row: u64,
        /// Rows in the file (Parquet: from its footer; the opening may select fewer).
        total: Option<u64>,
    },
}

/// The error for a Parquet or Arrow file that cannot be read.
fn unreadable(kind: FileKind, path: &Path, message: String) -> DataError {
    let path = path.to_path_buf();
    match kind {
        FileKind::Arrow => DataError::BadArrow { path, message },
        _ => DataError::BadParquet { path, message },
    }
}

/// What reading a file gave.
enum Next {
    Row(SourceRow),
    /// Nothing yet (a blank line, a new Parquet batch): read again.
    Again,
    /// The file is done.
    End,
    /// A Parquet file's selected rows are done before the file: open it again at this row.
    Reopen(u64),
}

/// How far a skip inside one file went.
enum Skipped {
    /// All the rows asked for.
    Within(u64),
    /// This many, up to the end of the file.
    FileEnd(u64),
    /// This many; the (Parquet) file is to be opened again at row `at`.
    Reopen { skipped: u64, at: u64 },
}

impl FileRows {
    /// The next step through file `file_index` (at `path`).
    fn next(&mut self, file_index: usize, path: &Path) -> Result<Next, DataError> {
        match self {
            FileRows::Jsonl { reader, line, row } => {
                let mut bytes = Vec::new();
                let read = match reader.read_until(b'\n', &mut bytes) {
                    Ok(0) => None,
                    Ok(_) => {
                        if bytes.last() == Some(&b'\n') {
                            bytes.pop();
                        }
                        Some(Ok(bytes))
                    }
                    Err(e) => Some(Err(e)),
                };
                jsonl_next(read, file_index, path, line, row)
            }
            FileRows::Batches {
                kind,
                batches,
                pending,
                row,
                total,
            } => {
                if let Some(fields) = pending.next() {
                    let out = SourceRow {
                        file_index,
                        file_row: *row,
                        line: None,
                        fields,
                    };
                    *row += 1;
                    return Ok(Next::Row(out));
                }
                match batches.next() {
                    Some(Ok(batch)) => {
                        *pending = batch_to_rows(&batch, path)?.into_iter();
                        Ok(Next::Again)
                    }
                    Some(Err(e)) => Err(unreadable(*kind, path, e.to_string())),
                    None if *row == 0 => Err(DataError::EmptyFile {
                        path: path.to_path_buf(),
                    }),
                    None if total.is_some_and(|t| *row < t) => Ok(Next::Reopen(*row)),
                    None => Ok(Next::End),
                }
            }
        }
    }

    /// Skips up to `n` rows of this file without turning them into rows.
    fn skip(&mut self, n: u64, path: &Path) -> Result<Skipped, DataError> {
        match self {
            FileRows::Jsonl { reader, line, row } => skip_lines(reader, n, path, line, row),
            FileRows::Batches {
                kind,
                batches,
                pending,
                row,
                total,
            } => {
                let from_pending = (pending.len() as u64).min(n);
                if from_pending > 0 {
                    pending.nth(from_pending as usize - 1);
                    *row += from_pending;
                }
                let left = n - from_pending;
                if left == 0 {
                    return Ok(Skipped::Within(n));
                }
                if let Some(total) = *total {
                    // Parquet: open again at the row wanted rather than decode what lies between.
                    let in_file = total - *row;
                    return Ok(if left >= in_file {
                        Skipped::FileEnd(from_pending + in_file)
                    } else {
                        Skipped::Reopen {
                            skipped: n,
                            at: *row + left,
                        }
                    });
                }
                skip_batches(*kind, batches, pending, row, left, path)
                    .map(|s| add_skipped(s, from_pending))
            }
        }
    }
}

fn add_skipped(s: Skipped, more: u64) -> Skipped {
    match s {
        Skipped::Within(k) => Skipped::Within(k + more),
        Skipped::FileEnd(k) => Skipped::FileEnd(k + more),
        Skipped::Reopen { skipped, at } => Skipped::Reopen {
            skipped: skipped + more,
            at,
        },
    }
}

/// Skips `n` rows of an Arrow stream: whole batches are dropped, a batch that holds the first
/// row wanted is cut there and its rest becomes `pending`.
fn skip_batches(
    kind: FileKind,
    batches: &mut dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>,
    pending: &mut std::vec::IntoIter<Map<String, Value>>,
    row: &mut u64,
    n: u64,
    path: &Path,
) -> Result<Skipped, DataError> {
    let mut left = n;
    while left > 0 {
        match batches.next() {
            Some(Ok(batch)) => {
                let rows = batch.num_rows() as u64;
                if rows <= left {
                    left -= rows;
                    *row += rows;
                    continue;
                }
                let rest = batch.slice(left as usize, (rows - left) as usize);
                *pending = batch_to_rows(&rest, path)?.into_iter();
                *row += left;
                left = 0;
            }
            Some(Err(e)) => return Err(unreadable(kind, path, e.to_string())),
            None if *row == 0 => {
                return Err(DataError::EmptyFile {
                    path: path.to_path_buf(),
                })
            }
            None => return Ok(Skipped::FileEnd(n - left)),
        }
    }
    Ok(Skipped::Within(n))
}

/// Whether a JSONL line holds no row: only whitespace (as `str::trim` sees it). A line that is
/// not UTF-8 counts as a row (reading it is an error, reported by whoever reads it).
pub(crate) fn blank_line(line: &[u8]) -> bool {
    let ascii_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    if line.iter().all(|&b| ascii_space(b)) {
        return true;
    }
    if line.iter().any(|&b| b.is_ascii() && !ascii_space(b)) {
        return false;
    }
    std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty())
}

/// Skips `n` rows of a JSONL file by scanning its bytes for line ends (no JSON parsing).
fn skip_lines(
    reader: &mut BufReader<File>,
    n: u64,
    path: &Path,
    line: &mut u64,
    row: &mut u64,
) -> Result<Skipped, DataError> {
    let mut buf = Vec::new();
    let mut skipped = 0;
    while skipped < n {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            if *row == 0 {
                return Err(DataError::EmptyFile {
                    path: path.to_path_buf(),
                });
            }
            return Ok(Skipped::FileEnd(skipped));
        }
        *line += 1;
        if !blank_line(&buf) {
            *row += 1;
            skipped += 1;
        }
    }
    Ok(Skipped::Within(n))
}

/// One step through a JSONL file: `read` is the next line read (None at the end of the
/// file); `line` and `row` count lines and data rows so far.
fn jsonl_next(
    read: Option<std::io::Result<Vec<u8>>>,
    file_index: usize,
    path: &Path,
    line: &mut u64,
    row: &mut u64,
) -> Result<Next, DataError> {
    let bytes = match read {
        None if *row == 0 => {
            return Err(DataError::EmptyFile {
                path: path.to_path_buf(),
            })
        }
        None => return Ok(Next::End),
        Some(Err(source)) => {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
        Some(Ok(bytes)) => bytes,
    };
    *line += 1;
    let Some(fields) = parse_jsonl_line(&bytes, path, *line)? else {
        return Ok(Next::Again);
    };
    let out = SourceRow {
        file_index,
        file_row: *row,
        line: Some(*line),
        fields,
    };
    *row += 1;
    Ok(Next::Row(out))
}

/// Line `line` of JSONL file `path` as a JSON object; None for a blank line.
pub(crate) fn parse_jsonl_line(
    bytes: &[u8],
    path: &Path,
    line: u64,
) -> Result<Option<Map<String, Value>>, DataError> {
    let bad_json = |message: String| DataError::BadJson {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Utf8 {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| bad_json(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(bad_json("the line is not a JSON object".into()));
    };
    Ok(Some(fields))
}

/// A Parquet file's reader builder (footer read), and its row count.
pub(crate) fn parquet_builder(
    file: &SourceFile,
) -> Result<(ParquetRecordBatchReaderBuilder<File>, u64), DataError> {
    if file.bytes == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    let handle = File::open(&file.path).map_err(|source| DataError::Io {
        path: file.path.clone(),
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| DataError::BadParquet {
            path: file.path.clone(),
            message: e.to_string(),
        })?;
    let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    if rows == 0 {
        return Err(DataError::EmptyFile {
            path: file.path.clone(),
        });
    }
    Ok((builder, rows))
}

/// The row groups of a Parquet file that hold rows of `ranges` (file rows, sorted, disjoint),
/// and the selection of those rows within the groups kept.
pub(crate) fn parquet_selection(
    metadata: &parquet::file::metadata::ParquetMetaData,
    ranges: &[Range<u64>],
) -> (Vec<usize>, RowSelection) {
    let (mut groups, mut selectors) = (Vec::new(), Vec::new());
    let mut at = 0u64;
    for (g, group) in metadata.row_groups().iter().enumerate() {
        let span = at..at + group.num_rows().max(0) as u64;
        at = span.end;
        let mut pos = span.start;
        for r in ranges {
            let (start, end) = (r.start.max(span.start), r.end.min(span.end));
            if start >= end {
                continue;
            }
            if groups.last() != Some(&g) {
                groups.push(g);
            }
            if start > pos {
                selectors.push(RowSelector::skip((start - pos) as usize));
            }
            selectors.push(RowSelector::select((end - start) as usize));
            pos = end;
        }
        if groups.last() == Some(&g) && span.end > pos {
            selectors.push(RowSelector::skip((span.end - pos) as usize));
        }
    }
    (groups, RowSelection::from(selectors))
}

impl RowStream {
    pub fn new(files: Vec<SourceFile>) -> Self {
        let n = files.len();
        RowStream {
            files,
            current: 0,
            reader: None,
            start: 0,
            window: None,
            parquet_rows: vec![None; n],
        }
    }

    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// Tells the stream that at most `rows` rows will be read before the next skip (None:
    /// until the end), so that a Parquet file is decoded for those rows only.
    pub fn set_window(&mut self, rows: Option<u64>) {
        self.window = rows;
    }

    fn next_file(&mut self) {
        self.reader = None;
        self.current += 1;
        self.start = 0;
    }

    /// The row count of Parquet file `index`, from its footer.
    fn parquet_rows(&mut self, index: usize) -> Result<u64, DataError> {
        if let Some(rows) = self.parquet_rows[index] {
            return Ok(rows);
        }
        let (_, rows) = parquet_builder(&self.files[index])?;
        self.parquet_rows[index] = Some(rows);
        Ok(rows)
    }

    fn open_parquet(&mut self, index: usize) -> Result<FileRows, DataError> {
        let file = &self.files[index];
        let bad = |message: String| DataError::BadParquet {
            path: file.path.clone(),
            message,
        };
        let (builder, total) = parquet_builder(file)?;
        self.parquet_rows[index] = Some(total);
        let start = self.start.min(total);
        let end = match self.window {
            Some(w) if w > 0 => (start + w).min(total),
            _ => total,
        };
        let mut builder = builder.with_batch_size(1024);
        if start > 0 || end < total {
            let (groups, selection) =
                parquet_selection(builder.metadata(), std::slice::from_ref(&(start..end)));
            builder = builder
                .with_row_groups(groups)
                .with_row_selection(selection);
        }
        let batches = builder.build().map_err(|e| bad(e.to_string()))?;
        Ok(FileRows::Batches {
            kind: FileKind::Parquet,
            batches: Box::new(batches),
            pending: Vec::new().into_iter(),
            row: start,
            total: Some(total),
        })
    }

    fn open(&mut self, index: usize) -> Result<FileRows, DataError> {
        let file = &self.files[index];
        if file.kind == FileKind::Parquet {
            return self.open_parquet(index);
        }
        let io = |source| DataError::Io {
            path: file.path.clone(),
            source,
        };
        if file.bytes == 0 {
            return Err(DataError::EmptyFile {
                path: file.path.clone(),
            });
        }
        let handle = File::open(&file.path).map_err(io)?;
        if file.kind == FileKind::Jsonl {
            return Ok(FileRows::Jsonl {
                reader: BufReader::with_capacity(1 << 16, handle),
                line: 0,
                row: 0,
            });
        }
        let batches = arrow::ipc::reader::StreamReader::try_new(BufReader::new(handle), None)
            .map_err(|e| unreadable(FileKind::Arrow, &file.path, e.to_string()))?;
        Ok(FileRows::Batches {
            kind: FileKind::Arrow,
            batches: Box::new(batches),
            pending: Vec::new().into_iter(),
            row: 0,
            total: None,
        })
    }

    /// The next row, or None at the end of the last file.
    pub fn next_row(&mut self) -> Result<Option<SourceRow>, DataError> {
        while self.current < self.files.len() {
            if self.reader.is_none() {
                self.reader = Some(self.open(self.current)?);
            }
            let file_index = self.current;
            let path = self.files[file_index].path.clone();
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next(file_index, &path)? {
                Next::Row(row) => {
                    if let Some(w) = self.window.as_mut() {
                        *w = w.saturating_sub(1);
                    }
                    return Ok(Some(row));
                }
                Next::Again => continue,
                Next::End => self.next_file(),
                Next::Reopen(at) => {
                    self.reader = None;
                    self.start = at;
                }
            }
        }
        Ok(None)
    }

    /// Skips up to `n` rows without reading them as rows; returns how many there were (fewer
    /// at the end of the input).
    pub fn skip_rows(&mut self, n: u64) -> Result<u64, DataError> {
        let mut left = n;
        while left > 0 && self.current < self.files.len() {
            let index = self.current;
            let Some(reader) = self.reader.as_mut() else {
                if self.files[index].kind == FileKind::Parquet {
                    // Not open: count rows from the footer, open later where reading starts.
                    let total = self.parquet_rows(index)?;
                    let here = (total - self.start.min(total)).min(left);
                    left -= here;
                    self.start += here;
                    if self.start >= total {
                        self.next_file();
                    }
                } else {
                    self.reader = Some(self.open(index)?);
                }
                continue;
            };
            let path = self.files[index].path.clone();
            match reader.skip(left, &path)? {
                Skipped::Within(k) => left -= k,
                Skipped::FileEnd(k) => {
                    left -= k;
                    self.next_file();
                }
                Skipped::Reopen { skipped, at } => {
                    left -= skipped;
                    self.reader = None;
                    self.start = at;
                }
            }
        }
        Ok(n - left)
    }

    /// Column names of a Parquet file (None for JSONL, whose rows may differ).
    pub fn parquet_columns(path: &Path) -> Result<Vec<String>, DataError> {
        let handle = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| {
            DataError::BadParquet {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        Ok(builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect())
    }
}

/// Converts an Arrow record batch into JSON objects (nulls become JSON null).
pub(crate) fn batch_to_rows(
    batch: &arrow::record_batch::RecordBatch,
    path: &Path,
) -> Result<Vec<Map<String, Value>>, DataError> {
    let mut buf = Vec::new();
    {
        let mut writer = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        writer
            .write(batch)
            .and_then(|_| writer.finish())
            .map_err(|e| DataError::BadParquet {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Map<String, Value>> =
        serde_json::from_slice(&buf).map_err(|e| DataError::BadParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};

    /// A batch of rows `from..from + n`: an `id` (null every 5th row) and a `text`.
    fn batch(from: i64, n: i64) -> RecordBatch {
        let ids: Int64Array = (from..from + n)
            .map(|i| (i % 5 != 0).then_some(i))
            .collect();
        let texts: StringArray = (from..from + n).map(|i| Some(format!("row {i}"))).collect();
        RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as ArrayRef),
            ("text", Arc::new(texts) as ArrayRef),
        ])
        .unwrap()
    }

    /// A JSONL file with blank, whitespace-only and no-break-space-only lines between rows,
    /// a Parquet file of row groups of 7 rows and an Arrow stream of batches of 6 rows.
    pub(crate) fn mixed_inputs(dir: &Path) -> Vec<SourceFile> {
        let mut jsonl = String::new();
        for i in 0..23 {
            jsonl.push_str(&format!("{{\"id\": {i}, \"text\": \"line {i}\"}}\n"));
            match i % 4 {
                0 => jsonl.push('\n'),
                1 => jsonl.push_str(" \t\r\n"),
                2 => jsonl.push_str("\u{a0}\n"),
                _ => {}
            }
        }
        std::fs::write(dir.join("a.jsonl"), jsonl).unwrap();
        let file = File::create(dir.join("b.parquet")).unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(7))
            .build();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(file, batch(0, 1).schema(), Some(props)).unwrap();
        w.write(&batch(100, 30)).unwrap();
        w.close().unwrap();
        let file = File::create(dir.join("c.arrow")).unwrap();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(file, &batch(0, 1).schema()).unwrap();
        for k in 0..4 {
            w.write(&batch(200 + 6 * k, 6)).unwrap();
        }
        w.finish().unwrap();
        let names = ["a.jsonl", "b.parquet", "c.arrow"];
        resolve(&names.map(|n| dir.join(n))).unwrap()
    }

    fn key(r: &SourceRow) -> (usize, u64, Option<u64>, String) {
        (
            r.file_index,
            r.file_row,
            r.line,
            Value::Object(r.fields.clone()).to_string(),
        )
    }

    fn all_rows(files: &[SourceFile]) -> Vec<(usize, u64, Option<u64>, String)> {
        let mut s = RowStream::new(files.to_vec());
        std::iter::from_fn(|| s.next_row().unwrap())
            .map(|r| key(&r))
            .collect()
    }

    #[test]
    fn skipping_then_reading_gives_the_rows_a_full_read_gives() {
        let dir = tempfile::tempdir().unwrap();
        let files = mixed_inputs(dir.path());
        let all = all_rows(&files);
        assert_eq!(all.len(), 23 + 30 + 24);
        // (skip, read) steps, with and without a window, across row groups and files.
        let plans: [&[(u64, u64)]; 5] = [
            &[(0, 5), (3, 4), (10, 9), (2, 30), (1, 100)],
            &[(22, 2), (6, 1), (7, 7)],
            &[(53, 3), (5, 6)],
            &[(1, 1), (1, 1), (1, 1), (40, 1), (12, 2)],
            &[(76, 1), (5, 5)],
        ];
        for (p, plan) in plans.iter().enumerate() {
            for window in [false, true] {
                let mut s = RowStream::new(files.clone());
                let mut at = 0usize;
                for &(skip, read) in plan.iter() {
                    let skipped = s.skip_rows(skip).unwrap();
                    assert_eq!(skipped as usize, skip.min((all.len() - at) as u64) as usize);
                    at += skipped as usize;
                    s.set_window(window.then_some(read));
                    for _ in 0..read {
                        let got = s.next_row().unwrap().map(|r| key(&r));
                        assert_eq!(
                            got.as_ref(),
                            all.get(at),
                            "plan {p} window {window} row {at}"
                        );
                        at += usize::from(got.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn blank_lines_are_what_trim_makes_empty() {
        for line in ["", " ", "\t\r", "\u{a0}", "\u{3000} ", "\x0b"] {
            assert!(blank_line(line.as_bytes()), "{line:?}");
        }
        for line in ["{}", " x", "\u{e9}", "\u{feff}"] {
            assert!(!blank_line(line.as_bytes()), "{line:?}");
        }
        assert!(
            !blank_line(b"\xff\xfe"),
            "not UTF-8: a row (reading it fails)"
        );
    }
}
