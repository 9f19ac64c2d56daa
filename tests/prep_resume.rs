//! `edpo prep` resume: SIGKILL at several points, rerun, and the shards equal an
//! uninterrupted run's (same pair ids, bit-identical values); reruns reuse complete shards.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edpo::shards::{list_shards, read_shard, ShardManifest};

fn prep_cmd(out: &Path) -> Command {
    let mut cmd = edpo();
    cmd.args([
        "--quiet",
        "--threads",
        "1",
        "prep",
        "--shard-size",
        "60",
        "--batch-tokens",
        "512",
        "--model",
    ])
    .arg(sample_bundle())
    .arg("--data")
    .arg(repo_root().join("data-samples/prefs/train.chat.jsonl"))
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn count_shards(out: &Path) -> usize {
    list_shards(out).map(|v| v.len()).unwrap_or(0)
}

fn has_tmp(out: &Path) -> bool {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        })
        .unwrap_or(false)
}

/// Starts prep and SIGKILLs it once `ready` holds; returns whether it was killed mid-run.
fn run_and_kill(out: &Path, ready: impl Fn(&Path) -> bool) -> bool {
    let mut child = prep_cmd(out).spawn().expect("spawn edpo");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "prep failed before it could be killed");
            return false;
        }
        if ready(out) {
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "prep never reached the kill point"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn all_pairs(out: &Path) -> Vec<edpo::shards::ScoredPair> {
    let mut pairs = Vec::new();
    for f in list_shards(out).unwrap() {
        pairs.extend(read_shard(&f).unwrap());
    }
    pairs
}

#[test]
fn killed_runs_resume_to_exactly_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let reference: PathBuf = tmp.path().join("uninterrupted");
    run_ok(&mut prep_cmd(&reference));
    let expected = all_pairs(&reference);
    assert!(expected.len() > 1000);

    let out = tmp.path().join("killed");
    let mut kills = 0;
    // 1: after the manifest is written, before any shard exists.
    kills += run_and_kill(&out, |o| {
        o.join("manifest.json").exists() && count_shards(o) == 0
    }) as usize;
    // 2: while a shard is being written (its .tmp exists), or right after the third.
    kills += run_and_kill(&out, |o| has_tmp(o) || count_shards(o) >= 3) as usize;
    // 3: in the middle of the run.
    kills += run_and_kill(&out, |o| count_shards(o) >= 9) as usize;
    // 4: near the end.
    kills += run_and_kill(&out, |o| count_shards(o) >= 17) as usize;
    assert!(kills >= 3, "only {kills} kills landed mid-run");
    let partial = ShardManifest::read(&out).unwrap().expect("manifest");
    assert!(!partial.complete, "a killed run is not complete");

    run_ok(&mut prep_cmd(&out));
    let got = all_pairs(&out);
    assert_eq!(got.len(), expected.len(), "no pair lost or duplicated");
    let ids: Vec<u64> = got.iter().map(|p| p.pair.pair_id).collect();
    let want_ids: Vec<u64> = expected.iter().map(|p| p.pair.pair_id).collect();
    assert_eq!(ids, want_ids, "same pair ids in the same order");
    assert!(got == expected, "same values, bit for bit");
    let manifest = ShardManifest::read(&out).unwrap().unwrap();
    assert!(manifest.complete);
    assert_eq!(manifest.shards.len(), count_shards(&out));
    assert!(!has_tmp(&out), "no temporary files left behind");
}

#[test]
fn rerunning_a_complete_run_reuses_every_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    let mut cmd = edpo();
    cmd.args([
        "--quiet",
        "prep",
        "--limit",
        "150",
        "--shard-size",
        "50",
        "--json",
        "--model",
    ])
    .arg(sample_bundle())
    .arg("--data")
    .arg(repo_root().join("data-samples/prefs/train.plain.parquet"))
    .arg("--out")
    .arg(&out);
    let first: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    let before: Vec<Vec<u8>> = list_shards(&out)
        .unwrap()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let second: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    let after: Vec<Vec<u8>> = list_shards(&out)
        .unwrap()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(first["shards"], 3);
    assert_eq!(second["shards_reused"], 3);
    assert_eq!(first["pairs_written"], second["pairs_written"]);
    assert_eq!(before, after);
}
