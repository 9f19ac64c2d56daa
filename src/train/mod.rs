//! The train stage: ε-DPO over cached shards with the joint ONNX graph (no reference model in
//! memory), AdamW, the per-pair β rule (in the graph) and the global β schedule (here),
//! checkpoints, exact resume, metrics and per-pair records.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, BundleError};
use crate::graphs::{GraphError, LossSettings, ReferenceGraph, TrainGraph};
use crate::objective;
use crate::params::ParamStore;
use crate::progress::Progress;
use crate::runtime::SessionConfig;
use crate::shards::{ScoredPair, ShardError};
use checkpoint::{CheckpointError, TrainState};
use data::{PairLoader, ShardSet, TrainDataError};
use metrics::{PairRecord, RunTable, StepMetrics};
use optim::{AdamW, AdamWConfig, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Data(#[from] TrainDataError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("`{flag}`: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("`{0}` already holds a training run; pass `--resume` to continue it, or choose another `--out`")]
    RunExists(PathBuf),
    #[error("`--resume`: `{0}` has no checkpoint to resume from")]
    NothingToResume(PathBuf),
    #[error("`--resume`: the run in `{run}` was started with other settings ({differences}); resume with the same settings or start a new `--out`")]
    ResumeMismatch { run: PathBuf, differences: String },
    #[error("stopped after {count} non-finite steps in a row at step {step} (loss or gradient NaN/inf); the last checkpoint in `{run}` is intact — lower `--lr` or check the data")]
    NonFinite { count: u32, step: u64, run: PathBuf },
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

impl TrainError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Bundle(e) => e.exit_code(),
            TrainError::Data(e) => e.exit_code(),
            TrainError::Graph(e) => e.exit_code(),
            TrainError::Shard(e) => e.exit_code(),
            TrainError::Checkpoint(_) | TrainError::NonFinite { .. } | TrainError::Write { .. } => {
                1
            }
            _ => 2,
        }
    }
}

/// Where the reference comes from during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceMode {
    /// The shards' cached top-K (objective.md §7).
    Cached,
    /// The bundle's scoring graph run during training (K = vocabulary: the exact ε-step).
    Online,
}

/// Checked training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub shards: PathBuf,
    pub out: PathBuf,
    pub beta: f64,
    pub epsilon: f64,
    pub lr: f64,
    pub label_smoothing: f64,
    pub step_tolerance: f64,
    pub batch_size: usize,
    pub micro_batch: usize,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub seed: u64,
    pub reference: ReferenceMode,
    /// K of the online reference (None = vocabulary size).
    pub online_topk: Option<usize>,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub max_grad_norm: f64,
    pub adam: AdamWConfig,
    pub save_every: u64,
    pub keep_checkpoints: usize,
    #[serde(skip)]
    pub resume: bool,
    #[serde(skip)]
    pub session: SessionConfig,
    #[serde(skip)]
    pub quiet: bool,
}

/// Settings that may change between a run and its resumption.
const RESUMABLE_DIFFERENCES: [&str; 3] = ["save_every", "keep_checkpoints", "out"];

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let flag = |flag, message: &str| {
            Err(TrainError::Flag {
                flag,
                message: message.to_string(),
            })
        };
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return flag("--beta", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.epsilon) {
            return flag("--epsilon", "must be in [0, 1)");
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return flag("--lr", "must be ≥ 0");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return flag("--label-smoothing", "must be in [0, 0.5)");
        }
        if self.batch_size == 0 {
            return flag("--batch-size", "must be at least 1 pair");
        }
        if self.micro_batch == 0 || self.micro_batch > self.batch_size {
            return flag("--micro-batch", "must be between 1 and --batch-size");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return flag("--epochs", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return flag("--warmup-ratio", "must be in [0, 1]");
        }
        Ok(())
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps: u64,
    pub pairs_seen: u64,
    pub final_beta: f64,
    pub final_loss: f64,
    pub nonfinite_skipped: u64,
    pub resumed_from: Option<u64>,
    pub wall_seconds: f64,
    pub pairs_per_second: f64,
}

fn write_err(path: &Path, e: impl ToString) -> TrainError {
    TrainError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Everything one optimiser step computed.
struct StepResult {
    loss: f64,
    grads: Vec<Vec<f32>>,
    records: Vec<PairRecord>,
    finite: bool,
}

struct Trainer<'a> {
    cfg: &'a TrainConfig,
    bundle: Bundle,
    set: ShardSet,
    train: TrainGraph,
    reference: Option<ReferenceGraph>,
    loader: PairLoader,
    pad_id: u32,
    k_cached: usize,
    k_online: i64,
}

