//! `edpo study-k`: at K = V the cached estimate is the exact ε-step (100% agreement), at the
//! reference (every k = 0) and after training (non-zero steps).

mod common;

use std::process::Stdio;

use common::*;

fn study(shards: &std::path::Path, params: Option<&std::path::Path>) -> serde_json::Value {
    let mut cmd = edpo();
    cmd.args([
        "--quiet",
        "study-k",
        "--topks",
        "4,V",
        "--epsilon",
        "0.05",
        "--limit",
        "48",
        "--json",
        "--model",
    ])
    .arg(sample_bundle())
    .arg("--shards")
    .arg(shards);
    if let Some(p) = params {
        cmd.arg("--params").arg(p);
    }
    serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap()
}

#[test]
fn full_vocabulary_cache_agrees_with_the_exact_step_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(
        edpo()
            .args(["--quiet", "prep", "--limit", "64", "--model"])
            .arg(sample_bundle())
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(&shards),
    );
    let at_reference = study(&shards, None);
    assert_eq!(at_reference["pairs"], 48);
    assert_eq!(
        at_reference["exact_steps"][1], 48,
        "policy = reference: every k is 0"
    );
    let v = &at_reference["rows"][1];
    assert_eq!(v["k"], 512);
    assert_eq!(v["agreement_pct"], 100.0);

    let run = tmp.path().join("run");
    run_ok(
        edpo()
            .args([
                "--quiet",
                "train",
                "--lr",
                "1e-3",
                "--beta",
                "0.1",
                "--epsilon",
                "0.05",
                "--batch-size",
                "16",
            ])
            .args(["--micro-batch", "8", "--max-steps", "8", "--model"])
            .arg(sample_bundle())
            .arg("--shards")
            .arg(&shards)
            .arg("--out")
            .arg(&run)
            .stdout(Stdio::null()),
    );
    let trained = study(&shards, Some(&run.join("final/model.safetensors")));
    assert!(
        trained["mean_token_kl"].as_f64().unwrap() > 1e-4,
        "the policy moved: {trained}"
    );
    let moved =
        trained["exact_steps"][0].as_u64().unwrap() + trained["exact_steps"][2].as_u64().unwrap();
    assert!(
        moved > 0,
        "some pairs take a non-zero exact step: {trained}"
    );
    let v = &trained["rows"][1];
    assert_eq!(v["agreement_pct"], 100.0, "{trained}");
    assert!(v["mae_g_plus"].as_f64().unwrap() < 1e-5 && v["mae_g_minus"].as_f64().unwrap() < 1e-5);
}
