//! Run records: `metrics.parquet` (one row per optimiser step, the metrics of objective.md §6)
//! and `pairs.parquet` (one row per pair per step: every ε-DPO decision), kept as Arrow
//! batches and rewritten atomically at every checkpoint and at the end.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int8Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::table::{self, ParquetLayout};

/// The run folder's tables.
pub const METRICS_FILE: &str = "metrics.parquet";
pub const PAIRS_FILE: &str = "pairs.parquet";

/// Column names of `metrics.parquet` (TRL's metric names where TRL has the metric).
pub const STEP: &str = "step";
pub const EPOCH: &str = "epoch";
pub const LOSS: &str = "loss";
pub const LEARNING_RATE: &str = "learning_rate";
pub const GRAD_NORM: &str = "grad_norm";
pub const BETA: &str = "kl/beta";
pub const BETA_NEXT: &str = "kl/beta_next";
pub const AVG_STEPS: &str = "kl/avg_steps";
pub const P_EPSILON_STEPS: &str = "kl/p_epsilon_steps";
pub const N_EPSILON_STEPS: &str = "kl/n_epsilon_steps";
pub const REWARDS_CHOSEN: &str = "rewards/chosen";
pub const REWARDS_REJECTED: &str = "rewards/rejected";
pub const REWARDS_MARGINS: &str = "rewards/margins";
pub const REWARDS_ACCURACIES: &str = "rewards/accuracies";
pub const LOGPS_CHOSEN: &str = "logps/chosen";
pub const LOGPS_REJECTED: &str = "logps/rejected";
pub const PAIRS: &str = "pairs";
pub const PAIRS_PER_S: &str = "pairs_per_s";
pub const SKIPPED_NONFINITE: &str = "skipped_nonfinite";
pub const ELAPSED_S: &str = "elapsed_s";

/// Column names of `pairs.parquet` besides `pair_id` and `step`.
pub const PAIR_ID: &str = "pair_id";
/// The per-pair step k of objective.md §3 (the paper's name for it).
pub const PAIR_STEP: &str = "k";
pub const BETA_I: &str = "beta_i";

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
    /// The optimiser step.
    pub step: u64,
    /// The per-pair step k ∈ {−1, 0, +1} (objective.md §3).
    pub pair_step: i8,
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

/// Bytes of one encoded record: two u64, one i8, eleven f64.
pub const RECORD_BYTES: usize = 8 + 8 + 1 + 11 * 8;

impl PairRecord {
    /// The record as fixed-size little-endian bytes (how ranks send records to rank 0; exact
    /// for every value, NaN and infinities included).
    pub fn to_bytes(&self, out: &mut Vec<u8>) {
        out.extend(self.pair_id.to_le_bytes());
        out.extend(self.step.to_le_bytes());
        out.push(self.pair_step as u8);
        for v in self.values() {
            out.extend(v.to_le_bytes());
        }
    }

    /// The records encoded by `to_bytes`, back.
    pub fn from_bytes(bytes: &[u8]) -> Vec<PairRecord> {
        bytes
            .chunks_exact(RECORD_BYTES)
            .map(|b| {
                let u64_at =
                    |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                let f = |k: usize| {
                    f64::from_le_bytes(b[17 + 8 * k..25 + 8 * k].try_into().expect("8 bytes"))
                };
                PairRecord {
                    pair_id: u64_at(0),
                    step: u64_at(8),
                    pair_step: b[16] as i8,
                    beta_i: f(0),
                    z: f(1),
                    g: f(2),
                    g_plus: f(3),
                    g_minus: f(4),
                    reward_chosen: f(5),
                    reward_rejected: f(6),
                    logps_chosen: f(7),
                    logps_rejected: f(8),
                    ref_chosen: f(9),
                    ref_rejected: f(10),
                }
            })
            .collect()
    }

    fn values(&self) -> [f64; 11] {
        [
            self.beta_i,
            self.z,
            self.g,
            self.g_plus,
            self.g_minus,
            self.reward_chosen,
            self.reward_rejected,
            self.logps_chosen,
            self.logps_rejected,
            self.ref_chosen,
            self.ref_rejected,
        ]
    }
}

fn f64_field(name: &str) -> Field {
    Field::new(name, DataType::Float64, false)
}

pub fn metrics_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(STEP, DataType::UInt64, false),
        Field::new(EPOCH, DataType::UInt64, false),
        f64_field(LOSS),
        f64_field(LEARNING_RATE),
        f64_field(GRAD_NORM),
        f64_field(BETA),
        f64_field(BETA_NEXT),
        f64_field(AVG_STEPS),
        f64_field(P_EPSILON_STEPS),
        f64_field(N_EPSILON_STEPS),
        f64_field(REWARDS_CHOSEN),
        f64_field(REWARDS_REJECTED),
        f64_field(REWARDS_MARGINS),
        f64_field(REWARDS_ACCURACIES),
        f64_field(LOGPS_CHOSEN),
        f64_field(LOGPS_REJECTED),
        Field::new(PAIRS, DataType::UInt64, false),
        f64_field(PAIRS_PER_S),
        Field::new(SKIPPED_NONFINITE, DataType::Boolean, false),
        f64_field(ELAPSED_S),
    ]))
}

pub fn pairs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PAIR_ID, DataType::UInt64, false),
        Field::new(STEP, DataType::UInt64, false),
        Field::new(PAIR_STEP, DataType::Int8, false),
        f64_field(BETA_I),
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
            Arc::new(Int8Array::from_iter_values(
                rows.iter().map(|r| r.pair_step),
            )),
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

    /// Reads `path` (if it exists) keeping only the rows of optimiser steps before
    /// `before_step` (a checkpoint at step s holds steps 0..s; later rows were recorded after
    /// it and are recorded again when the resumed run redoes their steps).
    pub fn load(path: &Path, schema: SchemaRef, before_step: u64) -> Result<Self, crate::Error> {
        let mut table = RunTable::new(schema);
        if !path.exists() {
            return Ok(table);
        }
        for batch in table::read_parquet(path)? {
            let batch = table::next_batch(path, batch)?;
            let steps: UInt64Array = table::column(path, &batch, STEP, "uint64")?;
            let keep = BooleanArray::from_iter(
                steps
                    .iter()
                    .map(|s| Some(s.unwrap_or(u64::MAX) < before_step)),
            );
            let filtered = arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| {
                table::TableError::Read {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
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
    pub fn save(&self, path: &Path) -> Result<(), table::TableError> {
        table::write_parquet(
            path,
            self.schema.clone(),
            self.batches.iter().cloned().map(Ok),
            &ParquetLayout::default(),
        )
    }
}