impl Trainer<'_> {
    fn run_step(
        &mut self,
        plan: &data::StepPlan,
        params: &ParamStore,
        beta: f64,
        step: u64,
    ) -> Result<StepResult, TrainError> {
        let total = plan.num_pairs() as f64;
        let settings = LossSettings {
            beta: beta as f32,
            epsilon: self.cfg.epsilon as f32,
            label_smoothing: self.cfg.label_smoothing as f32,
            step_tolerance: self.cfg.step_tolerance as f32,
        };
        let mut grads: Vec<Vec<f32>> = params.zeros_like();
        let mut loss = 0.0f64;
        let mut finite = true;
        let mut records = Vec::with_capacity(plan.num_pairs());
        for mb in &plan.micro_batches {
            let pairs: Vec<ScoredPair> = mb
                .iter()
                .map(|&i| self.loader.get(&self.set.pairs[i]))
                .collect::<Result<_, _>>()?;
            let batch = match self.reference.as_mut() {
                None => data::cached_batch(&pairs, self.pad_id, self.k_cached),
                Some(reference) => {
                    let seq = data::sequences(&pairs, self.pad_id);
                    let scores = reference.score(
                        seq.input_ids.view(),
                        seq.attention_mask.view(),
                        self.k_online,
                    )?;
                    data::online_batch(seq, scores)
                }
            };
            let weight = mb.len() as f64 / total;
            let out = self
                .train
                .run(params, &batch, &settings, &mut grads, weight as f32)?;
            if !out.loss.is_finite() {
                finite = false;
            }
            loss += weight * f64::from(out.loss);
            let b = pairs.len();
            for (j, pair) in pairs.iter().enumerate() {
                let k = out.steps[j].clamp(-1, 1) as i8;
                let beta_i = objective::pair_beta(beta, self.cfg.epsilon, k);
                let (lc, lr) = (f64::from(out.logps[j]), f64::from(out.logps[j + b]));
                let (rc, rr) = (
                    f64::from(batch.ref_logps[j]),
                    f64::from(batch.ref_logps[j + b]),
                );
                let g = lc - lr;
                records.push(PairRecord {
                    pair_id: pair.pair.pair_id,
                    step,
                    k,
                    beta_i,
                    z: g - (rc - rr),
                    g,
                    g_plus: f64::from(out.logps_plus[j]) - f64::from(out.logps_plus[j + b]),
                    g_minus: f64::from(out.logps_minus[j]) - f64::from(out.logps_minus[j + b]),
                    reward_chosen: beta_i * (lc - rc),
                    reward_rejected: beta_i * (lr - rr),
                    logps_chosen: lc,
                    logps_rejected: lr,
                    ref_chosen: rc,
                    ref_rejected: rr,
                });
            }
        }
        if !optim::global_norm(&grads).is_finite() {
            finite = false;
        }
        Ok(StepResult {
            loss,
            grads,
            records,
            finite,
        })
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn resume_differences(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return vec!["config".into()];
    };
    let mut diffs = Vec::new();
    for (key, value) in now {
        if RESUMABLE_DIFFERENCES.contains(&key.as_str()) {
            continue;
        }
        if saved.get(key) != Some(value) {
            diffs.push(format!(
                "{key}: {} then, {} now",
                saved
                    .get(key)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "unset".into()),
                value
            ));
        }
    }
    diffs
}

/// Writes `final/`: the trained parameters as a Hugging Face model folder.
fn write_final(run: &Path, bundle: &Bundle, params: &ParamStore) -> Result<PathBuf, TrainError> {
    let dir = run.join("final");
    std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    params
        .save(&dir.join("model.safetensors"), Some(meta))
        .map_err(|e| write_err(&dir, e))?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let src = bundle.path(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| write_err(&dir.join(f), e))?;
        }
    }
    Ok(dir)
}

