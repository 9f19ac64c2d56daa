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
