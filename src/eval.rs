//! `edpo eval`: score the pairs of a shards folder with some parameters (a checkpoint, a
//! `final/` model, or the reference itself) and report preference accuracy, reward margins,
//! z and a per-token KL estimate against the cached reference.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use serde::Serialize;

use crate::batch::pair_of_row;
use crate::bundle::Bundle;
use crate::data::tokenize::TokenizedPair;
use crate::data::Side;
use crate::graphs::ReferenceGraph;
use crate::objective;
use crate::output::Printable;
use crate::runtime::SessionConfig;
use crate::scoring::score_pair_rows;
use crate::shards::{read_shard, ScoredPair, ShardSet};
use crate::table::{self, ParquetLayout};
use crate::Error;

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

/// Scores one shard's pairs with `graph` (label log-probs only) and adds the chosen tokens'
/// log-ratio against the cached reference to `ratio` (sum, tokens).
fn score_shard(
    graph: &mut ReferenceGraph,
    pairs: &[ScoredPair],
    cfg: &EvalConfig,
    pad_id: u32,
    ratio: &mut (f64, u64),
) -> Result<Vec<PairScore>, Error> {
    let tokenized: Vec<&TokenizedPair> = pairs.iter().map(|p| &p.pair).collect();
    let n = pairs.len();
    let mut row_logps: Vec<Vec<f32>> = vec![Vec::new(); 2 * n];
    score_pair_rows(
        graph,
        &tokenized,
        1,
        cfg.batch_tokens,
        pad_id,
        |row, out, r| {
            let (index, side) = pair_of_row(row, n);
            let start = tokenized[index].prompt_ids.len();
            let end = start + tokenized[index].response(side).len();
            row_logps[row] = (start..end).map(|t| out.token_logps[[r, t]]).collect();
        },
    )?;
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    let mut scores = Vec::with_capacity(n);
    for (index, p) in pairs.iter().enumerate() {
        let chosen_tokens = &row_logps[crate::batch::row_of(index, Side::Chosen, n)];
        let chosen = sum(chosen_tokens);
        let rejected = sum(&row_logps[crate::batch::row_of(index, Side::Rejected, n)]);
        for (a, b) in chosen_tokens.iter().zip(&p.chosen.token_logps) {
            ratio.0 += f64::from(*a) - f64::from(*b);
            ratio.1 += 1;
        }
        let (rc, rr) = (f64::from(p.chosen.logps), f64::from(p.rejected.logps));
        scores.push(PairScore {
            pair_id: p.pair.pair_id,
            chosen,
            rejected,
            ref_chosen: rc,
            ref_rejected: rr,
            z: (chosen - rejected) - (rc - rr),
        });
    }
    Ok(scores)
}

/// The report over every pair's score.
fn summarise(cfg: &EvalConfig, scores: &[PairScore], ratio: (f64, u64)) -> EvalReport {
    let n = scores.len().max(1) as f64;
    let mut preferred = 0usize;
    let mut ties = 0usize;
    for s in scores {
        let delta = objective::tolerance(1e-6, s.chosen, s.rejected);
        if s.z > delta {
            preferred += 1;
        } else if s.z.abs() <= delta {
            ties += 1;
        }
    }
    let mean = |f: &dyn Fn(&PairScore) -> f64| scores.iter().map(f).sum::<f64>() / n;
    EvalReport {
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
        mean_token_log_ratio_chosen: ratio.0 / (ratio.1.max(1) as f64),
        mean_logps_chosen: mean(&|s| s.chosen),
        mean_logps_rejected: mean(&|s| s.rejected),
    }
}

pub fn run(cfg: &EvalConfig) -> Result<EvalReport, Error> {
    let bundle = Bundle::open(&cfg.model)?;
    let set = ShardSet::open(&cfg.shards, &bundle)?;
    let params = match &cfg.params {
        Some(p) => Some(bundle.policy_weights_from(p)?),
        None => None,
    };
    let mut graph = ReferenceGraph::new(&bundle, params.as_ref(), &cfg.session)?;
    let pad_id = bundle.manifest.special_tokens.pad_id();
    let mut scores: Vec<PairScore> = Vec::with_capacity(set.pairs.len());
    let mut ratio = (0.0f64, 0u64);
    for file in &set.files {
        let pairs = read_shard(file)?;
        scores.extend(score_shard(&mut graph, &pairs, cfg, pad_id, &mut ratio)?);
    }
    let report = summarise(cfg, &scores, ratio);
    if let Some(path) = &cfg.per_pair {
        write_per_pair(path, &scores)?;
    }
    Ok(report)
}

fn write_per_pair(path: &Path, scores: &[PairScore]) -> Result<(), Error> {
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
    );
    Ok(table::write_parquet(
        path,
        schema,
        [batch],
        &ParquetLayout::default(),
    )?)
}

impl Printable for EvalReport {
    fn to_table(&self) -> String {
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