/// Runs (or resumes) training.
pub fn run(cfg: &TrainConfig) -> Result<TrainSummary, TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let bundle = Bundle::open(&cfg.model)?;
    let set = ShardSet::open(&cfg.shards, &bundle.bundle_sha256)?;
    if set.pairs.is_empty() {
        return Err(TrainDataError::NoShards(cfg.shards.clone()).into());
    }
    let vocab = bundle.manifest.vocab_size;
    if let Some(k) = cfg.online_topk {
        if k == 0 || k > vocab {
            return Err(TrainError::Flag {
                flag: "--topk",
                message: format!("K = {k} must be between 1 and the vocabulary size {vocab}"),
            });
        }
    }
    let layout = bundle.param_layout();
    let steps_per_epoch = set.pairs.len().div_ceil(cfg.batch_size) as u64;
    let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
    let warmup = cfg
        .warmup_steps
        .unwrap_or_else(|| (total_steps as f64 * cfg.warmup_ratio).ceil() as u64);
    let config_json = serde_json::to_value(cfg).expect("config serialises");

    std::fs::create_dir_all(&cfg.out).map_err(|e| write_err(&cfg.out, e))?;
    let existing = checkpoint::latest(&cfg.out);
    let mut params = bundle.load_params()?;
    let mut optimizer = AdamW::new(cfg.adam, &params);
    let mut state = TrainState {
        step: 0,
        adam_step: 0,
        epoch: 0,
        step_in_epoch: 0,
        beta: cfg.beta,
        seed: cfg.seed,
        nonfinite_in_a_row: 0,
        nonfinite_total: 0,
        pairs_seen: 0,
        elapsed_s: 0.0,
        config: config_json.clone(),
    };
    let metrics_path = cfg.out.join("metrics.parquet");
    let pairs_path = cfg.out.join("pairs.parquet");
    let mut resumed_from = None;
    let (mut metrics_table, mut pairs_table) = match (&existing, cfg.resume) {
        (Some(_), false) => return Err(TrainError::RunExists(cfg.out.clone())),
        (None, false) if metrics_path.exists() => {
            return Err(TrainError::RunExists(cfg.out.clone()))
        }
        (None, true) => return Err(TrainError::NothingToResume(cfg.out.clone())),
        (None, false) => (
            RunTable::new(metrics::metrics_schema()),
            RunTable::new(metrics::pairs_schema()),
        ),
        (Some(dir), true) => {
            let (saved, loaded) = checkpoint::load(dir, &layout, &mut optimizer)?;
            let diffs = resume_differences(&saved.config, &config_json);
            if !diffs.is_empty() {
                return Err(TrainError::ResumeMismatch {
                    run: cfg.out.clone(),
                    differences: diffs.join("; "),
                });
            }
            params = loaded;
            resumed_from = Some(saved.step);
            state = saved;
            (
                RunTable::load(&metrics_path, metrics::metrics_schema(), state.step)?,
                RunTable::load(&pairs_path, metrics::pairs_schema(), state.step)?,
            )
        }
    };

    let special = &bundle.manifest.special_tokens;
    let pad_id = special.pad.id.or(special.eos.id).unwrap_or(0);
    let reference = match cfg.reference {
        ReferenceMode::Cached => None,
        ReferenceMode::Online => Some(ReferenceGraph::new(&bundle, None, &cfg.session)?),
    };
    let mut trainer = Trainer {
        cfg,
        train: TrainGraph::new(&bundle, &cfg.session)?,
        reference,
        loader: PairLoader::new(&set),
        k_cached: set.topk(),
        k_online: cfg.online_topk.unwrap_or(vocab) as i64,
        pad_id,
        bundle,
        set,
    };

    let progress = Progress::new(total_steps, "steps", cfg.quiet);
    progress.set_position(state.step);
    let mut plan_cache: Option<(u64, Vec<data::StepPlan>)> = None;
    let mut last_loss = f64::NAN;
    let session_started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let save = |state: &TrainState,
                params: &ParamStore,
                optimizer: &AdamW,
                metrics_table: &RunTable,
                pairs_table: &RunTable|
     -> Result<(), TrainError> {
        metrics_table.save(&metrics_path)?;
        pairs_table.save(&pairs_path)?;
        checkpoint::save(&cfg.out, state, params, optimizer, cfg.keep_checkpoints)?;
        Ok(())
    };
    let mut pairs_this_session = 0u64;
    while state.step < total_steps {
        if plan_cache.as_ref().map(|(e, _)| *e) != Some(state.epoch) {
            let plan = data::epoch_plan(
                &trainer.set,
                cfg.seed,
                state.epoch,
                cfg.batch_size,
                cfg.micro_batch,
            );
            plan_cache = Some((state.epoch, plan));
        }
        let plan = &plan_cache.as_ref().expect("set above").1;
        if state.step_in_epoch as usize >= plan.len() {
            state.epoch += 1;
            state.step_in_epoch = 0;
            continue;
        }
        let step_plan = plan[state.step_in_epoch as usize].clone();
        let t0 = Instant::now();
        let lr = cfg.lr * optim::lr_factor(cfg.schedule, state.step, warmup, total_steps);
        let mut result = trainer.run_step(&step_plan, &params, state.beta, state.step)?;
        let beta_used = state.beta;
        let n = result.records.len() as f64;
        let kbar = mean(result.records.iter().map(|r| f64::from(r.k)));
        let mut grad_norm = f64::NAN;
        if result.finite {
            grad_norm = optim::clip_grad_norm(&mut result.grads, cfg.max_grad_norm);
            optimizer.update(&mut params, &result.grads, lr);
            state.adam_step = optimizer.step;
            state.beta = objective::beta_update(state.beta, cfg.epsilon, kbar);
            state.nonfinite_in_a_row = 0;
        } else {
            state.nonfinite_in_a_row += 1;
            state.nonfinite_total += 1;
            tracing::warn!(
                step = state.step,
                "non-finite loss or gradient: step skipped"
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        let r = &result.records;
        metrics_table.push(metrics::metrics_batch(&[StepMetrics {
            step: state.step,
            epoch: state.epoch,
            loss: result.loss,
            learning_rate: lr,
            grad_norm,
            beta: beta_used,
            beta_next: state.beta,
            avg_steps: kbar,
            p_epsilon_steps: r.iter().filter(|x| x.k > 0).count() as f64 / n,
            n_epsilon_steps: r.iter().filter(|x| x.k < 0).count() as f64 / n,
            rewards_chosen: mean(r.iter().map(|x| x.reward_chosen)),
            rewards_rejected: mean(r.iter().map(|x| x.reward_rejected)),
            rewards_margins: mean(r.iter().map(|x| x.reward_chosen - x.reward_rejected)),
            rewards_accuracies: mean(
                r.iter()
                    .map(|x| f64::from(u8::from(x.reward_chosen > x.reward_rejected))),
            ),
            logps_chosen: mean(r.iter().map(|x| x.logps_chosen)),
            logps_rejected: mean(r.iter().map(|x| x.logps_rejected)),
            pairs: r.len() as u64,
            pairs_per_s: n / secs.max(1e-9),
            skipped_nonfinite: !result.finite,
            elapsed_s: elapsed_before + session_started.elapsed().as_secs_f64(),
        }]));
        pairs_table.push(metrics::pairs_batch(&result.records));
        state.step += 1;
        state.step_in_epoch += 1;
        state.pairs_seen += r.len() as u64;
        pairs_this_session += r.len() as u64;
        state.elapsed_s = elapsed_before + session_started.elapsed().as_secs_f64();
        last_loss = result.loss;
        progress.inc(1);
        progress.set_message(format!(
            "loss {:.4} β {:.5} acc {:.2} {:.1} pairs/s",
            result.loss,
            state.beta,
            mean(
                r.iter()
                    .map(|x| f64::from(u8::from(x.reward_chosen > x.reward_rejected)))
            ),
            pairs_this_session as f64 / session_started.elapsed().as_secs_f64().max(1e-9)
        ));
        if state.nonfinite_in_a_row >= 3 {
            progress.finish();
            return Err(TrainError::NonFinite {
                count: state.nonfinite_in_a_row,
                step: state.step,
                run: cfg.out.clone(),
            });
        }
        if cfg.save_every > 0
            && state.step.is_multiple_of(cfg.save_every)
            && state.step < total_steps
        {
            save(&state, &params, &optimizer, &metrics_table, &pairs_table)?;
        }
    }
    progress.finish();
    save(&state, &params, &optimizer, &metrics_table, &pairs_table)?;
    write_final(&cfg.out, &trainer.bundle, &params)?;
    let wall = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        out: cfg.out.clone(),
        steps: state.step,
        pairs_seen: state.pairs_seen,
        final_beta: state.beta,
        final_loss: last_loss,
        nonfinite_skipped: state.nonfinite_total,
        resumed_from,
        wall_seconds: wall,
        pairs_per_second: pairs_this_session as f64
            / session_started.elapsed().as_secs_f64().max(1e-9),
    })
}
