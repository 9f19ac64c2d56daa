//! `edpo prep` split across worker processes (`--worker I/N`, Slurm array and Kubernetes
//! Indexed Job variables): concurrent workers write exactly the files of one process (shard
//! bytes and manifest.json), also when ids repeat across shards and workers, when a worker is
//! killed and rerun, and when two workers get the same index.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use common::*;

/// Rows of the sample set with ids that repeat across shards of 30 rows (8 shards of 240; with
/// 3 workers shard i is worker i mod 3's): row 5 (shard 0) is skipped for a null `chosen`, so
/// row 50 (shard 1), with its id, is kept and rows 130 (shard 4) and 239 (shard 7) are
/// duplicates; row 95 (shard 3) repeats row 40's id (shard 1, another worker's); row 220
/// (shard 7) repeats row 70's (shard 2), row 215 (shard 7) row 200's (shard 6).
fn rows_with_duplicates() -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text =
        std::fs::read_to_string(repo_root().join("data-samples/prefs/train.plain.jsonl")).unwrap();
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = text
        .lines()
        .take(240)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let id = |s: &str| serde_json::Value::String(s.into());
    rows[5].insert("id".into(), id("dup-a"));
    rows[5].insert("chosen".into(), serde_json::Value::Null);
    rows[50].insert("id".into(), id("dup-a"));
    rows[130].insert("id".into(), id("dup-a"));
    let row_40 = rows[40]["id"].clone();
    rows[95].insert("id".into(), row_40);
    rows[70].insert("id".into(), id("dup-c"));
    rows[220].insert("id".into(), id("dup-c"));
    rows[200].insert("id".into(), id("dup-b"));
    rows[215].insert("id".into(), id("dup-b"));
    rows[239].insert("id".into(), id("dup-a"));
    rows
}

fn write_jsonl(path: &Path, rows: &[serde_json::Map<String, serde_json::Value>], with_id: bool) {
    let mut text = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut row = row.clone();
        if !with_id {
            row.remove("id");
        }
        text.push_str(&serde_json::Value::Object(row).to_string());
        // Blank lines are not rows: workers counting lines must agree.
        text.push_str(if i % 7 == 3 { "\n\n" } else { "\n" });
    }
    std::fs::write(path, text).unwrap();
}

/// The rows as one Arrow record batch of strings.
fn record_batch(rows: &[serde_json::Map<String, serde_json::Value>]) -> RecordBatch {
    let column = |name: &str| -> ArrayRef {
        let values: StringArray = rows
            .iter()
            .map(|r| r.get(name).and_then(|v| v.as_str()).map(str::to_string))
            .collect();
        Arc::new(values)
    };
    RecordBatch::try_from_iter(["id", "prompt", "chosen", "rejected"].map(|n| (n, column(n))))
        .unwrap()
}

/// The same rows as an Arrow IPC stream (the `datasets` save_to_disk format), 16 rows a batch.
fn write_arrow(path: &Path, rows: &[serde_json::Map<String, serde_json::Value>]) {
    let batch = record_batch(rows);
    let file = std::fs::File::create(path).unwrap();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(file, &batch.schema()).unwrap();
    for start in (0..batch.num_rows()).step_by(16) {
        let n = 16.min(batch.num_rows() - start);
        writer.write(&batch.slice(start, n)).unwrap();
    }
    writer.finish().unwrap();
}

