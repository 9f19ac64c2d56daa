//! The train stage: ε-DPO over cached shards with the joint ONNX graph (no reference model in
//! memory), AdamW, the per-pair β rule (in the graph) and the global β schedule (here),
//! checkpoints, exact resume, metrics and per-pair records.
//!
//! `plan` orders the data, `step` computes one optimiser step, `optim` updates the parameters,
//! `checkpoint` saves and restores the run, `metrics` records it; this file drives the loop.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod step;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::dist::Ranks;
use crate::graph_cache::CacheUse;
use crate::lora;
use crate::objective;
use crate::output::Printable;
use crate::params::ParamStore;
use crate::progress::Progress;
use crate::runtime::SessionConfig;
use crate::shards::{ShardError, ShardSet};
use crate::stages::StageTimes;
use crate::Error;
use checkpoint::TrainState;
use metrics::{RunTable, StepMetrics};
use optim::{AdamW, AdamWConfig, Schedule};
use plan::StepPlan;
use step::{StepResult, StepRunner};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("`{flag}`: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("`{0}` already holds a training run; pass `--resume` to continue it, or choose another `--out`")]
    RunExists(PathBuf),
    #[error("`--resume`: the run in `{run}` was started with other settings ({differences}); resume with the same settings or start a new `--out`")]
    ResumeMismatch { run: PathBuf, differences: String },
    #[error("stopped after {count} non-finite steps in a row at step {step} (loss or gradient NaN/inf); the last checkpoint in `{run}` is intact — lower `--lr` or check the data")]
    NonFinite { count: u32, step: u64, run: PathBuf },
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
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
    /// LoRA bundles: also write the merged model (`final/merged/`).
    #[serde(skip)]
    pub merge: bool,
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
    /// `--resume` found no checkpoint (the run was killed before its first one) and started
    /// from the beginning.
    pub resume_found_no_checkpoint: bool,
    pub wall_seconds: f64,
    pub pairs_per_second: f64,
    /// Processes the run's steps were split over (MPI ranks; 1 without MPI).
    pub ranks: usize,
    /// Bytes each rank sends to the step's sums and receives back (the gradient, f32, and
    /// three f64 totals; reduced to rank 0, then broadcast); 0 for one process.
    pub sum_bytes_per_step: u64,
    /// Wall seconds by stage: opening the run, bundle and sessions (`startup`), reading pairs
    /// from shards (`load_pairs`), building micro-batches (`batch`; the online reference's
    /// graph time is `reference_run`), inside ONNX Runtime (`graph_run`), feeding parameters
    /// and accumulating gradients (`grad_accumulate`), the ranks' sums (`sum`), clipping and
    /// AdamW (`optimizer`), step tables and checkpoints (`records_and_checkpoints`), the last
    /// checkpoint and `final/` (`final`).
    pub stages: StageTimes,
    /// Whether the joint graph's optimised form came from the cache (`graph_cache`).
    pub graph_cache: CacheUse,
}

impl Printable for TrainSummary {
    fn to_table(&self) -> String {
        let mut s = format!(
            "train: {} steps, {} pairs, final loss {:.5}, β {:.6}{}\n",
            self.steps,
            self.pairs_seen,
            self.final_loss,
            self.final_beta,
            match (self.resumed_from, self.resume_found_no_checkpoint) {
                (Some(step), _) => format!(" (resumed from step {step})"),
                (None, true) => " (--resume: no checkpoint yet, started from the beginning)".into(),
                (None, false) => String::new(),
            }
        );
        if self.nonfinite_skipped > 0 {
            s.push_str(&format!(
                "  {} step(s) skipped for a non-finite loss or gradient\n",
                self.nonfinite_skipped
            ));
        }
        s.push_str(&format!(
            "  {:.1} pairs/s, wall {:.1}s\n",
            self.pairs_per_second, self.wall_seconds
        ));
        s.push_str(&format!(
            "  time: {}\n",
            self.stages.line(self.wall_seconds)
        ));
        if let Some(what) = self.graph_cache.describe() {
            s.push_str(&format!("  {what}\n"));
        }
        if self.ranks > 1 {
            s.push_str(&format!(
                "  {} ranks, {:.2} MB summed per step and rank\n",
                self.ranks,
                self.sum_bytes_per_step as f64 / 1e6
            ));
        }
        s.push_str(&format!(
            "  run folder: {} (metrics.parquet, pairs.parquet, checkpoints/, final/)\n",
            self.out.display()
        ));
        s
    }
}

