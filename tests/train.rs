//! `edpo train`: exact resume after SIGKILL, refusal of other bundles' shards, the non-finite
//! guard, and the graph's per-pair outputs checked against the plain-Rust oracle.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edpo::shards::{list_shards, read_shard, write_shard, ShardMetadata};

fn prep(out: &Path, limit: u32) {
    run_ok(
        edpo()
            .args(["--quiet", "prep", "--shard-size", "200", "--limit"])
            .arg(limit.to_string())
            .arg("--model")
            .arg(sample_bundle())
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(out),
    );
}

fn train_cmd(shards: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = edpo();
    cmd.args([
        "--quiet",
        "--threads",
        "1",
        "train",
        "--lr",
        "1e-3",
        "--beta",
        "0.1",
        "--epsilon",
        "0.05",
    ])
    .args([
        "--batch-size",
        "16",
        "--micro-batch",
        "4",
        "--max-steps",
        "48",
        "--save-every",
        "8",
    ])
    .arg("--model")
    .arg(sample_bundle())
    .arg("--shards")
    .arg(shards)
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

fn params(path: &Path) -> edpo::params::ParamStore {
    let bundle = edpo::bundle::Bundle::open(&sample_bundle()).unwrap();
    bundle.load_params_from(path).unwrap()
}

fn column_f64(path: &Path, name: &str) -> Vec<f64> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let col = b.column_by_name(name).unwrap();
        let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Float64).unwrap();
        let col = col
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        out.extend(col.values().iter().copied());
    }
    out
}

#[test]
fn a_killed_run_resumes_to_the_same_parameters_and_beta() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 400);
    let straight = tmp.path().join("straight");
    run_ok(train_cmd(&shards, &straight, &[]).stdout(Stdio::null()));

    let killed = tmp.path().join("killed");
    let mut child = train_cmd(&shards, &killed, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let marker = killed.join("checkpoints/step-00000016/state.json");
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training finished before it could be killed"
        );
        if marker.exists() {
            child.kill().unwrap();
            child.wait().unwrap();
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(!killed.join("final").exists(), "killed mid-run");
    // Without --resume the run folder is refused.
    let refused = train_cmd(&shards, &killed, &[]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    run_ok(train_cmd(&shards, &killed, &["--resume"]).stdout(Stdio::null()));

    let a = params(&straight.join("final/model.safetensors"));
    let b = params(&killed.join("final/model.safetensors"));
    let max_diff = a
        .params
        .iter()
        .zip(&b.params)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(u, v)| (u - v).abs()))
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-6, "parameters differ by {max_diff}");
    let beta_a = column_f64(&straight.join("metrics.parquet"), "kl/beta");
    let beta_b = column_f64(&killed.join("metrics.parquet"), "kl/beta");
    assert_eq!(beta_a.len(), 48);
    assert_eq!(beta_a, beta_b, "β trajectory");
    let steps_b = column_f64(&killed.join("metrics.parquet"), "step");
    assert_eq!(
        steps_b,
        (0..48).map(f64::from).collect::<Vec<_>>(),
        "one metrics row per step"
    );
    assert_eq!(
        column_f64(&straight.join("pairs.parquet"), "z"),
        column_f64(&killed.join("pairs.parquet"), "z")
    );
}

#[test]
fn resume_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 64);
    let run = tmp.path().join("run");
    run_ok(train_cmd(&shards, &run, &["--max-steps", "2"]).stdout(Stdio::null()));
    let out = train_cmd(
        &shards,
        &run,
        &["--max-steps", "2", "--resume", "--epsilon", "0.2"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("epsilon") && err.contains("0.05") && err.contains("0.2"),
        "{err}"
    );
}

#[test]
fn shards_of_another_reference_are_refused_naming_both_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 32);
    let manifest_path = shards.join("manifest.json");
    let original = std::fs::read(&manifest_path).unwrap();
    let rewrite = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut manifest: serde_json::Value = serde_json::from_slice(&original).unwrap();
        edit(&mut manifest);
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    };
    let bundle = edpo::bundle::Bundle::open(&sample_bundle()).unwrap();
    let fake = "f".repeat(64);
    let refused = |run: &str, real: &str| {
        let out = train_cmd(&shards, &tmp.path().join(run), &[])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(&fake) && err.contains(real), "{err}");
    };
    // Shards are keyed on what the reference computes, not on the bundle's manifest.
    rewrite(&|m| m["reference_sha256"] = serde_json::json!(fake));
    refused("run-a", &bundle.reference_sha256);
    rewrite(&|m| m["bundle_sha256"] = serde_json::json!(fake));
    assert!(edpo::shards::ShardSet::open(&shards, &bundle).is_ok());
    // Shards written before reference identities: only their own bundle reads them.
    rewrite(&|m| {
        m.as_object_mut().unwrap().remove("reference_sha256");
    });
    assert!(edpo::shards::ShardSet::open(&shards, &bundle).is_ok());
    rewrite(&|m| {
        m.as_object_mut().unwrap().remove("reference_sha256");
        m["bundle_sha256"] = serde_json::json!(fake);
    });
    refused("run-b", &bundle.bundle_sha256);
}

/// Rewrites every shard with `poison` applied to its pairs (keeping its metadata).
fn poison_shards(shards: &Path, poison: impl Fn(usize, &mut edpo::shards::ScoredPair)) {
    for f in list_shards(shards).unwrap() {
        let meta = ShardMetadata::read(&f).unwrap();
        let mut pairs = read_shard(&f).unwrap();
        for (i, p) in pairs.iter_mut().enumerate() {
            poison(i, p);
        }
        write_shard(&f, &pairs, &meta).unwrap();
    }
}