/// The same rows as Parquet, 16 rows per row group (shards start inside row groups).
fn write_parquet(path: &Path, rows: &[serde_json::Map<String, serde_json::Value>]) {
    let batch = record_batch(rows);
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(16))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn prep(data: &[PathBuf], out: &Path) -> Command {
    let mut cmd = edpo();
    cmd.args(["--quiet", "--threads", "1", "prep", "--json"])
        .args(["--shard-size", "30", "--batch-tokens", "2048", "--model"])
        .arg(sample_bundle())
        .arg("--out")
        .arg(out);
    for d in data {
        cmd.arg("--data").arg(d);
    }
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn summary_of(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "worker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every file of a folder (name → bytes).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn assert_same_files(got: &Path, want: &Path, what: &str) {
    let (got, want) = (files(got), files(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the same file names"
    );
    for (name, bytes) in &want {
        assert!(got[name] == *bytes, "{what}: {name} differs");
    }
}

/// Runs workers `indices` of `count` at once over `data` into `out`; their summaries.
fn run_workers(
    data: &[PathBuf],
    out: &Path,
    count: usize,
    indices: &[usize],
) -> Vec<serde_json::Value> {
    let children: Vec<Child> = indices
        .iter()
        .map(|i| {
            let mut cmd = prep(data, out);
            cmd.args(["--worker", &format!("{i}/{count}")]);
            spawn(cmd)
        })
        .collect();
    children.into_iter().map(summary_of).collect()
}

#[test]
fn three_concurrent_workers_write_the_files_of_one_process_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = rows_with_duplicates();
    let jsonl = tmp.path().join("pairs.jsonl");
    let parquet = tmp.path().join("pairs.parquet");
    let arrow = tmp.path().join("pairs.arrow");
    write_jsonl(&jsonl, &rows, true);
    write_parquet(&parquet, &rows);
    write_arrow(&arrow, &rows);
    for data in [jsonl, parquet, arrow] {
        let kind = data.extension().unwrap().to_string_lossy().into_owned();
        let one = tmp.path().join(format!("one-{kind}"));
        let alone = summary_of(spawn(prep(std::slice::from_ref(&data), &one)));
        assert_eq!(alone["skipped"]["duplicate_id"], 5, "{kind}: {alone}");
        assert_eq!(alone["skipped"]["null_field"], 1, "{kind}: {alone}");
        let many = tmp.path().join(format!("workers-{kind}"));
        let summaries = run_workers(std::slice::from_ref(&data), &many, 3, &[0, 1, 2]);
        assert_same_files(&many, &one, &kind);
        assert!(
            summaries.iter().any(|s| s["complete"] == true),
            "one wrote the manifest"
        );
        let shards: Vec<u64> = summaries
            .iter()
            .map(|s| s["shards"].as_u64().unwrap())
            .collect();
        assert_eq!(shards, [3, 3, 2], "{kind}: shards 0,3,6 / 1,4,7 / 2,5");
        // The worker of shards 1, 4 and 7 read the ids of the rows of shards 0, 2, 3, 5 and 6,
        // and in full rows 5, 70 and 200, whose ids its rows repeat.
        let input = &summaries[1]["input"];
        assert_eq!(input["id_rows_scanned"], 150, "{kind}: {input}");
        assert_eq!(input["id_candidates"], 3, "{kind}: {input}");
    }
}

#[test]
fn ids_from_file_name_and_row_repeat_across_folders_for_workers_too() {
    // Without an id column a pair's id is file name + row: the same file name in two folders
    // makes every row of the second a duplicate of the first's.
    let tmp = tempfile::tempdir().unwrap();
    let rows = &rows_with_duplicates()[..50];
    let data: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|d| {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
            let p = tmp.path().join(d).join("pairs.jsonl");
            write_jsonl(&p, rows, false);
            p
        })
        .collect();
    let one = tmp.path().join("one");
    let alone = summary_of(spawn(prep(&data, &one)));
    assert_eq!(alone["skipped"]["duplicate_id"], 49, "{alone}");
    let many = tmp.path().join("workers");
    run_workers(&data, &many, 3, &[2, 0, 1]);
    assert_same_files(&many, &one, "ids from file names");
}

/// A temporary folder with the JSONL pairs of `rows_with_duplicates` and their one-process
/// prep in `one/`: (folder, the data as `--data`, the one-process output).
fn prepped_with_duplicates() -> (tempfile::TempDir, [PathBuf; 1], PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    write_jsonl(&data, &rows_with_duplicates(), true);
    let data = [data];
    let one = tmp.path().join("one");
    summary_of(spawn(prep(&data, &one)));
    (tmp, data, one)
}

#[test]
fn a_killed_worker_reruns_only_its_missing_shards() {
    let (tmp, data, one) = prepped_with_duplicates();
    let many = tmp.path().join("workers");
    run_workers(&data, &many, 3, &[0, 2]);
    // Worker 1 is killed right after its second shard is in place.
    let killed = prep(&data, &many)
        .args(["--worker", "1/3"])
        .env("EDPO_CRASH_AT", "prep.shard-written:2")
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), None, "killed by a signal");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(many.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["complete"], false,
        "incomplete while a shard is missing"
    );
    let rerun = run_workers(&data, &many, 3, &[1]).remove(0);
    assert_eq!(rerun["shards_reused"], 2, "{rerun}");
    assert_eq!(rerun["shards"], 3, "{rerun}");
    assert_eq!(rerun["complete"], true, "{rerun}");
    assert_same_files(&many, &one, "killed and rerun");
}