fn write_err(path: &Path, e: impl ToString) -> TrainError {
    TrainError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
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

/// The resolved configuration as recorded in checkpoints, with the number of ranks (`ranks`,
/// written only for runs of several: a run of one process records none).
fn config_json(cfg: &TrainConfig, ranks: usize) -> serde_json::Value {
    let mut json = serde_json::to_value(cfg).expect("config serialises");
    if ranks > 1 {
        json["ranks"] = ranks.into();
    }
    json
}

/// The settings that differ between a saved run and now (a missing `ranks` is 1).
fn resume_differences(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let with_ranks = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.entry("ranks").or_insert_with(|| 1.into());
        }
        v
    };
    crate::config::setting_differences(&with_ranks(saved), &with_ranks(now), &RESUMABLE_DIFFERENCES)
}

/// Writes `final/`: the trained parameters as a Hugging Face model folder, or a LoRA bundle's
/// adapter as a PEFT adapter folder (with `--merge` also `final/merged/`, base + adapter).
fn write_final(
    run: &Path,
    bundle: &Bundle,
    params: &ParamStore,
    merge: bool,
) -> Result<PathBuf, Error> {
    let dir = run.join("final");
    if let Some(spec) = bundle.lora() {
        lora::write_adapter_folder(&dir, bundle, spec, params)?;
        if merge {
            lora::write_merged_model(&dir.join(lora::MERGED_DIR), bundle, spec, params)?;
        }
        return Ok(dir);
    }
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

/// How long the run is: its optimiser steps and the warm-up among them.
#[derive(Debug, Clone, Copy)]
struct RunLength {
    total_steps: u64,
    warmup: u64,
}

impl RunLength {
    fn of(cfg: &TrainConfig, pairs: usize) -> RunLength {
        let steps_per_epoch = pairs.div_ceil(cfg.batch_size) as u64;
        let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
        let warmup = cfg
            .warmup_steps
            .unwrap_or_else(|| (total_steps as f64 * cfg.warmup_ratio).ceil() as u64);
        RunLength {
            total_steps,
            warmup,
        }
    }
}

/// The run's records: `metrics.parquet` and `pairs.parquet`.
struct RunTables {
    metrics: RunTable,
    pairs: RunTable,
}

impl RunTables {
    fn new() -> Self {
        RunTables {
            metrics: RunTable::new(metrics::metrics_schema()),
            pairs: RunTable::new(metrics::pairs_schema()),
        }
    }

    /// The records of `run` of the optimiser steps before `before_step`.
    fn load(run: &Path, before_step: u64) -> Result<Self, Error> {
        Ok(RunTables {
            metrics: RunTable::load(
                &run.join(metrics::METRICS_FILE),
                metrics::metrics_schema(),
                before_step,
            )?,
            pairs: RunTable::load(
                &run.join(metrics::PAIRS_FILE),
                metrics::pairs_schema(),
                before_step,
            )?,
        })
    }

    fn save(&self, run: &Path) -> Result<(), Error> {
        self.metrics.save(&run.join(metrics::METRICS_FILE))?;
        self.pairs.save(&run.join(metrics::PAIRS_FILE))?;
        Ok(())
    }
}

/// A run in progress: its data, graphs, parameters, optimiser, state and records.
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    ranks: &'a dyn Ranks,
    bundle: Bundle,
    set: ShardSet,
    length: RunLength,
    params: ParamStore,
    optimizer: AdamW,
    state: TrainState,
    tables: RunTables,
    /// The epoch whose plan is cached, and its steps.
    plan: Option<(u64, Vec<StepPlan>)>,
    last_loss: f64,
    pairs_this_session: u64,
    session_started: Instant,
    elapsed_before: f64,
}

