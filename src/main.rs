//! The `edpo` binary: parses the command line and maps errors to exit codes (2 = input/usage,
//! 1 = internal).

use std::process::ExitCode;

use clap::Parser;
use edpo::bundle::Bundle;
use edpo::runtime::{Device, SessionConfig};

mod cli;

/// A problem with `--config FILE` or a required flag (exit code 2).
#[derive(Debug, thiserror::Error)]
enum ConfigError {
    #[error("`--config {path}`: {message}")]
    File { path: String, message: String },
    #[error("`--{0}` is required (on the command line or in `--config`)")]
    Missing(&'static str),
}

impl ConfigError {
    fn exit_code(&self) -> i32 {
        2
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDPO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// 2 when the error is the user's to fix (bad input, flag or installation), 1 otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        let code = if let Some(e) = cause.downcast_ref::<edpo::bundle::BundleError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::runtime::RuntimeError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::graphs::GraphError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::goldens::GoldensError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::prep::PrepError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::data::DataError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::inspect::InspectError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::train::TrainError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::eval::EvalError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::report::ReportError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<ConfigError>() {
            Some(e.exit_code())
        } else if let Some(e) = cause.downcast_ref::<edpo::shards::ShardError>() {
            Some(e.exit_code())
        } else {
            cause.downcast_ref::<edpo::params::ParamsError>().map(|_| 2)
        };
        if let Some(code) = code {
            return code as u8;
        }
    }
    1
}

fn run(cli: cli::Cli) -> anyhow::Result<u8> {
    match cli.command {
        cli::Command::Verify(args) => verify(&args, cli.threads),
        cli::Command::Prep(args) => prep(&args, cli.threads, cli.quiet),
        cli::Command::Train(args) => train(args, cli.threads, cli.quiet),
        cli::Command::Eval(args) => {
            let report = edpo::eval::run(&edpo::eval::EvalConfig {
                model: args.model,
                params: args.params,
                shards: args.shards,
                beta: args.beta,
                batch_tokens: args.batch_tokens,
                session: SessionConfig {
                    device: args.device.parse()?,
                    threads: cli.threads,
                },
                per_pair: args.per_pair,
            })?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_table());
            }
            Ok(0)
        }
        cli::Command::StudyK(args) => {
            let ks = args
                .ks
                .iter()
                .map(|k| match k.trim() {
                    "V" | "v" => Ok(usize::MAX),
                    n => n.parse::<usize>().map_err(|_| ConfigError::File {
                        path: "--ks".into(),
                        message: format!("`{n}` is not a number or `V`"),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let report = edpo::study::run(&edpo::study::StudyConfig {
                model: args.model,
                shards: args.shards,
                params: args.params,
                ks,
                epsilon: args.epsilon,
                step_tolerance: args.step_tolerance,
                limit: args.limit,
                estimators: args.estimators,
                seed: args.seed,
                session: SessionConfig {
                    device: Device::Cpu,
                    threads: cli.threads,
                },
            })?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_table());
            }
            Ok(0)
        }
        cli::Command::Report(args) => {
            let files = edpo::report::write_report(&args.run)?;
            println!(
                "report: {} plots and {}",
                files.pngs.len(),
                files.html.display()
            );
            Ok(0)
        }
        cli::Command::Inspect(args) => {
            let report = edpo::inspect::inspect(&args.path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_table());
            }
            Ok(0)
        }
    }
}

fn verify(args: &cli::VerifyArgs, threads: usize) -> anyhow::Result<u8> {
    let device: Device = args.device.parse()?;
    let bundle = Bundle::open(&args.model)?;
    let config = SessionConfig { device, threads };
    let report = edpo::goldens::verify_bundle(&bundle, &config)?;
    if args.json {
        let checks: Vec<_> = report
            .checks
            .iter()
            .map(|c| serde_json::json!({"check": c.label, "ok": c.ok, "detail": c.detail}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bundle": args.model,
                "bundle_sha256": bundle.bundle_sha256,
                "passed": report.passed(),
                "checks": checks,
            }))?
        );
    } else {
        println!(
            "bundle {} ({}, {} parameters, vocab {})",
            args.model.display(),
            bundle.manifest.architecture,
            bundle.manifest.num_parameters,
            bundle.manifest.vocab_size
        );
        for c in &report.checks {
            println!(
                "  {} {:<48} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.label,
                c.detail
            );
        }
        println!(
            "{}",
            if report.passed() {
                "goldens reproduced"
            } else {
                "goldens NOT reproduced"
            }
        );
    }
    Ok(if report.passed() { 0 } else { 1 })
}

/// A setting from the command line, else from the `--config` file, else the default:
/// `pick!(args, file, field, default)`, or `pick!(args, file, field)` for an optional one.
macro_rules! pick {
    ($args:ident, $file:ident, $field:ident, $default:expr) => {
        $args
            .$field
            .clone()
            .or($file.$field.clone())
            .unwrap_or($default)
    };
    ($args:ident, $file:ident, $field:ident) => {
        $args.$field.clone().or($file.$field.clone())
    };
}

