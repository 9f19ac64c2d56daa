//! The `edpo` binary: parses the command line and maps errors to exit codes (2 = input/usage,
//! 1 = internal).

use std::process::ExitCode;

use clap::Parser;
use edpo::bundle::Bundle;
use edpo::runtime::{Device, SessionConfig};

mod cli;

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