#[test]
fn non_finite_steps_are_skipped_and_three_in_a_row_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 64);
    // One poisoned pair in the first 16 rows: exactly the steps that contain it are skipped.
    poison_shards(&shards, |i, p| {
        if i == 3 {
            p.chosen.logps = f32::NAN;
        }
    });
    let run = tmp.path().join("some");
    let out = run_ok(&mut train_cmd(
        &shards,
        &run,
        &["--max-steps", "4", "--json"],
    ));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["nonfinite_skipped"], 1, "{summary}");
    assert_eq!(summary["steps"], 4);
    let skipped = column_f64(&run.join("metrics.parquet"), "skipped_nonfinite");
    assert_eq!(skipped.iter().filter(|v| **v > 0.0).count(), 1);

    poison_shards(&shards, |_, p| p.rejected.logps = f32::INFINITY);
    let run: PathBuf = tmp.path().join("all");
    let out = train_cmd(&shards, &run, &["--max-steps", "4", "--save-every", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 non-finite steps in a row") && err.contains("checkpoint"),
        "{err}"
    );
    assert!(!run.join("final").exists());
}

#[test]
fn graph_outputs_agree_with_the_rust_oracle() {
    use edpo::objective::{decide, EpsDpoSettings, PairLogps};
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 64);
    let run = tmp.path().join("run");
    run_ok(train_cmd(&shards, &run, &["--max-steps", "4"]).stdout(Stdio::null()));
    // pairs.parquet holds the graph's k and logps; the oracle recomputes every derived column.
    let cols = |n: &str| column_f64(&run.join("pairs.parquet"), n);
    let (k, beta_i, z, g) = (cols("k"), cols("beta_i"), cols("z"), cols("g"));
    let (gp, gm, lc, lr, rc, rr) = (
        cols("g_plus"),
        cols("g_minus"),
        cols("logps_chosen"),
        cols("logps_rejected"),
        cols("ref_logps_chosen"),
        cols("ref_logps_rejected"),
    );
    let steps = cols("step");
    let betas = column_f64(&run.join("metrics.parquet"), "kl/beta");
    let mut checked = 0;
    for i in 0..k.len() {
        let s = EpsDpoSettings {
            beta: betas[steps[i] as usize],
            epsilon: 0.05,
            label_smoothing: 0.0,
            step_tolerance: 1e-6,
        };
        // Perturbed sums are only known as differences here: put them on the chosen side.
        let l = PairLogps {
            chosen: lc[i],
            rejected: lr[i],
            chosen_plus: gp[i] + lr[i],
            rejected_plus: lr[i],
            chosen_minus: gm[i] + lr[i],
            rejected_minus: lr[i],
            ref_chosen: rc[i],
            ref_rejected: rr[i],
        };
        let d = decide(&l, &s);
        assert!((d.g - g[i]).abs() < 1e-9 && (d.z - z[i]).abs() < 1e-9);
        if d.margin > 10.0 * edpo::objective::tolerance(1e-6, lc[i], lr[i]) {
            assert_eq!(f64::from(d.k), k[i], "pair {i}: oracle k vs graph k");
            assert!((d.beta_i - beta_i[i]).abs() < 1e-12);
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn the_pair_loader_hands_out_every_row_and_rereads_a_row_asked_for_again() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 450); // three shards: 200, 200, 50 rows
    let bundle = edpo::bundle::Bundle::open(&sample_bundle()).unwrap();
    let set = edpo::shards::ShardSet::open(&shards, &bundle).unwrap();
    let mut loader = edpo::shards::PairLoader::new(&set);
    // The order of an epoch: shard after shard, so each row leaves the cache once used.
    let plan = edpo::train::plan::epoch_plan(&set, 7, 0, 64, 16);
    let mut seen = std::collections::HashSet::new();
    for step in &plan {
        for &i in step.micro_batches.iter().flatten() {
            let pair = loader.get(&set.pairs[i]).unwrap();
            assert_eq!(pair.pair.pair_id, set.pairs[i].pair_id);
            assert!(seen.insert(i), "row {i} planned twice");
        }
    }
    assert_eq!(seen.len(), set.pairs.len());
    // A row already handed out comes back from a fresh read of its shard.
    let again = loader.get(&set.pairs[0]).unwrap();
    assert_eq!(again.pair.pair_id, set.pairs[0].pair_id);
    let direct =
        &read_shard(&set.files[set.pairs[0].shard as usize]).unwrap()[set.pairs[0].row as usize];
    assert_eq!(again.chosen.topk_ids, direct.chosen.topk_ids);
}

#[test]
fn graph_cache_is_written_by_the_first_run_and_loaded_by_the_next_with_the_same_records() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards, 32);
    let cache = tmp.path().join("graphs");
    let cache_flag = cache.to_str().unwrap();
    let mut uses = Vec::new();
    for run in ["plain", "first", "second"] {
        let flags: &[&str] = match run {
            "plain" => &["--max-steps", "2", "--json"],
            _ => &["--max-steps", "2", "--json", "--graph-cache", cache_flag],
        };
        let out = run_ok(&mut train_cmd(&shards, &tmp.path().join(run), flags));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        uses.push(summary["graph_cache"]["use"].as_str().unwrap().to_string());
    }
    assert_eq!(uses, ["off", "written", "loaded"]);
    let records = |run: &str| std::fs::read(tmp.path().join(run).join("pairs.parquet")).unwrap();
    assert_eq!(records("plain"), records("second"));
}
