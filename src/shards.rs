//! Parquet shards of scored pairs: the schema of `architecture.md`, writing (zstd, row groups
//! sized for streaming, key-value metadata, atomic rename), reading, and the folder manifest.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, ListArray, ListBuilder, PrimitiveBuilder,
    UInt64Array,
};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type,
};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::data::tokenize::TokenizedPair;

pub const SHARD_MANIFEST: &str = "manifest.json";
/// Pairs per Parquet row group: small enough to stream, large enough to compress well.
pub const ROW_GROUP_PAIRS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot write `{path}`: {message}; check that the folder is writable and has space")]
    Write { path: PathBuf, message: String },
    #[error("cannot read shard `{path}`: {message}")]
    Read { path: PathBuf, message: String },
    #[error("`{path}` is not an edpo shard: {message}")]
    NotAShard { path: PathBuf, message: String },
}

impl ShardError {
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// One pair with its reference scores: a row of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair {
    pub pair: TokenizedPair,
    pub ref_chosen_logps: f32,
    pub ref_rejected_logps: f32,
    pub ref_chosen_token_logps: Vec<f32>,
    pub ref_rejected_token_logps: Vec<f32>,
    /// K ids per response token, flattened token-major ([len × K]).
    pub ref_chosen_topk_ids: Vec<u32>,
    pub ref_rejected_topk_ids: Vec<u32>,
    pub ref_chosen_topk_logps: Vec<f32>,
    pub ref_rejected_topk_logps: Vec<f32>,
    pub k: usize,
}

fn list_of(inner: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", inner, true)))
}

/// The shard schema (architecture.md), plus `source_row`: the pair's index in the input
/// stream, which makes every row traceable to its source line.
pub fn schema() -> SchemaRef {
    let u32_list = list_of(DataType::UInt32);
    let f32_list = list_of(DataType::Float32);
    Arc::new(Schema::new(vec![
        Field::new("pair_id", DataType::UInt64, false),
        Field::new("source_row", DataType::UInt64, false),
        Field::new("prompt_ids", u32_list.clone(), false),
        Field::new("chosen_ids", u32_list.clone(), false),
        Field::new("rejected_ids", u32_list.clone(), false),
        Field::new("ref_chosen_logps", DataType::Float32, false),
        Field::new("ref_rejected_logps", DataType::Float32, false),
        Field::new("ref_chosen_token_logps", f32_list.clone(), false),
        Field::new("ref_rejected_token_logps", f32_list.clone(), false),
        Field::new("ref_chosen_topk_ids", list_of(u32_list.clone()), false),
        Field::new("ref_rejected_topk_ids", list_of(u32_list), false),
        Field::new("ref_chosen_topk_logps", list_of(f32_list.clone()), false),
        Field::new("ref_rejected_topk_logps", list_of(f32_list), false),
        Field::new("prompt_truncated", DataType::Boolean, false),
        Field::new("response_truncated", DataType::Boolean, false),
    ]))
}