/// Opens the bundle and the shards and checks the settings that depend on them.
fn open_inputs(cfg: &TrainConfig) -> Result<(Bundle, ShardSet), Error> {
    cfg.validate()?;
    let bundle = Bundle::open(&cfg.model)?;
    if cfg.merge && bundle.lora().is_none() {
        return Err(lora::LoraError::MergeWithoutLora(cfg.model.clone()).into());
    }
    let set = ShardSet::open(&cfg.shards, &bundle)?;
    if set.pairs.is_empty() {
        return Err(ShardError::NoShards(cfg.shards.clone()).into());
    }
    let vocab = bundle.manifest.vocab_size;
    if let Some(topk) = cfg.online_topk {
        if topk == 0 || topk > vocab {
            return Err(TrainError::Flag {
                flag: "--topk",
                message: format!("K = {topk} must be between 1 and the vocabulary size {vocab}"),
            }
            .into());
        }
    }
    Ok((bundle, set))
}

impl<'a> Trainer<'a> {
    /// A new run, or the run in `--out` restored from its latest checkpoint (`--resume`; a
    /// run killed before its first checkpoint starts again from the beginning).
    fn open(cfg: &'a TrainConfig, ranks: &'a dyn Ranks) -> Result<(Trainer<'a>, Resumed), Error> {
        let (bundle, set) = open_inputs(cfg)?;
        let length = RunLength::of(cfg, set.pairs.len());
        let config_json = config_json(cfg, ranks.size());
        std::fs::create_dir_all(&cfg.out).map_err(|e| write_err(&cfg.out, e))?;
        // Run tables' temporary files left by a killed run.
        crate::table::remove_stale_tmp(&cfg.out);
        let existing = checkpoint::latest(&cfg.out);
        // The tensors training updates: every parameter, or a LoRA bundle's adapters.
        let mut params = bundle.load_trainable()?;
        let mut optimizer = AdamW::new(cfg.adam, &params);
        let mut state = TrainState::start(cfg.beta, cfg.seed, config_json.clone());
        let metrics_path = cfg.out.join(metrics::METRICS_FILE);
        let mut resumed_from = None;
        let mut fresh_start = false;
        checkpoint::remove_partial(&cfg.out);
        let tables = match (&existing, cfg.resume) {
            (Some(_), false) => return Err(TrainError::RunExists(cfg.out.clone()).into()),
            (None, false) if metrics_path.exists() => {
                return Err(TrainError::RunExists(cfg.out.clone()).into())
            }
            (None, false) => RunTables::new(),
            (None, true) => {
                tracing::warn!(
                    "`--resume`: `{}` has no checkpoint yet; starting from the beginning",
                    cfg.out.display()
                );
                fresh_start = true;
                RunTables::new()
            }
            (Some(dir), true) => {
                let (saved, loaded) =
                    checkpoint::load(dir, &bundle.trainable_layout(), &mut optimizer)?;
                let diffs = resume_differences(&saved.config, &config_json);
                if !diffs.is_empty() {
                    return Err(TrainError::ResumeMismatch {
                        run: cfg.out.clone(),
                        differences: diffs.join("; "),
                    }
                    .into());
                }
                params = loaded;
                resumed_from = Some(saved.step);
                state = saved;
                RunTables::load(&cfg.out, state.step)?
            }
        };
        let trainer = Trainer {
            cfg,
            ranks,
            bundle,
            set,
            length,
            params,
            optimizer,
            elapsed_before: state.elapsed_s,
            state,
            tables,
            plan: None,
            last_loss: f64::NAN,
            pairs_this_session: 0,
            session_started: Instant::now(),
        };
        let resumed = Resumed {
            from_step: resumed_from,
            fresh_start,
        };
        Ok((trainer, resumed))
    }

    /// The plan of the next step, moving to the next epoch when one ends.
    fn next_step_plan(&mut self) -> StepPlan {
        loop {
            let epoch = self.state.epoch;
            if self.plan.as_ref().map(|(e, _)| *e) != Some(epoch) {
                let steps = plan::epoch_plan(
                    &self.set,
                    self.cfg.seed,
                    epoch,
                    self.cfg.batch_size,
                    self.cfg.micro_batch,
                );
                self.plan = Some((epoch, steps));
            }
            let steps = &self.plan.as_ref().expect("set above").1;
            if let Some(step) = steps.get(self.state.step_in_epoch as usize) {
                return step.clone();
            }
            self.state.epoch += 1;
            self.state.step_in_epoch = 0;
        }
    }

