//! Command-line definitions (clap derive). Doc comments here are the `--help` text; every
//! optional setting is an `Option` whose default lives in `config.rs` and is shown in `--help`
//! as `[default: …]` by [`command`], which is handed those defaults.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::data::tokenize::ResponseEos;
use crate::data::{Format, PromptMismatch};
use crate::study::Estimator;
use crate::train::optim::Schedule;
use crate::train::ReferenceMode;

/// edpo: offline preference optimisation of language models with ε-DPO.
///
/// Stages: `python -m edpo_export` makes a model bundle; `edpo prep` scores preference data
/// once with the reference model into Parquet shards; `edpo train` runs ε-DPO over them.
#[derive(Debug, Parser)]
#[command(name = "edpo", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// No progress bars; only results and errors are printed.
    #[arg(long, global = true, env = "EDPO_QUIET")]
    pub quiet: bool,

    /// Intra-op threads for ONNX Runtime and data work (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "EDPO_THREADS")]
    pub threads: usize,

    /// Keep ONNX Runtime's optimised joint graph in this folder between runs, keyed by the
    /// graph's hash, the ONNX Runtime build and the CPU: a later `train` or `verify` session
    /// loads it instead of optimising the graph again (SmolLM2: start-up ~34 s → ~3 s;
    /// the same outputs bit for bit; peak memory can differ, see the README's "Start-up").
    /// Unset: the graph is optimised at every session.
    #[arg(long, global = true, value_name = "DIR", env = "EDPO_GRAPH_CACHE")]
    pub graph_cache: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a model bundle: manifest, file hashes, graph I/O contract, and reproduce its
    /// PyTorch goldens through ONNX Runtime.
    Verify(VerifyArgs),
    /// Score preference data once with the reference model into resumable Parquet shards.
    ///
    /// Rerunning the same command resumes: complete shards are kept, missing ones written.
    /// Flags override `--config FILE` (TOML, keys named like the flags).
    Prep(PrepArgs),
    /// Train with ε-DPO over prep shards through the bundle's joint graph.
    ///
    /// Flags override `--config FILE` (TOML, keys named like the flags), which overrides the
    /// defaults (the paper's reference hyper-parameters where it gives them).
    Train(TrainArgs),
    /// Score shards' pairs with some parameters (default: the reference) and report preference
    /// accuracy, reward margin, z and a KL estimate.
    Eval(EvalArgs),
    /// Plot a training run: RUN/report/*.png and a self-contained RUN/report/index.html.
    Report(ReportArgs),
    /// Measure how often the cached top-K ε-step agrees with the exact full-vocabulary step.
    StudyK(StudyKArgs),
    /// Show a shards folder or any Parquet file: schema, rows, column statistics, prep settings.
    Inspect(InspectArgs),
}

/// The defaults of a subcommand's settings by flag name (`config::defaults_of`).
pub type Defaults = fn(&str) -> Option<serde_json::Map<String, serde_json::Value>>;

/// The command-line interface with each setting's default (from `defaults`) in its help.
pub fn command(defaults_of: Defaults) -> clap::Command {
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        let Some(defaults) = defaults_of(&name) else {
            continue;
        };
        cmd = cmd.mut_subcommand(&name, |mut sub| {
            let ids: Vec<String> = sub
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .collect();
            for id in ids {
                if let Some(text) = defaults.get(&id.replace('_', "-")).and_then(default_text) {
                    sub = sub.mut_arg(&id, |arg| {
                        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                        arg.help(format!("{help} [default: {text}]"))
                    });
                }
            }
            sub
        });
    }
    cmd
}

/// How a default reads in `--help`; None for settings without one (required or optional).
fn default_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(false) => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) if items.is_empty() => None,
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(default_text)
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