#[test]
fn two_workers_with_the_same_index_corrupt_nothing() {
    let (tmp, data, one) = prepped_with_duplicates();
    let many = tmp.path().join("workers");
    run_workers(&data, &many, 2, &[1, 0, 1, 0]);
    assert_same_files(&many, &one, "doubled indices");
}

#[test]
fn slurm_array_and_indexed_job_variables_pick_the_worker() {
    let (tmp, data, one) = prepped_with_duplicates();
    // `sbatch --array=1-3`: task ids 1, 2, 3 are workers 0, 1, 2 of 3.
    let slurm = tmp.path().join("slurm");
    let children: Vec<Child> = (1..=3)
        .map(|task| {
            let mut cmd = prep(&data, &slurm);
            cmd.env("SLURM_ARRAY_TASK_ID", task.to_string())
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_MAX", "3")
                .env("SLURM_ARRAY_TASK_COUNT", "3");
            spawn(cmd)
        })
        .collect();
    let workers: Vec<String> = children
        .into_iter()
        .map(|c| summary_of(c)["worker"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(workers, ["0/3", "1/3", "2/3"]);
    assert_same_files(&slurm, &one, "slurm");
    // An Indexed Job of 2 completions.
    let k8s = tmp.path().join("k8s");
    let children: Vec<Child> = (0..2)
        .map(|index| {
            let mut cmd = prep(&data, &k8s);
            cmd.env("JOB_COMPLETION_INDEX", index.to_string())
                .env("EDPO_WORKERS", "2");
            spawn(cmd)
        })
        .collect();
    children.into_iter().for_each(|c| drop(summary_of(c)));
    assert_same_files(&k8s, &one, "indexed job");
}

fn expect_usage_error(cmd: &mut Command, needles: &[&str]) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn bad_worker_settings_exit_2_naming_the_flag_or_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = [repo_root().join("data-samples/prefs/heldout.plain.jsonl")];
    let out = tmp.path().join("out");
    expect_usage_error(
        prep(&data, &out).args(["--worker", "3/2"]),
        &["`--worker 3/2`"],
    );
    expect_usage_error(prep(&data, &out).args(["--worker", "1"]), &["INDEX/COUNT"]);
    expect_usage_error(
        prep(&data, &out).env("JOB_COMPLETION_INDEX", "1"),
        &["JOB_COMPLETION_INDEX=1", "--workers N", "EDPO_WORKERS"],
    );
    expect_usage_error(
        prep(&data, &out)
            .env("SLURM_ARRAY_TASK_ID", "7")
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .env("SLURM_ARRAY_TASK_COUNT", "3"),
        &["SLURM_ARRAY_TASK_ID=7", "--array"],
    );
    expect_usage_error(
        prep(&data, &out).args(["--workers", "3"]),
        &["--worker I/3"],
    );
    assert!(!out.join("manifest.json").exists(), "nothing written");
}

#[test]
fn finalize_names_missing_shards_then_writes_the_manifest_of_one_process() {
    let (tmp, data, one) = prepped_with_duplicates();
    let many = tmp.path().join("workers");
    run_workers(&data, &many, 2, &[0]);
    let incomplete = std::fs::read(many.join("manifest.json")).unwrap();
    expect_usage_error(
        prep(&data, &many).arg("--finalize"),
        &["--finalize", "lacks shards 1, 3, 5, 7 of 8"],
    );
    run_workers(&data, &many, 2, &[1]);
    assert_same_files(&many, &one, "the last worker wrote the manifest");
    // A manifest left incomplete (the last worker could not see the others' shards yet, as on
    // a network file system): `--finalize` completes it.
    std::fs::write(many.join("manifest.json"), incomplete).unwrap();
    let done = summary_of(spawn({
        let mut cmd = prep(&data, &many);
        cmd.arg("--finalize");
        cmd
    }));
    assert_eq!(done["complete"], true, "{done}");
    assert_eq!(done["pairs_written"], 234, "{done}");
    assert_same_files(&many, &one, "finalize");
}
