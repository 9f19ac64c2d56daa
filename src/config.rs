//! Configuration of every command: the defaults (written once, here, as `impl Default`), the
//! `--config` TOML file and the command-line flags layered over them, and the checked stage
//! configurations they resolve to.
//!
//! Layers, lowest first: the settings type's `Default`, the TOML file (keys named like the
//! flags), the flags. A layer leaves a setting to the layer below when it does not give it: an
//! absent flag or key (`None`), a switch not passed (`false`), an empty list.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::{EvalArgs, GlobalArgs, PrepArgs, StudyKArgs, TrainArgs, VerifyArgs};
use crate::data::tokenize::{ResponseEos, Truncation};
use crate::data::{Columns, Format, PromptMismatch};
use crate::eval::EvalConfig;
use crate::prep::worker::{self, Worker, WorkerError};
use crate::prep::PrepConfig;
use crate::runtime::{Device, SessionConfig};
use crate::study::{Estimator, StudyConfig};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::{ReferenceMode, TrainConfig};

/// A problem with `--config FILE`, a required flag or a flag's value (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("`--config {path}`: {message}")]
    File { path: PathBuf, message: String },
    #[error("`--{0}` is required (on the command line or in `--config`)")]
    Missing(&'static str),
    #[error("`--{flag}`: {message}")]
    Value { flag: &'static str, message: String },
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Settings of `edpo prep` (keys of its `--config` file and names of its flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrepSettings {
    pub model: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub out: Option<PathBuf>,
    pub format: Format,
    pub prompt_column: String,
    pub chosen_column: String,
    pub rejected_column: String,
    pub id_column: String,
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub response_eos: ResponseEos,
    pub prompt_mismatch: PromptMismatch,
    pub topk: Option<usize>,
    pub device: String,
    pub batch_tokens: Option<usize>,
    pub shard_size: usize,
    pub limit: Option<u64>,
    pub overwrite: bool,
    pub worker: Option<String>,
    pub workers: Option<usize>,
    pub finalize: bool,
}

impl Default for PrepSettings {
    fn default() -> Self {
        let columns = Columns::default();
        PrepSettings {
            model: None,
            data: Vec::new(),
            out: None,
            format: Format::Auto,
            prompt_column: columns.prompt,
            chosen_column: columns.chosen,
            rejected_column: columns.rejected,
            id_column: columns.id,
            max_length: None,
            max_prompt_length: None,
            response_eos: ResponseEos::Always,
            prompt_mismatch: PromptMismatch::Skip,
            topk: None,
            device: "cpu".into(),
            batch_tokens: None,
            shard_size: 2048,
            limit: None,
            overwrite: false,
            worker: None,
            workers: None,
            finalize: false,
        }
    }
}

/// Settings of `edpo train` (keys of its `--config` file and names of its flags). The
/// defaults are the paper's reference hyper-parameters where it gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainSettings {
    pub model: Option<PathBuf>,
    pub shards: Option<PathBuf>,
    pub out: Option<PathBuf>,
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
    pub topk: Option<usize>,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub save_every: u64,
    pub keep_checkpoints: usize,
    pub resume: bool,
    pub merge: bool,
    pub device: String,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            model: None,
            shards: None,
            out: None,
            beta: 0.01,
            epsilon: 0.01,
            lr: 3e-7,
            label_smoothing: 0.0,
            step_tolerance: 1e-6,
            batch_size: 128,
            micro_batch: 8,
            epochs: 1,
            max_steps: None,
            seed: 42,
            reference: ReferenceMode::Cached,
            topk: None,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.1,
            warmup_steps: None,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            save_every: 0,
            keep_checkpoints: 2,
            resume: false,
            merge: false,
            device: "cpu".into(),
        }
    }
}

/// Settings of `edpo eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EvalSettings {
    pub model: Option<PathBuf>,
    pub params: Option<PathBuf>,
    pub shards: Option<PathBuf>,
    pub beta: f64,
    pub batch_tokens: Option<usize>,
    pub device: String,
    pub per_pair: Option<PathBuf>,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            model: None,
            params: None,
            shards: None,
            beta: 0.01,
            batch_tokens: None,
            device: "cpu".into(),
            per_pair: None,
        }
    }
}