/// Reads a `--config` TOML file into the command's argument type (keys named like the flags).
fn read_config<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Flags over the TOML file over the defaults, for `edpo prep`.
fn resolve_prep(
    args: &cli::PrepArgs,
    threads: usize,
    quiet: bool,
) -> anyhow::Result<edpo::prep::PrepConfig> {
    let file: cli::PrepArgs = read_config(args.config.as_deref())?;
    let data = if args.data.is_empty() {
        file.data.clone()
    } else {
        args.data.clone()
    };
    if data.is_empty() {
        return Err(ConfigError::Missing("data").into());
    }
    Ok(edpo::prep::PrepConfig {
        model: pick!(args, file, model).ok_or(ConfigError::Missing("model"))?,
        data,
        out: pick!(args, file, out).ok_or(ConfigError::Missing("out"))?,
        format: pick!(args, file, format, edpo::data::Format::Auto),
        columns: edpo::data::Columns {
            prompt: pick!(args, file, prompt_column, "prompt".into()),
            chosen: pick!(args, file, chosen_column, "chosen".into()),
            rejected: pick!(args, file, rejected_column, "rejected".into()),
            id: pick!(args, file, id_column, "id".into()),
        },
        truncation: edpo::data::tokenize::Truncation {
            max_length: pick!(args, file, max_length),
            max_prompt_length: pick!(args, file, max_prompt_length),
        },
        topk: pick!(args, file, topk),
        session: SessionConfig {
            device: pick!(args, file, device, "cpu".to_string()).parse()?,
            threads,
        },
        batch_tokens: pick!(args, file, batch_tokens, 8192),
        shard_size: pick!(args, file, shard_size, 2048),
        limit: pick!(args, file, limit),
        overwrite: args.overwrite || file.overwrite,
        quiet: quiet || args.json,
    })
}

fn prep(args: &cli::PrepArgs, threads: usize, quiet: bool) -> anyhow::Result<u8> {
    let config = resolve_prep(args, threads, quiet)?;
    if threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    let s = edpo::prep::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!(
        "prep: {} pairs written to {} ({} shards, {} reused)",
        s.pairs_written,
        s.out.display(),
        s.shards,
        s.shards_reused
    );
    println!(
        "  format {}, top-K {}, rows read {}",
        s.format, s.topk, s.rows_read
    );
    if s.skipped.is_empty() {
        println!("  skipped: none");
    } else {
        for (reason, n) in &s.skipped {
            let why = edpo::data::SkipReason::from_name(reason)
                .map(|r| r.describe())
                .unwrap_or("");
            println!("  skipped {n:>6} {reason}: {why}");
        }
    }
    println!(
        "  tokens scored {} (response tokens {}), padding {:.1}%",
        s.sequence_tokens,
        s.response_tokens,
        100.0 * s.padding_fraction
    );
    println!(
        "  wall {:.1}s, {:.1} pairs/s, {:.0} tokens/s",
        s.wall_seconds, s.pairs_per_second, s.tokens_per_second
    );
    Ok(0)
}

/// Flags over the TOML file over the defaults.
fn resolve_train(
    args: cli::TrainArgs,
    threads: usize,
    quiet: bool,
) -> anyhow::Result<edpo::train::TrainConfig> {
    let file: cli::TrainArgs = read_config(args.config.as_deref())?;
    let required =
        |v: Option<std::path::PathBuf>, name: &'static str| v.ok_or(ConfigError::Missing(name));
    let device: Device = pick!(args, file, device, "cpu".to_string()).parse()?;
    Ok(edpo::train::TrainConfig {
        model: required(pick!(args, file, model), "model")?,
        shards: required(pick!(args, file, shards), "shards")?,
        out: required(pick!(args, file, out), "out")?,
        beta: pick!(args, file, beta, 0.01),
        epsilon: pick!(args, file, epsilon, 0.01),
        lr: pick!(args, file, lr, 3e-7),
        label_smoothing: pick!(args, file, label_smoothing, 0.0),
        step_tolerance: pick!(args, file, step_tolerance, 1e-6),
        batch_size: pick!(args, file, batch_size, 128),
        micro_batch: pick!(args, file, micro_batch, 8),
        epochs: pick!(args, file, epochs, 1),
        max_steps: pick!(args, file, max_steps),
        seed: pick!(args, file, seed, 42),
        reference: pick!(args, file, reference, edpo::train::ReferenceMode::Cached),
        online_topk: pick!(args, file, topk),
        schedule: pick!(args, file, schedule, edpo::train::optim::Schedule::Cosine),
        warmup_ratio: pick!(args, file, warmup_ratio, 0.1),
        warmup_steps: pick!(args, file, warmup_steps),
        max_grad_norm: pick!(args, file, max_grad_norm, 1.0),
        adam: edpo::train::optim::AdamWConfig {
            beta1: pick!(args, file, adam_beta1, 0.9),
            beta2: pick!(args, file, adam_beta2, 0.999),
            eps: pick!(args, file, adam_eps, 1e-8),
            weight_decay: pick!(args, file, weight_decay, 0.0),
        },
        save_every: pick!(args, file, save_every, 0),
        keep_checkpoints: pick!(args, file, keep_checkpoints, 2),
        resume: args.resume || file.resume,
        session: SessionConfig { device, threads },
        quiet,
    })
}

fn train(args: cli::TrainArgs, threads: usize, quiet: bool) -> anyhow::Result<u8> {
    let json = args.json;
    let config = resolve_train(args, threads, quiet || json)?;
    let s = edpo::train::run(&config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!(
        "train: {} steps, {} pairs, final loss {:.5}, β {:.6}{}",
        s.steps,
        s.pairs_seen,
        s.final_loss,
        s.final_beta,
        s.resumed_from
            .map(|r| format!(" (resumed from step {r})"))
            .unwrap_or_default()
    );
    if s.nonfinite_skipped > 0 {
        println!(
            "  {} step(s) skipped for a non-finite loss or gradient",
            s.nonfinite_skipped
        );
    }
    println!(
        "  {:.1} pairs/s, wall {:.1}s",
        s.pairs_per_second, s.wall_seconds
    );
    println!(
        "  run folder: {} (metrics.parquet, pairs.parquet, checkpoints/, final/)",
        s.out.display()
    );
    Ok(0)
}
