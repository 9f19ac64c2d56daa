//! Parquet files and small files on disk: the one atomic writer (a temporary sibling, fsync,
//! rename) used for shards, run tables and per-pair outputs, reading a file's batches and
//! key-value metadata, and typed columns by name.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot write `{path}`: {message}; check that the folder is writable and has space")]
    Write { path: PathBuf, message: String },
    #[error("cannot read `{path}`: {message}")]
    Read { path: PathBuf, message: String },
    #[error("`{path}` has no {kind} column `{name}`")]
    Column {
        path: PathBuf,
        name: String,
        kind: &'static str,
    },
}

/// How a Parquet file is laid out: rows per row group (None: the writer's default) and
/// key-value metadata (written in key order).
#[derive(Debug, Clone, Default)]
pub struct ParquetLayout {
    pub row_group_rows: Option<usize>,
    pub metadata: BTreeMap<String, String>,
}

/// Writes `batches` to `path` atomically, zstd-compressed: a `.tmp` sibling is written and
/// synced, then renamed over `path`, so readers see the old file or the whole new one.
pub fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = Result<RecordBatch, arrow::error::ArrowError>>,
    layout: &ParquetLayout,
) -> Result<(), TableError> {
    let err = |message: String| TableError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = path.with_extension("parquet.tmp");
    let mut props = WriterProperties::builder().set_compression(Compression::ZSTD(
        ZstdLevel::try_new(3).map_err(|e| err(e.to_string()))?,
    ));
    if let Some(rows) = layout.row_group_rows {
        props = props.set_max_row_group_row_count(Some(rows));
    }
    if !layout.metadata.is_empty() {
        let kv = layout
            .metadata
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        props = props.set_key_value_metadata(Some(kv));
    }
    let file = File::create(&tmp).map_err(|e| err(e.to_string()))?;
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(props.build())).map_err(|e| err(e.to_string()))?;
    for batch in batches {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    drop(file);
    crate::crash::point("table.tmp-written");
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

/// Writes a small file atomically (manifests, JSON).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TableError> {
    let err = |message: String| TableError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| err(e.to_string()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

fn read_err(path: &Path) -> impl Fn(String) -> TableError + '_ {
    move |message| TableError::Read {
        path: path.to_path_buf(),
        message,
    }
}

/// A reader builder over a Parquet file (for projections and metadata).
pub fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, TableError> {
    let err = read_err(path);
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))
}

/// Every record batch of a Parquet file, in order.
pub fn read_parquet(path: &Path) -> Result<ParquetRecordBatchReader, TableError> {
    open_parquet(path)?
        .build()
        .map_err(|e| read_err(path)(e.to_string()))
}

/// One batch from a reader, with the file named in its error.
pub fn next_batch(
    path: &Path,
    batch: Result<RecordBatch, arrow::error::ArrowError>,
) -> Result<RecordBatch, TableError> {
    batch.map_err(|e| read_err(path)(e.to_string()))
}

/// The key-value metadata of a Parquet file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, TableError> {
    Ok(open_parquet(path)?
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default())
}

/// Column `name` of `batch` as the concrete Arrow array type `A` (None when absent or of
/// another type).
pub fn typed_column<A: Array + Clone + 'static>(batch: &RecordBatch, name: &str) -> Option<A> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>().cloned())
}

/// Column `name` of a batch read from `path` as `A`, or an error naming the file, the column
/// and the type `kind` it should have.
pub fn column<A: Array + Clone + 'static>(
    path: &Path,
    batch: &RecordBatch,
    name: &str,
    kind: &'static str,
) -> Result<A, TableError> {
    typed_column(batch, name).ok_or_else(|| TableError::Column {
        path: path.to_path_buf(),
        name: name.to_string(),
        kind,
    })
}

/// Named numeric columns of a Parquet file as f64 (nulls as NaN), read by name.
pub fn read_f64_columns(
    path: &Path,
    names: &[&str],
) -> Result<BTreeMap<String, Vec<f64>>, TableError> {
    let err = read_err(path);
    let mut out: BTreeMap<String, Vec<f64>> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    for batch in read_parquet(path)? {
        let batch = next_batch(path, batch)?;
        for name in names {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| TableError::Column {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    kind: "numeric",
                })?;
            let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Float64)
                .map_err(|e| err(e.to_string()))?;
            let col = col
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .ok_or_else(|| err(format!("`{name}` is not numeric")))?;
            let values = out.get_mut(*name).expect("inserted above");
            values.extend((0..col.len()).map(|j| {
                if col.is_null(j) {
                    f64::NAN
                } else {
                    col.value(j)
                }
            }));
        }
    }
    Ok(out)
}