/// Settings of `edpo study-k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StudyKSettings {
    pub model: Option<PathBuf>,
    pub shards: Option<PathBuf>,
    pub params: Option<PathBuf>,
    /// Top-K sizes as written on the command line; `V` is the whole vocabulary.
    pub topks: Vec<String>,
    pub epsilon: f64,
    pub step_tolerance: f64,
    pub limit: usize,
    pub estimators: Vec<Estimator>,
    pub seed: u64,
}

impl Default for StudyKSettings {
    fn default() -> Self {
        StudyKSettings {
            model: None,
            shards: None,
            params: None,
            topks: ["1", "2", "4", "8", "16", "32", "64", "128", "256", "V"]
                .map(String::from)
                .to_vec(),
            epsilon: 0.01,
            step_tolerance: 1e-6,
            limit: 200,
            estimators: vec![Estimator::Topk],
            seed: 0,
        }
    }
}

/// Settings of `edpo verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VerifySettings {
    pub model: Option<PathBuf>,
    pub device: String,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            model: None,
            device: "cpu".into(),
        }
    }
}

/// The default of every setting of `command` (a subcommand's name), as the JSON object whose
/// keys are the flags' names: what `--help` shows as `[default: …]`.
pub fn defaults_of(command: &str) -> Option<serde_json::Map<String, Value>> {
    let value = match command {
        "prep" => serde_json::to_value(PrepSettings::default()),
        "train" => serde_json::to_value(TrainSettings::default()),
        "eval" => serde_json::to_value(EvalSettings::default()),
        "study-k" => serde_json::to_value(StudyKSettings::default()),
        "verify" => serde_json::to_value(VerifySettings::default()),
        _ => return None,
    };
    match value {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Overlays `layer` on `base`: every key the layer gives (not null, not `false`, not an empty
/// list) replaces the base's value.
fn overlay(base: &mut serde_json::Map<String, Value>, layer: Value) {
    let Value::Object(layer) = layer else {
        return;
    };
    for (key, value) in layer {
        let given = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::Array(items) => !items.is_empty(),
            _ => true,
        };
        if given {
            base.insert(key, value);
        }
    }
}

/// Defaults of `S`, then each layer over them (each a serialisable flags value).
fn layered<S: Default + Serialize + DeserializeOwned>(layers: &[Value]) -> Result<S, ConfigError> {
    let internal = |e: serde_json::Error| ConfigError::Value {
        flag: "config",
        message: format!("settings do not resolve: {e}"),
    };
    let Value::Object(mut merged) = serde_json::to_value(S::default()).map_err(internal)? else {
        unreachable!("settings serialise to an object");
    };
    for layer in layers {
        overlay(&mut merged, layer.clone());
    }
    serde_json::from_value(Value::Object(merged)).map_err(internal)
}

/// Reads a `--config` TOML file as the command's flags (keys named like the flags).
pub fn read_config_file<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let file_err = |message: String| ConfigError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| file_err(e.to_string()))
}

fn as_layer(args: &impl Serialize) -> Value {
    serde_json::to_value(args).unwrap_or(Value::Null)
}

fn required<T>(value: Option<T>, flag: &'static str) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing(flag))
}

fn session(device: &str, global: &GlobalArgs) -> Result<SessionConfig, ConfigError> {
    let device: Device =
        device
            .parse()
            .map_err(|e: crate::runtime::RuntimeError| ConfigError::Value {
                flag: "device",
                message: e.to_string(),
            })?;
    Ok(SessionConfig {
        device,
        threads: global.threads,
        graph_cache: global.graph_cache.clone(),
    })
}