    /// Applies a computed step: clipping, AdamW and the §5 β update when it is finite, else
    /// counts it as skipped. Returns the gradient norm before clipping (NaN when skipped).
    fn apply(&mut self, result: &mut StepResult, lr: f64, mean_step: f64) -> f64 {
        if !result.finite {
            self.state.nonfinite_in_a_row += 1;
            self.state.nonfinite_total += 1;
            tracing::warn!(
                step = self.state.step,
                "non-finite loss or gradient: step skipped"
            );
            return f64::NAN;
        }
        optim::clip_grad_norm(&mut result.grads, result.grad_norm, self.cfg.max_grad_norm);
        self.optimizer.update(&mut self.params, &result.grads, lr);
        self.state.adam_step = self.optimizer.step;
        self.state.beta = objective::beta_update(self.state.beta, self.cfg.epsilon, mean_step);
        self.state.nonfinite_in_a_row = 0;
        result.grad_norm
    }

    /// Appends one step's metrics and pair records and advances the run's position.
    fn record(&mut self, result: &StepResult, step: StepLog) {
        let elapsed_s = self.elapsed_before + self.session_started.elapsed().as_secs_f64();
        if self.ranks.is_root() {
            self.push_tables(result, &step, elapsed_s);
        }
        self.state.step += 1;
        self.state.step_in_epoch += 1;
        self.state.pairs_seen += result.pairs as u64;
        self.pairs_this_session += result.pairs as u64;
        self.state.elapsed_s = self.elapsed_before + self.session_started.elapsed().as_secs_f64();
        self.last_loss = result.loss;
    }

    /// Rank 0's rows of `metrics.parquet` and `pairs.parquet` for one step.
    fn push_tables(&mut self, result: &StepResult, step: &StepLog, elapsed_s: f64) {
        let r = &result.records;
        let n = r.len() as f64;
        self.tables
            .metrics
            .push(metrics::metrics_batch(&[StepMetrics {
                step: self.state.step,
                epoch: self.state.epoch,
                loss: result.loss,
                learning_rate: step.lr,
                grad_norm: step.grad_norm,
                beta: step.beta_used,
                beta_next: self.state.beta,
                avg_steps: step.mean_step,
                p_epsilon_steps: r.iter().filter(|x| x.pair_step > 0).count() as f64 / n,
                n_epsilon_steps: r.iter().filter(|x| x.pair_step < 0).count() as f64 / n,
                rewards_chosen: mean(r.iter().map(|x| x.reward_chosen)),
                rewards_rejected: mean(r.iter().map(|x| x.reward_rejected)),
                rewards_margins: mean(r.iter().map(|x| x.reward_chosen - x.reward_rejected)),
                rewards_accuracies: accuracy(result),
                logps_chosen: mean(r.iter().map(|x| x.logps_chosen)),
                logps_rejected: mean(r.iter().map(|x| x.logps_rejected)),
                pairs: r.len() as u64,
                pairs_per_s: n / step.seconds.max(1e-9),
                skipped_nonfinite: !result.finite,
                elapsed_s,
            }]));
        self.tables.pairs.push(metrics::pairs_batch(r));
    }

