//! Run records: `metrics.parquet` (one row per optimiser step, the metrics of objective.md §6)
//! and `pairs.parquet` (one row per pair per step: every ε-DPO decision), kept as Arrow
//! batches and rewritten atomically at every checkpoint and at the end.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int8Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::shards::ShardError;

/// One optimiser step's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// β used by the step (objective.md's kl/beta), and β after the §5 update.
    pub beta: f64,
    pub beta_next: f64,
    pub avg_steps: f64,
    pub p_epsilon_steps: f64,
    pub n_epsilon_steps: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_margins: f64,
    pub rewards_accuracies: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub pairs: u64,
    pub pairs_per_s: f64,
    pub skipped_nonfinite: bool,
    pub elapsed_s: f64,
}

/// One pair's decision at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    pub pair_id: u64,
    pub step: u64,
    pub k: i8,
    pub beta_i: f64,
    pub z: f64,
    pub g: f64,
    pub g_plus: f64,
    pub g_minus: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

fn f64_field(name: &str) -> Field {
    Field::new(name, DataType::Float64, false)
}

pub fn metrics_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("epoch", DataType::UInt64, false),
        f64_field("loss"),
        f64_field("learning_rate"),
        f64_field("grad_norm"),
        f64_field("kl/beta"),
        f64_field("kl/beta_next"),
        f64_field("kl/avg_steps"),
        f64_field("kl/p_epsilon_steps"),
        f64_field("kl/n_epsilon_steps"),
        f64_field("rewards/chosen"),
        f64_field("rewards/rejected"),
        f64_field("rewards/margins"),
        f64_field("rewards/accuracies"),
        f64_field("logps/chosen"),
        f64_field("logps/rejected"),
        Field::new("pairs", DataType::UInt64, false),
        f64_field("pairs_per_s"),
        Field::new("skipped_nonfinite", DataType::Boolean, false),
        f64_field("elapsed_s"),
    ]))
}

pub fn pairs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pair_id", DataType::UInt64, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("k", DataType::Int8, false),
        f64_field("beta_i"),
        f64_field("z"),
        f64_field("g"),
        f64_field("g_plus"),
        f64_field("g_minus"),
        f64_field("reward_chosen"),
        f64_field("reward_rejected"),
        f64_field("logps_chosen"),
        f64_field("logps_rejected"),
        f64_field("ref_logps_chosen"),
        f64_field("ref_logps_rejected"),
    ]))
}

fn f64s<T>(rows: &[T], f: impl Fn(&T) -> f64) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
}

fn u64s<T>(rows: &[T], f: impl Fn(&T) -> u64) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
}

pub fn metrics_batch(rows: &[StepMetrics]) -> RecordBatch {
    RecordBatch::try_new(
        metrics_schema(),
        vec![
            u64s(rows, |r| r.step),
            u64s(rows, |r| r.epoch),
            f64s(rows, |r| r.loss),
            f64s(rows, |r| r.learning_rate),
            f64s(rows, |r| r.grad_norm),
            f64s(rows, |r| r.beta),
            f64s(rows, |r| r.beta_next),
            f64s(rows, |r| r.avg_steps),
            f64s(rows, |r| r.p_epsilon_steps),
            f64s(rows, |r| r.n_epsilon_steps),
            f64s(rows, |r| r.rewards_chosen),
            f64s(rows, |r| r.rewards_rejected),
            f64s(rows, |r| r.rewards_margins),
            f64s(rows, |r| r.rewards_accuracies),
            f64s(rows, |r| r.logps_chosen),
            f64s(rows, |r| r.logps_rejected),
            u64s(rows, |r| r.pairs),
            f64s(rows, |r| r.pairs_per_s),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.skipped_nonfinite)),
            )),
            f64s(rows, |r| r.elapsed_s),
        ],
    )
    .expect("metrics columns match the schema")
}

pub fn pairs_batch(rows: &[PairRecord]) -> RecordBatch {
    RecordBatch::try_new(
        pairs_schema(),
        vec![
            u64s(rows, |r| r.pair_id),
            u64s(rows, |r| r.step),
            Arc::new(Int8Array::from_iter_values(rows.iter().map(|r| r.k))),
            f64s(rows, |r| r.beta_i),
            f64s(rows, |r| r.z),
            f64s(rows, |r| r.g),
            f64s(rows, |r| r.g_plus),
            f64s(rows, |r| r.g_minus),
            f64s(rows, |r| r.reward_chosen),
            f64s(rows, |r| r.reward_rejected),
            f64s(rows, |r| r.logps_chosen),
            f64s(rows, |r| r.logps_rejected),
            f64s(rows, |r| r.ref_chosen),
            f64s(rows, |r| r.ref_rejected),
        ],
    )
    .expect("pair columns match the schema")
}

/// An append-only table of record batches, persisted as one Parquet file.
pub struct RunTable {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl RunTable {
    pub fn new(schema: SchemaRef) -> Self {
        RunTable {
            schema,
            batches: Vec::new(),
        }
    }

    /// Reads `path` (if it exists) keeping only rows whose `step` ≤ `max_step`.
    pub fn load(path: &Path, schema: SchemaRef, max_step: u64) -> Result<Self, ShardError> {
        let mut table = RunTable::new(schema);
        if !path.exists() {
            return Ok(table);
        }
        let err = |e: String| ShardError::Read {
            path: path.to_path_buf(),
            message: e,
        };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| err(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let steps = crate::shards::typed_column::<UInt64Array>(&batch, "step")
                .ok_or_else(|| err("no uint64 `step` column".into()))?;
            let keep = BooleanArray::from_iter(
                steps
                    .iter()
                    .map(|s| Some(s.unwrap_or(u64::MAX) <= max_step)),
            );
            let filtered = arrow::compute::filter_record_batch(&batch, &keep)
                .map_err(|e| err(e.to_string()))?;
            if filtered.num_rows() > 0 {
                table.batches.push(filtered);
            }
        }
        Ok(table)
    }

    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }

    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Writes all rows to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), ShardError> {
        let err = |e: String| ShardError::Write {
            path: path.to_path_buf(),
            message: e,
        };
        let tmp = path.with_extension("parquet.tmp");
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).map_err(|e| err(e.to_string()))?,
            ))
            .build();
        let file = File::create(&tmp).map_err(|e| err(e.to_string()))?;
        let mut writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))
            .map_err(|e| err(e.to_string()))?;
        for b in &self.batches {
            writer.write(b).map_err(|e| err(e.to_string()))?;
        }
        let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
        file.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}
