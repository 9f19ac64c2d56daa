//! Command-line definitions (clap derive). Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// edpo: offline preference optimisation of language models with ε-DPO.
///
/// Stages: `pipelines/export.py` makes a model bundle; `edpo prep` scores preference data
/// once with the reference model into Parquet shards; `edpo train` runs ε-DPO over them.
#[derive(Debug, Parser)]
#[command(name = "edpo", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// No progress bars; only results and errors are printed.
    #[arg(long, global = true, env = "EDPO_QUIET")]
    pub quiet: bool,

    /// Intra-op threads for ONNX Runtime and data work (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "EDPO_THREADS")]
    pub threads: usize,

    #[command(subcommand)]
    pub command: Command,
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

#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrepArgs {
    /// Model bundle folder written by `pipelines/export.py`.
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

    /// Data format: auto-detected from the first row unless given [default: auto].
    #[arg(long, value_enum)]
    pub format: Option<edpo::data::Format>,

    /// Column holding the prompt (plain text, messages, or token ids) [default: prompt].
    #[arg(long)]
    pub prompt_column: Option<String>,

    /// Column holding the chosen response [default: chosen].
    #[arg(long)]
    pub chosen_column: Option<String>,

    /// Column holding the rejected response [default: rejected].
    #[arg(long)]
    pub rejected_column: Option<String>,

    /// Optional column with a stable pair id (else the id derives from file name and row)
    /// [default: id].
    #[arg(long)]
    pub id_column: Option<String>,

    /// Maximum prompt + response tokens; responses are cut at the end.
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Maximum prompt tokens; the end of the prompt is kept.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,

    /// Top-K reference log-probs cached per response token (default: the bundle's).
    #[arg(long)]
    pub topk: Option<usize>,

    /// Where the reference graph runs: `cpu`, `cuda` or `cuda:N` [default: cpu].
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Token budget of one scoring batch (rows × padded length) [default: 8192].
    #[arg(long)]
    pub batch_tokens: Option<usize>,

    /// Input rows per shard [default: 2048].
    #[arg(long)]
    pub shard_size: Option<usize>,

    /// Use only the first N input rows.
    #[arg(long)]
    pub limit: Option<u64>,

    /// Replace shards in `--out` that were made with other settings or another model.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,

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

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Model bundle folder written by `pipelines/export.py`.
    #[arg(long, env = "EDPO_MODEL")]
    pub model: PathBuf,

    /// Where the graphs run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", env = "EDPO_DEVICE")]
    pub device: String,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainArgs {
    /// Model bundle folder written by `pipelines/export.py`.
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

    /// Initial KL coefficient β [default: 0.01].
    #[arg(long)]
    pub beta: Option<f64>,

    /// ε of the per-pair β rule; 0 is plain DPO [default: 0.01].
    #[arg(long)]
    pub epsilon: Option<f64>,

    /// Peak learning rate [default: 3e-7].
    #[arg(long)]
    pub lr: Option<f64>,

    /// Label smoothing λ (conservative DPO) [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,

    /// Tolerance τ of the step rule (objective.md §3) [default: 1e-6].
    #[arg(long)]
    pub step_tolerance: Option<f64>,

    /// Pairs per optimiser step [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Pairs per run of the joint graph (gradient accumulation) [default: 8].
    #[arg(long)]
    pub micro_batch: Option<usize>,

    /// Passes over the shards [default: 1].
    #[arg(long)]
    pub epochs: Option<u64>,

    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,

    /// Seed of the data order [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,

    /// `cached` (the shards' top-K) or `online` (the scoring graph during training) [default: cached].
    #[arg(long, value_enum)]
    pub reference: Option<edpo::train::ReferenceMode>,

    /// K of the online reference [default: the vocabulary size, i.e. the exact ε-step].
    #[arg(long)]
    pub topk: Option<usize>,

    /// Learning-rate schedule after warm-up [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<edpo::train::optim::Schedule>,

    /// Warm-up as a fraction of the steps [default: 0.1].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    /// Warm-up steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<u64>,

    /// Global gradient-norm clip; 0 disables [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,

    /// AdamW weight decay (not applied to biases and norms) [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,

    /// AdamW β₁ [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f64>,

    /// AdamW β₂ [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f64>,

    /// AdamW ε [default: 1e-8].
    #[arg(long)]
    pub adam_eps: Option<f64>,

    /// Checkpoint every N steps (and always at the end); 0 = only at the end [default: 0].
    #[arg(long)]
    pub save_every: Option<u64>,

    /// Checkpoints to keep [default: 2].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,

    /// Continue the run in `--out` from its latest checkpoint.
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,

    /// Where the graphs run: `cpu`, `cuda` or `cuda:N` [default: cpu].
    #[arg(long, env = "EDPO_DEVICE")]
    pub device: Option<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model bundle folder written by `pipelines/export.py`.
    #[arg(long, env = "EDPO_MODEL")]
    pub model: PathBuf,

    /// Parameters to evaluate (e.g. RUN/final/model.safetensors); default: the reference.
    #[arg(long)]
    pub params: Option<PathBuf>,

    /// Shards folder written by `edpo prep` with the same bundle.
    #[arg(long)]
    pub shards: PathBuf,

    /// β for the reported reward margin.
    #[arg(long, default_value_t = 0.01)]
    pub beta: f64,

    /// Token budget of one scoring batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,

    /// Where the scoring graph runs: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", env = "EDPO_DEVICE")]
    pub device: String,

    /// Also write per-pair scores (pair_id, log-probs, z) to this Parquet file.
    #[arg(long)]
    pub per_pair: Option<PathBuf>,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Run folder written by `edpo train`.
    pub run: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StudyKArgs {
    /// Model bundle folder (its parameters are the reference).
    #[arg(long, env = "EDPO_MODEL")]
    pub model: PathBuf,

    /// Shards folder (token ids of the pairs to study).
    #[arg(long)]
    pub shards: PathBuf,

    /// Policy parameters (e.g. a checkpoint's model.safetensors); default: the reference.
    #[arg(long)]
    pub params: Option<PathBuf>,

    /// K values, comma-separated; `V` means the whole vocabulary.
    #[arg(
        long,
        default_value = "1,2,4,8,16,32,64,128,256,V",
        value_delimiter = ','
    )]
    pub ks: Vec<String>,

    /// ε of the perturbed policies.
    #[arg(long, default_value_t = 0.01)]
    pub epsilon: f64,

    /// Tolerance τ of the step rule.
    #[arg(long, default_value_t = 1e-6)]
    pub step_tolerance: f64,

    /// Use at most this many pairs.
    #[arg(long, default_value_t = 200)]
    pub limit: usize,

    /// Cache estimates to compare, comma-separated: topk (what training uses), sampled,
    /// sampled-sn, head-tail, head-tail-sn (`-sn`: self-normalised).
    #[arg(long, value_enum, default_value = "topk", value_delimiter = ',')]
    pub estimators: Vec<edpo::study::Estimator>,

    /// Seed of the reference draws of the sampled estimators.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}
