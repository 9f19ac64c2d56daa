//! Data-parallel training over MPI (`--features mpi`): `mpirun -n 2 edpo train` gives the run
//! of one process (same per-pair steps and β, parameters within 1e-6 relative), refuses to
//! resume with another number of ranks, and a rank that dies ends the run without a hang and
//! leaves a checkpoint that resumes.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn prep(out: &Path) {
    run_ok(
        edpo()
            .args(["--quiet", "prep", "--limit", "160", "--shard-size", "50"])
            .arg("--model")
            .arg(sample_bundle())
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(out),
    );
}

/// `edpo train` over `ranks` processes (`mpirun` for more than one), one thread each.
fn train(ranks: usize, shards: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = if ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &ranks.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_edpo"));
        c
    } else {
        edpo()
    };
    cmd.args([
        "--quiet",
        "--threads",
        "1",
        "train",
        "--lr",
        "1e-3",
        "--beta",
        "0.1",
    ])
    .args([
        "--epsilon",
        "0.05",
        "--batch-size",
        "16",
        "--micro-batch",
        "4",
    ])
    .args(["--max-steps", "10", "--save-every", "2", "--model"])
    .arg(sample_bundle())
    .arg("--shards")
    .arg(shards)
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

fn column(path: &Path, name: &str) -> Vec<f64> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let col = arrow::compute::cast(
            b.column_by_name(name).unwrap(),
            &arrow::datatypes::DataType::Float64,
        )
        .unwrap();
        let col = col
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap()
            .clone();
        out.extend(col.values().iter().copied());
    }
    out
}

/// Largest relative L2 difference over the parameter tensors of two runs' `final/`.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let bundle = edpo::bundle::Bundle::open(&sample_bundle()).unwrap();
    let load = |run: &Path| {
        bundle
            .load_params_from(&run.join("final/model.safetensors"))
            .unwrap()
    };
    let (pa, pb) = (load(a), load(b));
    pa.params
        .iter()
        .zip(&pb.params)
        .map(|(x, y)| {
            let diff: f64 = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(u, v)| f64::from(u - v).powi(2))
                .sum();
            let norm: f64 = x.data.iter().map(|u| f64::from(*u).powi(2)).sum();
            (diff / norm.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}

fn assert_same_run(one: &Path, two: &Path) {
    let pairs = |run: &Path, c: &str| column(&run.join("pairs.parquet"), c);
    assert_eq!(
        pairs(one, "pair_id"),
        pairs(two, "pair_id"),
        "every pair, same order"
    );
    assert_eq!(pairs(one, "k"), pairs(two, "k"), "per-pair steps identical");
    let beta = |run: &Path| column(&run.join("metrics.parquet"), "kl/beta");
    assert_eq!(beta(one).len(), 10);
    assert_eq!(beta(one), beta(two), "β identical");
    let rel = max_relative_difference(one, two);
    assert!(
        rel <= 1e-6,
        "parameters differ by {rel:.2e} relative (only the sum order differs)"
    );
}

#[test]
fn two_ranks_train_the_run_of_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(train(1, &shards, &one, &[]).stdout(Stdio::null()));
    let out = run_ok(&mut train(2, &shards, &two, &[]));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.matches("train:").count(),
        1,
        "rank 0 prints: {printed}"
    );
    assert_same_run(&one, &two);

    let refused = train(1, &shards, &two, &["--resume"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("ranks: 2 then, 1 now"), "{err}");
}

/// The pid of the edpo process of MPI rank `rank` writing to `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want_env = format!("OMPI_COMM_WORLD_RANK={rank}");
    let out = out.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
        if cmdline.contains(&out)
            && !cmdline.contains("mpirun")
            && environ.lines().any(|l| l == want_env)
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_rank_that_dies_ends_the_run_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let (one, run): (PathBuf, PathBuf) = (tmp.path().join("one"), tmp.path().join("run"));
    run_ok(train(1, &shards, &one, &[]).stdout(Stdio::null()));
    let mut child = train(2, &shards, &run, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("checkpoints/step-00000004/state.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(&run, 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed_at = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "the other rank ended without hanging"
    );
    assert!(!out.status.success(), "the run reports the failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1") && err.contains("signal 9"), "{err}");
    assert!(!run.join("final").exists());
    run_ok(train(2, &shards, &run, &["--resume"]).stdout(Stdio::null()));
    assert_same_run(&one, &run);
}
