//! Command-line definitions (clap derive). Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// edpo: offline preference optimisation of language models with ε-DPO.
///
/// Stages: `pipelines/export.py` makes a model bundle; `edpo prep` scores preference data
/// once with the reference model into Parquet shards; `edpo train` runs ε-DPO over them.
#[derive(Debug, Parser)]
#[command(name = "edpo", version, about, long_about = None)]
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
    Prep(PrepArgs),
    /// Show a shards folder or any Parquet file: schema, rows, column statistics, prep settings.
    Inspect(InspectArgs),
}

#[derive(Debug, clap::Args)]
pub struct PrepArgs {
    /// Model bundle folder written by `pipelines/export.py`.
    #[arg(long, env = "EDPO_MODEL")]
    pub model: PathBuf,

    /// Input data: a Parquet or JSONL file, a folder of them, or a glob. May repeat.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,

    /// Output folder for `part-*.parquet` shards and `manifest.json`.
    #[arg(long)]
    pub out: PathBuf,

    /// Data format: auto-detected from the first row unless given.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: edpo::data::Format,

    /// Column holding the prompt (plain text, messages, or token ids).
    #[arg(long, default_value = "prompt")]
    pub prompt_column: String,

    /// Column holding the chosen response.
    #[arg(long, default_value = "chosen")]
    pub chosen_column: String,

    /// Column holding the rejected response.
    #[arg(long, default_value = "rejected")]
    pub rejected_column: String,

    /// Optional column with a stable pair id (else the id derives from file name and row).
    #[arg(long, default_value = "id")]
    pub id_column: String,

    /// Maximum prompt + response tokens; responses are cut at the end.
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Maximum prompt tokens; the end of the prompt is kept.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,

    /// Top-K reference log-probs cached per response token (default: the bundle's).
    #[arg(long)]
    pub topk: Option<usize>,

    /// Where the reference graph runs: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", env = "EDPO_DEVICE")]
    pub device: String,

    /// Token budget of one scoring batch (rows × padded length).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,

    /// Input rows per shard.
    #[arg(long, default_value_t = 2048)]
    pub shard_size: usize,

    /// Use only the first N input rows.
    #[arg(long)]
    pub limit: Option<u64>,

    /// Replace shards in `--out` that were made with other settings or another model.
    #[arg(long)]
    pub overwrite: bool,

    /// Print the summary as JSON.
    #[arg(long)]
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
