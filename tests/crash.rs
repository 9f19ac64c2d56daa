//! Crash consistency: `edpo train`, `edpo prep` and `edpo eval --per-pair` killed at seeded
//! random moments and at every named crash point, or stopped by a full disk, then rerun with
//! the same command, end exactly where an uninterrupted run ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use common::*;
use rand::{RngExt, SeedableRng};

const TIMING_COLUMNS: [&str; 2] = ["elapsed_s", "pairs_per_s"];

fn prep_cmd(out: &Path, limit: u32, shard_size: u32) -> Command {
    let mut cmd = edpo();
    cmd.args(["--quiet", "prep", "--limit"])
        .arg(limit.to_string())
        .args(["--shard-size", &shard_size.to_string()])
        .arg("--model")
        .arg(sample_bundle())
        .arg("--data")
        .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
        .arg("--out")
        .arg(out);
    cmd
}

/// 60 pairs, 15 steps an epoch, two epochs, a checkpoint after every step.
fn train_cmd(shards: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = edpo();
    cmd.args(["--quiet", "--threads", "1", "train", "--lr", "1e-3"])
        .args(["--beta", "0.1", "--epsilon", "0.05", "--batch-size", "4"])
        .args(["--micro-batch", "2", "--epochs", "2", "--save-every", "1"])
        .arg("--model")
        .arg(sample_bundle())
        .arg("--shards")
        .arg(shards)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// Every row of a Parquet file as one batch, without the timing columns.
fn table(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let mut all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    for name in TIMING_COLUMNS {
        if let Ok(i) = all.schema().index_of(name) {
            all.remove_column(i);
        }
    }
    all
}

/// The run's state at its last checkpoint, without the wall-clock time.
fn final_state(run: &Path) -> serde_json::Value {
    let dir = edpo::train::checkpoint::latest(run).expect("a checkpoint");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("elapsed_s");
    // The run folder is part of the recorded settings (and may change on resume).
    state["config"].as_object_mut().unwrap().remove("out");
    state
}

/// Parameters, β trajectory, metrics, pair records and state equal the uninterrupted run's.
fn assert_same_run(straight: &Path, resumed: &Path, what: &str) {
    let params = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(
        params(straight) == params(resumed),
        "{what}: final parameters differ"
    );
    for file in ["metrics.parquet", "pairs.parquet"] {
        let (a, b) = (table(&straight.join(file)), table(&resumed.join(file)));
        assert_eq!(a.num_rows(), b.num_rows(), "{what}: rows of {file}");
        assert!(a == b, "{what}: {file} differs from the uninterrupted run");
    }
    assert_eq!(final_state(straight), final_state(resumed), "{what}: state");
}

/// Starts `cmd` and kills it with SIGKILL after `delay`; true when it had already finished.
fn kill_after(mut cmd: Command, delay: Duration) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    false
}

fn timed_run(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    run_ok(cmd.stdout(Stdio::null()));
    started.elapsed()
}

#[test]
fn training_killed_at_random_moments_resumes_to_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(&mut prep_cmd(&shards, 60, 25));
    let straight = tmp.path().join("straight");
    let wall = timed_run(&mut train_cmd(&shards, &straight, &[]));
    // Ten or more kills at seeded random moments over a whole run (start-up, steps,
    // checkpoints, table writes, the final folder); each chain of kills is then resumed to the
    // end and compared with the uninterrupted run.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261127);
    let (mut kills, mut chains) = (0, 0);
    while kills < 12 {
        let run = tmp.path().join(format!("chain-{chains}"));
        for _ in 0..rng.random_range(1..=3) {
            let delay = wall.mul_f64(rng.random_range(0.0..1.1));
            if !kill_after(train_cmd(&shards, &run, &["--resume"]), delay) {
                kills += 1;
            }
        }
        run_ok(train_cmd(&shards, &run, &["--resume"]).stdout(Stdio::null()));
        assert_same_run(&straight, &run, &format!("chain {chains}"));
        chains += 1;
    }
}

#[test]
fn training_killed_at_every_crash_point_resumes_to_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(&mut prep_cmd(&shards, 60, 25));
    let straight = tmp.path().join("straight");
    timed_run(&mut train_cmd(&shards, &straight, &[]));
    let points = [
        "table.tmp-written:1",
        "table.tmp-written:6",
        "train.tables-saved:1",
        "train.tables-saved:17",
        "checkpoint.tmp-written:4",
        "checkpoint.renamed:1",
        "checkpoint.renamed:30",
    ];
    for point in points {
        let run = tmp.path().join(point.replace([':', '.'], "-"));
        let out = train_cmd(&shards, &run, &[])
            .env("EDPO_CRASH_AT", point)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), None, "{point}: killed by a signal");
        let resumed = run_ok(train_cmd(&shards, &run, &["--resume"]).stdout(Stdio::piped()));
        let said = String::from_utf8_lossy(&resumed.stdout);
        if point == "table.tmp-written:1" || point == "train.tables-saved:1" {
            assert!(
                said.contains("no checkpoint yet, started from the beginning"),
                "{point}: {said}"
            );
        }
        assert_same_run(&straight, &run, point);
    }
}

/// Runs `script` as root of its own user and mount namespace with a tmpfs of `size` at
/// `mount` (a full disk without touching the machine's), and returns its output.
fn with_small_disk(mount: &Path, size: &str, script: &str) -> std::process::Output {
    std::fs::create_dir_all(mount).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--user", "--map-root-user", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={size} tmpfs '{}' && {script}",
            mount.display()
        ))
        .output()
        .expect("unshare (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("mount:") && !err.contains("unshare:"),
        "this test needs user and mount namespaces (unshare --user --map-root-user): {err}"
    );
    out
}

