//! The `edpo` binary: parses the command line, resolves its configuration, runs the command
//! and prints its result; the library decides the exit code of a failure (`edpo::Error`).

use std::process::ExitCode;

use edpo::cli::{self, Command, GlobalArgs};
use edpo::config;
use edpo::output::Printable;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDPO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match cli::parse(config::defaults_of) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli.command, &cli.global) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            let code = err
                .chain()
                .find_map(|cause| cause.downcast_ref::<edpo::Error>())
                .map_or(edpo::error::EXIT_INTERNAL, edpo::Error::exit_code);
            ExitCode::from(code)
        }
    }
}

/// Prints a result as JSON or as a table.
fn print(result: &impl Printable, json: bool) {
    print!("{}", result.render(json));
}

/// Runs one command; the exit code of a run that completed (verify: 1 when a check fails).
fn run(command: Command, global: &GlobalArgs) -> anyhow::Result<u8> {
    match command {
        Command::Verify(args) => {
            let (model, session) =
                config::verify_config(&args, global).map_err(edpo::Error::from)?;
            let report = edpo::goldens::verify(&model, &session)?;
            print(&report, args.json);
            return Ok(if report.passed { 0 } else { 1 });
        }
        Command::Prep(args) => {
            let cfg = config::prep_config(&args, global).map_err(edpo::Error::from)?;
            if global.threads > 0 {
                let _ = rayon::ThreadPoolBuilder::new()
                    .num_threads(global.threads)
                    .build_global();
            }
            print(&edpo::prep::run(&cfg)?, args.json);
        }
        Command::Train(args) => {
            let cfg = config::train_config(&args, global).map_err(edpo::Error::from)?;
            let ranks = edpo::dist::ranks();
            let summary = edpo::train::run(&cfg, ranks.as_ref())?;
            if ranks.is_root() {
                print(&summary, args.json);
            }
        }
        Command::Eval(args) => {
            let cfg = config::eval_config(&args, global).map_err(edpo::Error::from)?;
            print(&edpo::eval::run(&cfg)?, args.json);
        }
        Command::StudyK(args) => {
            let cfg = config::study_config(&args, global).map_err(edpo::Error::from)?;
            print(&edpo::study::run(&cfg)?, args.json);
        }
        Command::Report(args) => print(&edpo::report::write_report(&args.run)?, false),
        Command::Inspect(args) => print(&edpo::inspect::inspect(&args.path)?, args.json),
    }
    Ok(0)
}