/// Parses the command line (clap's own error on failure: usage text, `--help`, `--version`).
pub fn parse(defaults_of: Defaults) -> Result<Cli, clap::Error> {
    let matches = command(defaults_of).try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrepArgs {
    /// Model bundle folder written by `python -m edpo_export`.
    #[arg(long, env = "EDPO_MODEL")]
    pub model: Option<PathBuf>,

    /// Input data: a Parquet or JSONL file, a folder of them, or a glob. May repeat.
    #[arg(long)]
    #[serde(default)]
    pub data: Vec<PathBuf>,

    /// Output folder for `part-*.parquet` shards and `manifest.json`.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// TOML file with any of these settings (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Data format: auto-detected from the first row unless given.
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Column holding the prompt (plain text, messages, or token ids).
    #[arg(long)]
    pub prompt_column: Option<String>,

    /// Column holding the chosen response.
    #[arg(long)]
    pub chosen_column: Option<String>,

    /// Column holding the rejected response.
    #[arg(long)]
    pub rejected_column: Option<String>,

    /// Optional column with a stable pair id (else the id derives from file name and row).
    #[arg(long)]
    pub id_column: Option<String>,

    /// Maximum prompt + response tokens; responses are cut at the end.
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Maximum prompt tokens; the end of the prompt is kept.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,

    /// EOS after every chosen and rejected response: `always` (TRL 0.13's `tokenize_row`, what
    /// the paper trained with, for plain and chat rows) or `never` (for chat templates that end
    /// their turns with EOS themselves). Token-id rows are used as given.
    #[arg(long, value_enum)]
    pub response_eos: Option<ResponseEos>,

    /// Rows with a string prompt beside chosen/rejected conversations (the UltraFeedback
    /// layout) use the conversations' shared prefix as the prompt, as TRL does; a row whose
    /// string is not that prefix's last user turn is `skip`ped (counted) or an `error`.
    #[arg(long, value_enum)]
    pub prompt_mismatch: Option<PromptMismatch>,

    /// Top-K reference log-probs cached per response token (default: the bundle's).
    #[arg(long)]
    pub topk: Option<usize>,

    /// Where the reference graph runs: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Token budget of one scoring batch (rows × padded length; default 1024 on CPU, 8192 on
    /// CUDA).
    #[arg(long)]
    pub batch_tokens: Option<usize>,

    /// Input rows per shard.
    #[arg(long)]
    pub shard_size: Option<usize>,

    /// Use only the first N input rows.
    #[arg(long)]
    pub limit: Option<u64>,

    /// Replace shards in `--out` that were made with other settings or another model.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,

    /// Score only shards i ≡ I (mod N) into the shared `--out`, as worker I of N (e.g. `0/4`).
    /// Without it, I and N come from a Slurm job array (SLURM_ARRAY_TASK_ID minus
    /// SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job
    /// (JOB_COMPLETION_INDEX with `--workers`); else one process scores every shard. The
    /// worker that completes the last shard writes the complete manifest.json.
    #[arg(long, value_name = "I/N")]
    pub worker: Option<String>,

    /// Number of workers, for a Kubernetes Indexed Job (its `completions`).
    #[arg(long, env = "EDPO_WORKERS")]
    pub workers: Option<usize>,

    /// Score nothing: write the complete manifest.json once every shard is in `--out` (after
    /// the workers, e.g. as a dependent job), or name the missing shards.
    #[arg(long)]
    #[serde(default)]
    pub finalize: bool,

    /// Print the summary as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A shards folder or a Parquet file.
    pub path: PathBuf,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyArgs {
    /// Model bundle folder written by `python -m edpo_export`.
    #[arg(long, env = "EDPO_MODEL", required = true)]
    pub model: Option<PathBuf>,

    /// Where the graphs run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Print the result as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainArgs {
    /// Model bundle folder written by `python -m edpo_export`.
    #[arg(long, env = "EDPO_MODEL")]
    pub model: Option<PathBuf>,

    /// Shards folder written by `edpo prep` with the same bundle.
    #[arg(long)]
    pub shards: Option<PathBuf>,

    /// Run folder: checkpoints/, metrics.parquet, pairs.parquet, final/.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// TOML file with any of these settings (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Initial KL coefficient β.
    #[arg(long)]
    pub beta: Option<f64>,

    /// ε of the per-pair β rule; 0 is plain DPO.
    #[arg(long)]
    pub epsilon: Option<f64>,

    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,

    /// Label smoothing λ (conservative DPO).
    #[arg(long)]
    pub label_smoothing: Option<f64>,

    /// Tolerance τ of the per-pair step rule (objective.md §3).
    #[arg(long)]
    pub step_tolerance: Option<f64>,

    /// Pairs per optimiser step.
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Pairs per run of the joint graph (gradient accumulation).
    #[arg(long)]
    pub micro_batch: Option<usize>,

    /// Passes over the shards.
    #[arg(long)]
    pub epochs: Option<u64>,

    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,

    /// Seed of the data order.
    #[arg(long)]
    pub seed: Option<u64>,

    /// `cached` (the shards' top-K) or `online` (the scoring graph during training).
    #[arg(long, value_enum)]
    pub reference: Option<ReferenceMode>,

    /// Top-K size of the online reference (default: the vocabulary size, i.e. the exact
    /// ε-step).
    #[arg(long)]
    pub topk: Option<usize>,

    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,

    /// Warm-up as a fraction of the steps.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    /// Warm-up steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<u64>,

    /// Global gradient-norm clip; 0 disables.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,

    /// AdamW weight decay (not applied to biases and norms).
    #[arg(long)]
    pub weight_decay: Option<f64>,

    /// AdamW β₁.
    #[arg(long)]
    pub adam_beta1: Option<f64>,

    /// AdamW β₂.
    #[arg(long)]
    pub adam_beta2: Option<f64>,

    /// AdamW ε.
    #[arg(long)]
    pub adam_eps: Option<f64>,

    /// Checkpoint every N steps (and always at the end); 0 = only at the end.
    #[arg(long)]
    pub save_every: Option<u64>,

    /// Checkpoints to keep.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,

    /// Continue the run in `--out` from its latest checkpoint.
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,

    /// LoRA bundles: also write `final/merged/`, the base model with the trained adapter merged
    /// (W + alpha/r · B·A), as a Hugging Face model folder.
    #[arg(long)]
    #[serde(default)]
    pub merge: bool,

    /// Where the graphs run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EvalArgs {
    /// Model bundle folder written by `python -m edpo_export`.
    #[arg(long, env = "EDPO_MODEL", required = true)]
    pub model: Option<PathBuf>,

    /// Parameters to evaluate (e.g. RUN/final/model.safetensors; of a LoRA bundle: its adapter,
    /// RUN/final or a checkpoint, merged into the base); default: the reference.
    #[arg(long)]
    pub params: Option<PathBuf>,

    /// Shards folder written by `edpo prep` with the same bundle.
    #[arg(long, required = true)]
    pub shards: Option<PathBuf>,

    /// β for the reported reward margin.
    #[arg(long)]
    pub beta: Option<f64>,

    /// Token budget of one scoring batch (default 1024 on CPU, 8192 on CUDA).
    #[arg(long)]
    pub batch_tokens: Option<usize>,

    /// Where the scoring graph runs: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Also write per-pair scores (pair_id, log-probs, z) to this Parquet file.
    #[arg(long)]
    pub per_pair: Option<PathBuf>,

    /// Print the result as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Run folder written by `edpo train`.
    pub run: PathBuf,
}

#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StudyKArgs {
    /// Model bundle folder (its parameters are the reference).
    #[arg(long, env = "EDPO_MODEL", required = true)]
    pub model: Option<PathBuf>,

    /// Shards folder (token ids of the pairs to study).
    #[arg(long, required = true)]
    pub shards: Option<PathBuf>,

    /// Policy parameters (e.g. a checkpoint's model.safetensors; of a LoRA bundle: its adapter,
    /// merged into the base); default: the reference.
    #[arg(long)]
    pub params: Option<PathBuf>,

    /// Top-K sizes, comma-separated; `V` means the whole vocabulary.
    #[arg(long, alias = "ks", value_delimiter = ',')]
    pub topks: Vec<String>,

    /// ε of the perturbed policies.
    #[arg(long)]
    pub epsilon: Option<f64>,

    /// Tolerance τ of the per-pair step rule.
    #[arg(long)]
    pub step_tolerance: Option<f64>,

    /// Use at most this many pairs.
    #[arg(long)]
    pub limit: Option<usize>,

    /// Cache estimates to compare, comma-separated: topk (what training uses), sampled,
    /// sampled-sn, head-tail, head-tail-sn (`-sn`: self-normalised).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub estimators: Vec<Estimator>,

    /// Seed of the reference draws of the sampled estimators.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Print the result as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}