fn quoted(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn stderr_and_code(out: &std::process::Output) -> (String, Option<i32>) {
    let text = String::from_utf8_lossy(&out.stdout);
    // The script prints the command's exit code on its last stdout line.
    let code = text.lines().last().and_then(|l| l.trim().parse().ok());
    (String::from_utf8_lossy(&out.stderr).into_owned(), code)
}

#[test]
fn training_on_a_full_disk_stops_with_the_path_and_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(&mut prep_cmd(&shards, 60, 25));
    let straight = tmp.path().join("straight");
    timed_run(&mut train_cmd(
        &shards,
        &straight,
        &["--keep-checkpoints", "1"],
    ));
    // A checkpoint of the sample model takes 1.7 MB: the first fits in 2.5 MB, the second not.
    let disk = tmp.path().join("disk");
    let kept = tmp.path().join("kept");
    let run = disk.join("run");
    let cmd = train_cmd(&shards, &run, &["--keep-checkpoints", "1"]);
    let out = with_small_disk(
        &disk,
        "2500k",
        &format!(
            "{}; code=$?; cp -a '{}' '{}'; echo $code",
            quoted(&cmd),
            run.display(),
            kept.display()
        ),
    );
    let (err, code) = stderr_and_code(&out);
    assert_eq!(code, Some(1), "exit code 1 on a full disk: {err}");
    assert!(
        err.contains("No space left on device") && err.contains(&run.display().to_string()),
        "the error names the path: {err}"
    );
    assert!(
        edpo::train::checkpoint::latest(&kept).is_some(),
        "last checkpoint kept"
    );
    run_ok(
        train_cmd(&shards, &kept, &["--keep-checkpoints", "1", "--resume"]).stdout(Stdio::null()),
    );
    assert_same_run(&straight, &kept, "full disk");
}

fn shard_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    edpo::shards::list_shards(dir)
        .unwrap()
        .into_iter()
        .map(|f| (f.file_name().unwrap().into(), std::fs::read(&f).unwrap()))
        .collect()
}

#[test]
fn prep_on_a_full_disk_or_killed_after_a_shard_reruns_to_the_same_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    run_ok(&mut prep_cmd(&straight, 400, 150));
    // Three shards of ~430, 430 and 300 KB: the third does not fit in 1 MB.
    let disk = tmp.path().join("disk");
    let kept = tmp.path().join("kept");
    let out_dir = disk.join("shards");
    let out = with_small_disk(
        &disk,
        "1m",
        &format!(
            "{}; code=$?; cp -a '{}' '{}'; echo $code",
            quoted(&prep_cmd(&out_dir, 400, 150)),
            out_dir.display(),
            kept.display()
        ),
    );
    let (err, code) = stderr_and_code(&out);
    assert_eq!(code, Some(1), "exit code 1 on a full disk: {err}");
    assert!(
        err.contains("No space left on device") && err.contains("part-00002.parquet"),
        "the error names the file: {err}"
    );
    assert_eq!(shard_bytes(&kept).len(), 2, "the shards written are kept");
    run_ok(&mut prep_cmd(&kept, 400, 150));
    assert_eq!(
        shard_bytes(&kept),
        shard_bytes(&straight),
        "full disk, rerun"
    );

    let killed = tmp.path().join("killed");
    let out = prep_cmd(&killed, 400, 150)
        .env("EDPO_CRASH_AT", "prep.shard-written:2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed by a signal");
    run_ok(&mut prep_cmd(&killed, 400, 150));
    assert_eq!(
        shard_bytes(&killed),
        shard_bytes(&straight),
        "killed, rerun"
    );
}

#[test]
fn eval_per_pair_is_whole_or_absent_after_a_kill_and_keeps_the_old_file_on_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(&mut prep_cmd(&shards, 200, 100));
    let eval = |per_pair: &Path| {
        let mut cmd = edpo();
        cmd.args(["--quiet", "eval", "--json", "--model"])
            .arg(sample_bundle())
            .arg("--shards")
            .arg(&shards)
            .arg("--per-pair")
            .arg(per_pair);
        cmd
    };
    let straight = tmp.path().join("straight.parquet");
    let wall = timed_run(&mut eval(&straight));
    let want = std::fs::read(&straight).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for attempt in 0..10 {
        let file = tmp.path().join(format!("killed-{attempt}.parquet"));
        kill_after(eval(&file), wall.mul_f64(rng.random_range(0.0..1.1)));
        if file.exists() {
            assert_eq!(
                std::fs::read(&file).unwrap(),
                want,
                "attempt {attempt}: whole"
            );
        }
        run_ok(eval(&file).stdout(Stdio::null()));
        assert_eq!(
            std::fs::read(&file).unwrap(),
            want,
            "attempt {attempt}: rerun"
        );
    }

    // A per-pair file of 200 pairs (~9 KB) does not fit in 8 KB; the old file stays whole.
    let disk = tmp.path().join("disk");
    let file = disk.join("per-pair.parquet");
    let out = with_small_disk(
        &disk,
        "8k",
        &format!(
            "echo old > '{file}'; {}; code=$?; cat '{file}'; echo $code",
            quoted(&eval(&file)),
            file = file.display()
        ),
    );
    let (err, code) = stderr_and_code(&out);
    assert_eq!(code, Some(1), "exit code 1 on a full disk: {err}");
    assert!(
        err.contains("No space left on device") && err.contains("per-pair.parquet"),
        "the error names the file: {err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("old\n"),
        "the old file is intact: {stdout}"
    );
}
