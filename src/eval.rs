//! `edpo eval`: score the pairs of a shards folder with some parameters (a checkpoint, a
//! `final/` model, or the reference itself) and report preference accuracy, reward margins,
//! z and a per-token KL estimate against the cached reference.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::bundle::{Bundle, BundleError};
use crate::graphs::{GraphError, ReferenceGraph};
use crate::objective;
use crate::runtime::SessionConfig;
use crate::scoring::{pair_sequences, score_sequences};
use crate::shards::{read_shard, ShardError};
use crate::train::data::{ShardSet, TrainDataError};
use crate::train::metrics::RunTable;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Data(#[from] TrainDataError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Shard(#[from] ShardError),
}

impl EvalError {
    pub fn exit_code(&self) -> i32 {
        match self {
            EvalError::Bundle(e) => e.exit_code(),
            EvalError::Data(e) => e.exit_code(),
            EvalError::Graph(e) => e.exit_code(),
            EvalError::Shard(e) => e.exit_code(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub model: PathBuf,
    /// Parameters to score with (safetensors with the bundle's names); None = the reference.
    pub params: Option<PathBuf>,
    pub shards: PathBuf,
    /// β used for the reported reward margin (rewards = β (log π − log π_ref)).
    pub beta: f64,
    /// Token budget of one scoring batch.
    pub batch_tokens: usize,
    pub session: SessionConfig,
    /// Optional per-pair output (Parquet).
    pub per_pair: Option<PathBuf>,
}

/// What `edpo eval` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub pairs: u64,
    pub params: String,
    /// Fraction of pairs with z > δ (the policy prefers the chosen response more than the
    /// reference does, beyond float noise δ = 1e-6·(1 + |s_w| + |s_l|)).
    pub accuracy: f64,
    /// Fraction with |z| ≤ δ (no preference either way).
    pub ties: f64,
    pub mean_z: f64,
    pub beta: f64,
    pub mean_reward_margin: f64,
    /// Mean over chosen response tokens of log π(y_t) − log π_ref(y_t).
    pub mean_token_log_ratio_chosen: f64,
    pub mean_logps_chosen: f64,
    pub mean_logps_rejected: f64,
}

struct PairScore {
    pair_id: u64,
    chosen: f64,
    rejected: f64,
    ref_chosen: f64,
    ref_rejected: f64,
    z: f64,
}

pub fn run(cfg: &EvalConfig) -> Result<EvalReport, EvalError> {
    let bundle = Bundle::open(&cfg.model)?;
    let set = ShardSet::open(&cfg.shards, &bundle.bundle_sha256)?;
    let params = match &cfg.params {
        Some(p) => Some(bundle.load_params_from(p)?),
        None => None,
    };
    let mut graph = ReferenceGraph::new(&bundle, params.as_ref(), &cfg.session)?;
    let special = &bundle.manifest.special_tokens;
    let pad = special.pad.id.or(special.eos.id).unwrap_or(0);
    let mut scores: Vec<PairScore> = Vec::with_capacity(set.pairs.len());
    let (mut ratio_sum, mut ratio_tokens) = (0.0f64, 0u64);
    for file in &set.files {
        let pairs = read_shard(file)?;
        let seqs = pair_sequences(pairs.iter().map(|p| &p.pair));
        let mut seq_token_logps: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
        score_sequences(
            &mut graph,
            &seqs,
            1,
            cfg.batch_tokens,
            pad,
            |i, out, row| {
                let prompt_len = pairs[i / 2].pair.prompt_ids.len();
                seq_token_logps[i] = (prompt_len..seqs[i].len())
                    .map(|t| out.token_logps[[row, t]])
                    .collect();
            },
        )?;
        for (n, p) in pairs.iter().enumerate() {
            let chosen_tokens = &seq_token_logps[2 * n];
            let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
            let chosen = sum(chosen_tokens);
            let rejected = sum(&seq_token_logps[2 * n + 1]);
            for (a, b) in chosen_tokens.iter().zip(&p.ref_chosen_token_logps) {
                ratio_sum += f64::from(*a) - f64::from(*b);
                ratio_tokens += 1;
            }
            let (rc, rr) = (
                f64::from(p.ref_chosen_logps),
                f64::from(p.ref_rejected_logps),
            );
            scores.push(PairScore {
                pair_id: p.pair.pair_id,
                chosen,
                rejected,
                ref_chosen: rc,
                ref_rejected: rr,
                z: (chosen - rejected) - (rc - rr),
            });
        }
    }
    let n = scores.len().max(1) as f64;
    let mut preferred = 0usize;
    let mut ties = 0usize;
    for s in &scores {
        let delta = objective::tolerance(1e-6, s.chosen, s.rejected);
        if s.z > delta {
            preferred += 1;
        } else if s.z.abs() <= delta {
            ties += 1;
        }
    }
    let mean = |f: &dyn Fn(&PairScore) -> f64| scores.iter().map(f).sum::<f64>() / n;
    let report = EvalReport {
        pairs: scores.len() as u64,
        params: cfg
            .params
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "reference".into()),
        accuracy: preferred as f64 / n,
        ties: ties as f64 / n,
        mean_z: mean(&|s| s.z),
        beta: cfg.beta,
        mean_reward_margin: cfg.beta * mean(&|s| s.z),
        mean_token_log_ratio_chosen: ratio_sum / (ratio_tokens.max(1) as f64),
        mean_logps_chosen: mean(&|s| s.chosen),
        mean_logps_rejected: mean(&|s| s.rejected),
    };
    if let Some(path) = &cfg.per_pair {
        write_per_pair(path, &scores)?;
    }
    Ok(report)
}

fn write_per_pair(path: &Path, scores: &[PairScore]) -> Result<(), ShardError> {
    let f = |name: &str| Field::new(name, DataType::Float64, false);
    let schema = Arc::new(Schema::new(vec![
        Field::new("pair_id", DataType::UInt64, false),
        f("logps_chosen"),
        f("logps_rejected"),
        f("ref_logps_chosen"),
        f("ref_logps_rejected"),
        f("z"),
    ]));
    let col = |g: &dyn Fn(&PairScore) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(scores.iter().map(g)))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt64Array::from_iter_values(
                scores.iter().map(|s| s.pair_id),
            )),
            col(&|s| s.chosen),
            col(&|s| s.rejected),
            col(&|s| s.ref_chosen),
            col(&|s| s.ref_rejected),
            col(&|s| s.z),
        ],
    )
    .map_err(|e| ShardError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut table = RunTable::new(schema);
    table.push(batch);
    table.save(path)
}

impl EvalReport {
    pub fn to_table(&self) -> String {
        format!(
            "eval: {} pairs scored with {}\n\
             \x20 preference accuracy (z > 0)     {:.4}   (ties {:.4})\n\
             \x20 mean z                           {:+.5}\n\
             \x20 mean reward margin (β = {})  {:+.6}\n\
             \x20 KL estimate (chosen, per token)  {:+.6}\n\
             \x20 mean log-prob chosen / rejected  {:.4} / {:.4}\n",
            self.pairs,
            self.params,
            self.accuracy,
            self.ties,
            self.mean_z,
            self.beta,
            self.mean_reward_margin,
            self.mean_token_log_ratio_chosen,
            self.mean_logps_chosen,
            self.mean_logps_rejected
        )
    }
}