    fn pairs_per_second(&self) -> f64 {
        self.pairs_this_session as f64 / self.session_started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Writes the run tables and a checkpoint (rank 0; the other ranks have nothing to write).
    fn save(&self) -> Result<(), Error> {
        if !self.ranks.is_root() {
            return Ok(());
        }
        self.tables.save(&self.cfg.out)?;
        crate::crash::point("train.tables-saved");
        checkpoint::save(
            &self.cfg.out,
            &self.state,
            &self.params,
            &self.optimizer,
            self.cfg.keep_checkpoints,
        )?;
        Ok(())
    }

    /// Trains until the last step, checkpointing every `--save-every` steps.
    fn train(&mut self, runner: &mut StepRunner, progress: &Progress) -> Result<(), Error> {
        let RunLength {
            total_steps,
            warmup,
        } = self.length;
        self.session_started = Instant::now();
        while self.state.step < total_steps {
            let step_plan = self.next_step_plan();
            let started = Instant::now();
            let lr = self.cfg.lr
                * optim::lr_factor(self.cfg.schedule, self.state.step, warmup, total_steps);
            let beta_used = self.state.beta;
            let mut result = runner.run(
                self.ranks,
                &self.set,
                &step_plan,
                &self.params,
                beta_used,
                self.state.step,
            )?;
            let mean_step = result.mean_step;
            let grad_norm = runner
                .times
                .time("optimizer", || self.apply(&mut result, lr, mean_step));
            let log = StepLog {
                lr,
                grad_norm,
                beta_used,
                mean_step,
                seconds: started.elapsed().as_secs_f64(),
            };
            runner
                .times
                .time("records_and_checkpoints", || self.record(&result, log));
            runner.recycle(std::mem::take(&mut result.grads));
            progress.inc(1);
            progress.set_message(format!(
                "loss {:.4} β {:.5} acc {:.2} {:.1} pairs/s",
                result.loss,
                self.state.beta,
                accuracy(&result),
                self.pairs_per_second()
            ));
            if self.state.nonfinite_in_a_row >= 3 {
                progress.finish();
                return Err(TrainError::NonFinite {
                    count: self.state.nonfinite_in_a_row,
                    step: self.state.step,
                    run: self.cfg.out.clone(),
                }
                .into());
            }
            let every = self.cfg.save_every;
            if every > 0 && self.state.step.is_multiple_of(every) && self.state.step < total_steps {
                runner
                    .times
                    .time("records_and_checkpoints", || self.save())?;
            }
        }
        Ok(())
    }
}

/// How `--resume` went.
#[derive(Debug, Clone, Copy, Default)]
struct Resumed {
    /// The checkpoint's step the run continued from.
    from_step: Option<u64>,
    /// `--resume` found no checkpoint, so the run started from the beginning.
    fresh_start: bool,
}

/// What a step used and measured besides its result.
struct StepLog {
    lr: f64,
    grad_norm: f64,
    beta_used: f64,
    /// Mean per-pair step k̄ of the step (drives the global β update).
    mean_step: f64,
    seconds: f64,
}

/// Fraction of a step's pairs whose chosen reward exceeds the rejected one.
fn accuracy(result: &StepResult) -> f64 {
    mean(
        result
            .records
            .iter()
            .map(|x| f64::from(u8::from(x.reward_chosen > x.reward_rejected))),
    )
}

/// Runs (or resumes) training among `ranks` (one process, or MPI ranks splitting each step's
/// micro-batches; rank 0 writes the run folder).
pub fn run(cfg: &TrainConfig, ranks: &dyn Ranks) -> Result<TrainSummary, Error> {
    let started = Instant::now();
    let (mut trainer, resumed) = Trainer::open(cfg, ranks)?;
    // No rank writes before every rank has looked at the run folder.
    ranks.barrier();
    let mut runner = StepRunner::new(&trainer.bundle, &trainer.set, cfg, &trainer.params)?;
    let mut stages = StageTimes::default();
    stages.add("startup", started.elapsed().as_secs_f64());
    let quiet = cfg.quiet || !ranks.is_root();
    let progress = Progress::new(trainer.length.total_steps, "steps", quiet);
    progress.set_position(trainer.state.step);
    trainer.train(&mut runner, &progress)?;
    progress.finish();
    // The loop's rate: measured before the last checkpoint and `final/` are written.
    let pairs_per_second = trainer.pairs_per_second();
    stages.merge(&runner.times);
    let graph_cache = runner.train_graph().cache_use().clone();
    drop(runner); // the graphs' memory, before a merge reads the base weights
    stages.time("final", || -> Result<(), Error> {
        trainer.save()?;
        if ranks.is_root() {
            write_final(&cfg.out, &trainer.bundle, &trainer.params, cfg.merge)?;
        }
        Ok(())
    })?;
    Ok(TrainSummary {
        out: cfg.out.clone(),
        steps: trainer.state.step,
        pairs_seen: trainer.state.pairs_seen,
        final_beta: trainer.state.beta,
        final_loss: trainer.last_loss,
        nonfinite_skipped: trainer.state.nonfinite_total,
        resumed_from: resumed.from_step,
        resume_found_no_checkpoint: resumed.fresh_start,
        wall_seconds: started.elapsed().as_secs_f64(),
        pairs_per_second,
        ranks: ranks.size(),
        sum_bytes_per_step: if ranks.size() > 1 {
            4 * trainer.params.num_elements() as u64 + 3 * 8
        } else {
            0
        },
        stages,
        graph_cache,
    })
}