/// The top-level settings that differ between a recorded run (`then`) and this one (`now`),
/// as `key: value then, value now`, leaving out the keys in `ignore` (what a user reads when a
/// resume is refused).
pub fn setting_differences(then: &Value, now: &Value, ignore: &[&str]) -> Vec<String> {
    let (Some(then), Some(now)) = (then.as_object(), now.as_object()) else {
        return vec!["settings".into()];
    };
    let mut keys: Vec<&String> = now.keys().chain(then.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or("unset".into(), |v| v.to_string());
    keys.into_iter()
        .filter(|key| !ignore.contains(&key.as_str()) && then.get(*key) != now.get(*key))
        .map(|key| {
            format!(
                "{key}: {} then, {} now",
                show(then.get(key)),
                show(now.get(key))
            )
        })
        .collect()
}

/// `--batch-tokens` as given, or the default for the device the graph runs on.
fn batch_tokens(given: Option<usize>, session: &SessionConfig) -> usize {
    given.unwrap_or_else(|| crate::batch::default_batch_tokens(session.device))
}

/// `edpo prep`'s flags over its `--config` file over the defaults.
pub fn prep_settings(args: &PrepArgs) -> Result<PrepSettings, ConfigError> {
    let file: PrepArgs = read_config_file(args.config.as_deref())?;
    layered(&[as_layer(&file), as_layer(args)])
}

/// The checked configuration of an `edpo prep` run.
pub fn prep_config(args: &PrepArgs, global: &GlobalArgs) -> Result<PrepConfig, ConfigError> {
    let s = prep_settings(args)?;
    if s.data.is_empty() {
        return Err(ConfigError::Missing("data"));
    }
    let (worker, worker_from) = if s.finalize {
        (Worker::ALONE, "--finalize".to_string())
    } else {
        worker::resolve(s.worker.as_deref(), s.workers, |k| std::env::var(k).ok())?
    };
    let session = session(&s.device, global)?;
    Ok(PrepConfig {
        model: required(s.model, "model")?,
        data: s.data,
        out: required(s.out, "out")?,
        format: s.format,
        columns: Columns {
            prompt: s.prompt_column,
            chosen: s.chosen_column,
            rejected: s.rejected_column,
            id: s.id_column,
        },
        truncation: Truncation {
            max_length: s.max_length,
            max_prompt_length: s.max_prompt_length,
        },
        response_eos: s.response_eos,
        prompt_mismatch: s.prompt_mismatch,
        topk: s.topk,
        batch_tokens: batch_tokens(s.batch_tokens, &session),
        session,
        shard_size: s.shard_size,
        limit: s.limit,
        overwrite: s.overwrite,
        quiet: global.quiet || args.json,
        worker,
        worker_from,
        finalize: s.finalize,
    })
}

/// `edpo train`'s flags over its `--config` file over the defaults.
pub fn train_settings(args: &TrainArgs) -> Result<TrainSettings, ConfigError> {
    let file: TrainArgs = read_config_file(args.config.as_deref())?;
    layered(&[as_layer(&file), as_layer(args)])
}

/// The checked configuration of an `edpo train` run.
pub fn train_config(args: &TrainArgs, global: &GlobalArgs) -> Result<TrainConfig, ConfigError> {
    let s = train_settings(args)?;
    Ok(TrainConfig {
        model: required(s.model, "model")?,
        shards: required(s.shards, "shards")?,
        out: required(s.out, "out")?,
        beta: s.beta,
        epsilon: s.epsilon,
        lr: s.lr,
        label_smoothing: s.label_smoothing,
        step_tolerance: s.step_tolerance,
        batch_size: s.batch_size,
        micro_batch: s.micro_batch,
        epochs: s.epochs,
        max_steps: s.max_steps,
        seed: s.seed,
        reference: s.reference,
        online_topk: s.topk,
        schedule: s.schedule,
        warmup_ratio: s.warmup_ratio,
        warmup_steps: s.warmup_steps,
        max_grad_norm: s.max_grad_norm,
        adam: AdamWConfig {
            beta1: s.adam_beta1,
            beta2: s.adam_beta2,
            eps: s.adam_eps,
            weight_decay: s.weight_decay,
        },
        save_every: s.save_every,
        keep_checkpoints: s.keep_checkpoints,
        resume: s.resume,
        merge: s.merge,
        session: session(&s.device, global)?,
        quiet: global.quiet || args.json,
    })
}

/// The checked configuration of an `edpo eval` run.
pub fn eval_config(args: &EvalArgs, global: &GlobalArgs) -> Result<EvalConfig, ConfigError> {
    let s: EvalSettings = layered(&[as_layer(args)])?;
    let session = session(&s.device, global)?;
    Ok(EvalConfig {
        model: required(s.model, "model")?,
        params: s.params,
        shards: required(s.shards, "shards")?,
        beta: s.beta,
        batch_tokens: batch_tokens(s.batch_tokens, &session),
        session,
        per_pair: s.per_pair,
    })
}

/// A top-K size as written on the command line: a number, or `V` for the whole vocabulary
/// (`usize::MAX`, cut to the vocabulary size by the study).
fn parse_topk(text: &str) -> Result<usize, ConfigError> {
    match text.trim() {
        "V" | "v" => Ok(usize::MAX),
        n => n.parse::<usize>().map_err(|_| ConfigError::Value {
            flag: "topks",
            message: format!("`{n}` is not a number or `V`"),
        }),
    }
}

/// The checked configuration of an `edpo study-k` run (always on the CPU).
pub fn study_config(args: &StudyKArgs, global: &GlobalArgs) -> Result<StudyConfig, ConfigError> {
    let s: StudyKSettings = layered(&[as_layer(args)])?;
    Ok(StudyConfig {
        model: required(s.model, "model")?,
        shards: required(s.shards, "shards")?,
        params: s.params,
        topks: s
            .topks
            .iter()
            .map(|k| parse_topk(k))
            .collect::<Result<_, _>>()?,
        epsilon: s.epsilon,
        step_tolerance: s.step_tolerance,
        limit: s.limit,
        estimators: s.estimators,
        seed: s.seed,
        session: session("cpu", global)?,
    })
}

/// The bundle folder and session of an `edpo verify` run.
pub fn verify_config(
    args: &VerifyArgs,
    global: &GlobalArgs,
) -> Result<(PathBuf, SessionConfig), ConfigError> {
    let s: VerifySettings = layered(&[as_layer(args)])?;
    Ok((required(s.model, "model")?, session(&s.device, global)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_args(flags: &[&str]) -> TrainArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: TrainArgs,
        }
        let mut argv = vec!["train"];
        argv.extend_from_slice(flags);
        Wrap::parse_from(argv).args
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "beta = 0.5\nepsilon = 0.2\nresume = true\nseed = 7\n",
        )
        .unwrap();
        let args = train_args(&["--config", file.to_str().unwrap(), "--beta", "0.25"]);
        let s = train_settings(&args).unwrap();
        assert_eq!(s.beta, 0.25, "flag over file");
        assert_eq!(s.epsilon, 0.2, "file over default");
        assert!(s.resume, "a switch not passed leaves the file's true");
        assert_eq!(s.seed, 7);
        assert_eq!(
            s.lr,
            TrainSettings::default().lr,
            "default where nobody says"
        );
    }

    fn prep_args(flags: &[&str]) -> PrepArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: PrepArgs,
        }
        let mut argv = vec!["prep", "--model", "m", "--data", "d", "--out", "o"];
        argv.extend_from_slice(flags);
        Wrap::parse_from(argv).args
    }

    #[test]
    fn the_token_budget_defaults_by_device_unless_given() {
        let global = GlobalArgs::default();
        let budget = |flags: &[&str]| {
            prep_config(&prep_args(flags), &global)
                .unwrap()
                .batch_tokens
        };
        assert_eq!(budget(&[]), 1024, "CPU");
        assert_eq!(budget(&["--device", "cuda"]), 8192, "CUDA");
        assert_eq!(
            budget(&["--device", "cuda", "--batch-tokens", "300"]),
            300,
            "given"
        );
    }

    #[test]
    fn no_flags_and_no_file_give_the_defaults() {
        assert_eq!(
            train_settings(&train_args(&[])).unwrap(),
            TrainSettings::default()
        );
    }

    #[test]
    fn unknown_keys_and_missing_required_flags_name_the_file_or_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "bta = 0.5\n").unwrap();
        let err = train_settings(&train_args(&["--config", file.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml") && err.contains("bta"), "{err}");
        let global = GlobalArgs::default();
        let err = train_config(&train_args(&["--shards", "s", "--out", "o"]), &global)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`--model` is required"), "{err}");
    }

    #[test]
    fn every_command_resolves_from_its_defaults() {
        for command in ["prep", "train", "eval", "study-k", "verify"] {
            let defaults = defaults_of(command).unwrap();
            assert!(!defaults.is_empty(), "{command}");
        }
        let topks = StudyKSettings::default().topks;
        let parsed: Vec<usize> = topks.iter().map(|k| parse_topk(k).unwrap()).collect();
        assert_eq!(parsed.last(), Some(&usize::MAX));
        assert!(parse_topk("x").is_err());
    }
}
