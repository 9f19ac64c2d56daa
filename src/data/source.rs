//! Input files: resolving `--data` paths (files, folders, globs) and streaming their rows as
//! JSON objects, one source at a time, with file and row positions for error messages.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
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

/// Streams rows from the resolved files in order.
pub struct RowStream {
    files: Vec<SourceFile>,
    current: usize,
    reader: Option<FileRows>,
}

enum FileRows {
    Jsonl {
        lines: std::io::Split<BufReader<File>>,
        line: u64,
        row: u64,
    },
    /// Parquet or Arrow: record batches, turned into rows one batch at a time.
    Batches {
        kind: FileKind,
        batches: Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>,
        pending: std::vec::IntoIter<Map<String, Value>>,
        row: u64,
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
}

impl FileRows {
    /// The next step through file `file_index` (at `path`).
    fn next(&mut self, file_index: usize, path: &Path) -> Result<Next, DataError> {
        match self {
            FileRows::Jsonl { lines, line, row } => {
                jsonl_next(lines.next(), file_index, path, line, row)
            }
            FileRows::Batches {
                kind,
                batches,
                pending,
                row,
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
                    None => Ok(Next::End),
                }
            }
        }
    }
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
    let bad_json = |message: String| DataError::BadJson {
        path: path.to_path_buf(),
        line: *line,
        message,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::Utf8 {
        path: path.to_path_buf(),
        line: *line,
        message: e.to_string(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(Next::Again);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| bad_json(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(bad_json("the line is not a JSON object".into()));
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

impl RowStream {
    pub fn new(files: Vec<SourceFile>) -> Self {
        RowStream {
            files,
            current: 0,
            reader: None,
        }
    }

    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    fn open(&self, index: usize) -> Result<FileRows, DataError> {
        let file = &self.files[index];
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
        match file.kind {
            FileKind::Jsonl => Ok(FileRows::Jsonl {
                lines: BufReader::new(handle).split(b'\n'),
                line: 0,
                row: 0,
            }),
            FileKind::Parquet => {
                let bad = |message: String| DataError::BadParquet {
                    path: file.path.clone(),
                    message,
                };
                let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
                    .map_err(|e| bad(e.to_string()))?;
                let batches = builder
                    .with_batch_size(1024)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                Ok(FileRows::Batches {
                    kind: FileKind::Parquet,
                    batches: Box::new(batches),
                    pending: Vec::new().into_iter(),
                    row: 0,
                })
            }
            FileKind::Arrow => {
                let batches =
                    arrow::ipc::reader::StreamReader::try_new(BufReader::new(handle), None)
                        .map_err(|e| unreadable(FileKind::Arrow, &file.path, e.to_string()))?;
                Ok(FileRows::Batches {
                    kind: FileKind::Arrow,
                    batches: Box::new(batches),
                    pending: Vec::new().into_iter(),
                    row: 0,
                })
            }
        }
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
                Next::Row(row) => return Ok(Some(row)),
                Next::Again => continue,
                Next::End => {
                    self.reader = None;
                    self.current += 1;
                }
            }
        }
        Ok(None)
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
fn batch_to_rows(
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