/// One list per row (e.g. token ids of each pair).
fn lists<'a, T: ArrowPrimitiveType>(rows: impl Iterator<Item = &'a [T::Native]>) -> ArrayRef {
    let mut b = ListBuilder::new(PrimitiveBuilder::<T>::new());
    for row in rows {
        b.values().append_slice(row);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// One list of K-lists per row, from token-major flattened values ([len × K]).
fn nested_lists<'a, T: ArrowPrimitiveType>(
    rows: impl Iterator<Item = (&'a [T::Native], usize)>,
) -> ArrayRef {
    let mut b = ListBuilder::new(ListBuilder::new(PrimitiveBuilder::<T>::new()));
    for (flat, k) in rows {
        for token in flat.chunks(k.max(1)) {
            b.values().values().append_slice(token);
            b.values().append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// Builds one Arrow batch from scored pairs.
pub fn to_record_batch(pairs: &[ScoredPair]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            pairs.iter().map(|p| p.pair.pair_id),
        )),
        Arc::new(UInt64Array::from_iter_values(
            pairs.iter().map(|p| p.pair.source_row),
        )),
        lists::<UInt32Type>(pairs.iter().map(|p| p.pair.prompt_ids.as_slice())),
        lists::<UInt32Type>(pairs.iter().map(|p| p.pair.chosen_ids.as_slice())),
        lists::<UInt32Type>(pairs.iter().map(|p| p.pair.rejected_ids.as_slice())),
        Arc::new(Float32Array::from_iter_values(
            pairs.iter().map(|p| p.ref_chosen_logps),
        )),
        Arc::new(Float32Array::from_iter_values(
            pairs.iter().map(|p| p.ref_rejected_logps),
        )),
        lists::<Float32Type>(pairs.iter().map(|p| p.ref_chosen_token_logps.as_slice())),
        lists::<Float32Type>(pairs.iter().map(|p| p.ref_rejected_token_logps.as_slice())),
        nested_lists::<UInt32Type>(
            pairs
                .iter()
                .map(|p| (p.ref_chosen_topk_ids.as_slice(), p.k)),
        ),
        nested_lists::<UInt32Type>(
            pairs
                .iter()
                .map(|p| (p.ref_rejected_topk_ids.as_slice(), p.k)),
        ),
        nested_lists::<Float32Type>(
            pairs
                .iter()
                .map(|p| (p.ref_chosen_topk_logps.as_slice(), p.k)),
        ),
        nested_lists::<Float32Type>(
            pairs
                .iter()
                .map(|p| (p.ref_rejected_topk_logps.as_slice(), p.k)),
        ),
        Arc::new(BooleanArray::from_iter(
            pairs.iter().map(|p| Some(p.pair.prompt_truncated)),
        )),
        Arc::new(BooleanArray::from_iter(
            pairs.iter().map(|p| Some(p.pair.response_truncated)),
        )),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Writes `pairs` to `path` atomically (a `.tmp` sibling, fsync, rename).
pub fn write_shard(
    path: &Path,
    pairs: &[ScoredPair],
    metadata: &BTreeMap<String, String>,
) -> Result<(), ShardError> {
    let err = |message: String| ShardError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = path.with_extension("parquet.tmp");
    let kv: Vec<KeyValue> = metadata
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(|e| err(e.to_string()))?,
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_PAIRS))
        .set_key_value_metadata(Some(kv))
        .build();
    let file = File::create(&tmp).map_err(|e| err(e.to_string()))?;
    let mut writer =
        ArrowWriter::try_new(file, schema(), Some(props)).map_err(|e| err(e.to_string()))?;
    for chunk in pairs.chunks(ROW_GROUP_PAIRS) {
        let batch = to_record_batch(chunk).map_err(|e| err(e.to_string()))?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Writes a small file atomically (manifests, JSON).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ShardError> {
    let err = |message: String| ShardError::Write {
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

/// The key-value metadata of a Parquet file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, ShardError> {
    let file = File::open(path).map_err(|e| ShardError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ShardError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(builder
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

fn list_values<T: arrow::datatypes::ArrowPrimitiveType>(
    list: &ListArray,
    row: usize,
) -> Vec<T::Native> {
    let values = list.value(row);
    values
        .as_any()
        .downcast_ref::<arrow::array::PrimitiveArray<T>>()
        .map(|a| a.values().to_vec())
        .unwrap_or_default()
}

fn nested_values<T: arrow::datatypes::ArrowPrimitiveType>(
    list: &ListArray,
    row: usize,
) -> (Vec<T::Native>, usize) {
    let inner = list.value(row);
    let inner = inner
        .as_any()
        .downcast_ref::<ListArray>()
        .expect("nested list");
    let mut flat = Vec::new();
    let mut k = 0;
    for t in 0..inner.len() {
        let v = list_values::<T>(inner, t);
        k = v.len();
        flat.extend(v);
    }
    (flat, k)
}

/// Reads all pairs of one shard (row group by row group).
pub fn read_shard(path: &Path) -> Result<Vec<ScoredPair>, ShardError> {
    let not_shard = |message: String| ShardError::NotAShard {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| ShardError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| ShardError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let u64_col = |name: &str| {
            typed_column::<UInt64Array>(&batch, name)
                .ok_or_else(|| not_shard(format!("no uint64 column `{name}`")))
        };
        let f32_col = |name: &str| {
            typed_column::<Float32Array>(&batch, name)
                .ok_or_else(|| not_shard(format!("no float32 column `{name}`")))
        };
        let list_col = |name: &str| {
            typed_column::<ListArray>(&batch, name)
                .ok_or_else(|| not_shard(format!("no list column `{name}`")))
        };
        let bool_col = |name: &str| {
            typed_column::<BooleanArray>(&batch, name)
                .ok_or_else(|| not_shard(format!("no boolean column `{name}`")))
        };
        let ids = u64_col("pair_id")?;
        let rows = u64_col("source_row")?;
        let (prompt, chosen, rejected) = (
            list_col("prompt_ids")?,
            list_col("chosen_ids")?,
            list_col("rejected_ids")?,
        );
        let (rc, rr) = (f32_col("ref_chosen_logps")?, f32_col("ref_rejected_logps")?);
        let (rct, rrt) = (
            list_col("ref_chosen_token_logps")?,
            list_col("ref_rejected_token_logps")?,
        );
        let (rci, rri) = (
            list_col("ref_chosen_topk_ids")?,
            list_col("ref_rejected_topk_ids")?,
        );
        let (rcv, rrv) = (
            list_col("ref_chosen_topk_logps")?,
            list_col("ref_rejected_topk_logps")?,
        );
        let (pt, rt) = (
            bool_col("prompt_truncated")?,
            bool_col("response_truncated")?,
        );
        for i in 0..batch.num_rows() {
            let (ci, k) = nested_values::<UInt32Type>(&rci, i);
            out.push(ScoredPair {
                pair: TokenizedPair {
                    pair_id: ids.value(i),
                    source_row: rows.value(i),
                    prompt_ids: list_values::<UInt32Type>(&prompt, i),
                    chosen_ids: list_values::<UInt32Type>(&chosen, i),
                    rejected_ids: list_values::<UInt32Type>(&rejected, i),
                    prompt_truncated: pt.value(i),
                    response_truncated: rt.value(i),
                },
                ref_chosen_logps: rc.value(i),
                ref_rejected_logps: rr.value(i),
                ref_chosen_token_logps: list_values::<Float32Type>(&rct, i),
                ref_rejected_token_logps: list_values::<Float32Type>(&rrt, i),
                ref_chosen_topk_ids: ci,
                ref_rejected_topk_ids: nested_values::<UInt32Type>(&rri, i).0,
                ref_chosen_topk_logps: nested_values::<Float32Type>(&rcv, i).0,
                ref_rejected_topk_logps: nested_values::<Float32Type>(&rrv, i).0,
                k,
            });
        }
    }
    Ok(out)
}

/// Statistics of one shard (also stored in its own metadata, so a shard renamed into place
/// just before a crash is still accounted for on resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardStats {
    pub file: String,
    pub index: usize,
    pub first_source_row: u64,
    pub rows_in: u64,
    pub pairs: u64,
    pub skipped: BTreeMap<String, u64>,
    /// Response tokens scored (chosen + rejected).
    pub response_tokens: u64,
    /// Tokens run through the scoring graph, padding excluded / included.
    pub sequence_tokens: u64,
    pub padded_tokens: u64,
}

/// `manifest.json` of a shards folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardManifest {
    pub edpo_version: String,
    pub bundle_sha256: String,
    pub fingerprint: String,
    pub topk: usize,
    pub settings: serde_json::Value,
    pub complete: bool,
    pub shards: Vec<ShardStats>,
}

impl ShardManifest {
    pub fn read(dir: &Path) -> Result<Option<ShardManifest>, ShardError> {
        let path = dir.join(SHARD_MANIFEST);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ShardError::NotAShard {
                        path,
                        message: format!("bad manifest.json: {e}"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShardError::Read {
                path,
                message: e.to_string(),
            }),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), ShardError> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        write_atomic(&dir.join(SHARD_MANIFEST), &bytes)
    }
}

pub fn shard_file_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// The shard files of a folder, sorted by name.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>, ShardError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ShardError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        })
        .collect();
    files.sort();
    Ok(files)
}
