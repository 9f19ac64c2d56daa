//! LoRA bundles (`data-samples/bundle-lora`: the sample model with rank-8 adapters on q_proj
//! and v_proj): one prep serves the full and the LoRA bundle of the same base; training holds
//! and checkpoints the adapters only and resumes exactly; `final/` is a PEFT adapter folder and
//! `--merge` adds the merged model, which scores as the adapter does; verify checks every
//! adapter gradient.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use edpo::bundle::Bundle;
use edpo::params::ParamStore;

fn lora_bundle() -> PathBuf {
    repo_root().join("data-samples/bundle-lora")
}

fn prep(model: &Path, out: &Path, limit: u32) -> String {
    let out = run_ok(
        edpo()
            .args([
                "--quiet",
                "prep",
                "--shard-size",
                "100",
                "--json",
                "--limit",
            ])
            .arg(limit.to_string())
            .arg("--model")
            .arg(model)
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(out),
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn train_cmd(model: &Path, shards: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = edpo();
    cmd.args(["--quiet", "--threads", "1", "train", "--lr", "1e-2"])
        .args(["--beta", "0.1", "--epsilon", "0.05", "--batch-size", "8"])
        .args([
            "--micro-batch",
            "4",
            "--max-steps",
            "12",
            "--save-every",
            "4",
        ])
        .arg("--model")
        .arg(model)
        .arg("--shards")
        .arg(shards)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(Stdio::null());
    cmd
}

fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let mut names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    names.sort();
    names
}

fn eval_z(model: &Path, shards: &Path, params: &Path, out: &Path) -> Vec<f64> {
    run_ok(
        edpo()
            .args(["--quiet", "eval", "--model"])
            .arg(model)
            .arg("--shards")
            .arg(shards)
            .arg("--params")
            .arg(params)
            .arg("--per-pair")
            .arg(out)
            .stdout(Stdio::null()),
    );
    let file = std::fs::File::open(out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    reader
        .flat_map(|b| {
            let b = b.unwrap();
            let z = b.column_by_name("z").unwrap();
            let z = z
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap();
            z.values().to_vec()
        })
        .collect()
}

#[test]
fn the_lora_bundle_shares_the_full_bundles_reference_and_its_shards() {
    let full = Bundle::open(&sample_bundle()).unwrap();
    let lora = Bundle::open(&lora_bundle()).unwrap();
    assert_eq!(full.reference_sha256, lora.reference_sha256);
    assert_ne!(full.bundle_sha256, lora.bundle_sha256);
    assert_eq!(
        lora.manifest.reference_sha256.as_deref(),
        Some(lora.reference_sha256.as_str())
    );
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&sample_bundle(), &shards, 200);
    // Prep with the LoRA bundle into the same folder: the same run, nothing to score again.
    let summary: serde_json::Value =
        serde_json::from_str(&prep(&lora_bundle(), &shards, 200)).unwrap();
    assert_eq!(summary["shards_reused"], 2, "{summary}");
    assert_eq!(summary["shards"], 2, "{summary}");
}

#[test]
fn one_prep_trains_both_bundles_and_the_lora_run_holds_the_adapter_only() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&sample_bundle(), &shards, 96);
    let full_run = tmp.path().join("full");
    run_ok(&mut train_cmd(&sample_bundle(), &shards, &full_run, &[]));
    assert!(full_run.join("final/model.safetensors").is_file());
    let run = tmp.path().join("lora");
    run_ok(&mut train_cmd(&lora_bundle(), &shards, &run, &["--merge"]));

    let bundle = Bundle::open(&lora_bundle()).unwrap();
    let mut adapters: Vec<String> = bundle
        .trainable_layout()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    adapters.sort();
    assert_eq!(adapters.len(), 8);
    assert!(adapters.iter().all(|n| n.contains(".lora_")));
    let checkpoint = run.join("checkpoints/step-00000012");
    assert_eq!(
        safetensors_names(&checkpoint.join("model.safetensors")),
        adapters
    );
    let moments = safetensors_names(&checkpoint.join("optimizer.safetensors"));
    assert_eq!(moments.len(), 2 * adapters.len());
    assert!(moments.iter().all(|n| n.contains(".lora_")), "{moments:?}");
    // final/: a PEFT adapter folder, and the merged model with the full bundle's parameters.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(run.join("final").join(f).is_file(), "final/{f}");
    }
    assert_eq!(
        safetensors_names(&run.join("final/adapter_model.safetensors")),
        adapters
    );
    let merged = run.join("final/merged/model.safetensors");
    let full = Bundle::open(&sample_bundle()).unwrap();
    let merged_params: ParamStore = full.load_params_from(&merged).unwrap();
    let base = full.load_params().unwrap();
    let changed: Vec<&str> = merged_params
        .params
        .iter()
        .zip(&base.params)
        .filter(|(m, b)| m.data != b.data)
        .map(|(m, _)| m.name.as_str())
        .collect();
    assert_eq!(
        changed.len(),
        4,
        "q_proj and v_proj of two layers: {changed:?}"
    );
    assert!(changed
        .iter()
        .all(|n| n.ends_with("q_proj.weight") || n.ends_with("v_proj.weight")));

    // The adapter scored by the LoRA bundle = the merged model scored by the full bundle.
    let z_lora = eval_z(
        &lora_bundle(),
        &shards,
        &run.join("final"),
        &tmp.path().join("a.parquet"),
    );
    let z_merged = eval_z(
        &sample_bundle(),
        &shards,
        &merged,
        &tmp.path().join("b.parquet"),
    );
    assert_eq!(z_lora.len(), 96);
    assert_eq!(z_lora, z_merged);
    assert!(
        z_lora.iter().any(|z| z.abs() > 1e-3),
        "the adapter moved the policy"
    );
    // A checkpoint's adapter is accepted too, and study-k scores the merged policy.
    let z_ckpt = eval_z(
        &lora_bundle(),
        &shards,
        &checkpoint,
        &tmp.path().join("c.parquet"),
    );
    assert_eq!(z_ckpt, z_lora);
    let out = run_ok(
        edpo()
            .args([
                "--quiet", "study-k", "--topks", "4,V", "--limit", "8", "--json",
            ])
            .arg("--model")
            .arg(lora_bundle())
            .arg("--shards")
            .arg(&shards)
            .arg("--params")
            .arg(run.join("final/adapter_model.safetensors")),
    );
    let study: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(study["mean_token_kl"].as_f64().unwrap() > 0.0, "{study}");
}

#[test]
fn a_lora_run_killed_after_a_checkpoint_resumes_to_the_same_adapter_and_beta() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&sample_bundle(), &shards, 96);
    let straight = tmp.path().join("straight");
    run_ok(&mut train_cmd(&lora_bundle(), &shards, &straight, &[]));
    let killed = tmp.path().join("killed");
    let status = train_cmd(&lora_bundle(), &shards, &killed, &[])
        .env("EDPO_CRASH_AT", "checkpoint.renamed:2")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "killed at the second checkpoint");
    assert!(!killed.join("final").exists());
    run_ok(&mut train_cmd(
        &lora_bundle(),
        &shards,
        &killed,
        &["--resume"],
    ));
    let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("final/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter equals the uninterrupted run's bit for bit"
    );
    let state = |run: &Path| -> serde_json::Value {
        let dir = run.join("checkpoints/step-00000012/state.json");
        serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap()
    };
    assert_eq!(state(&straight)["beta"], state(&killed)["beta"]);
}

#[test]
fn merge_needs_a_lora_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&sample_bundle(), &shards, 16);
    let out = train_cmd(
        &sample_bundle(),
        &shards,
        &tmp.path().join("run"),
        &["--merge"],
    )
    .stdout(Stdio::piped())
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--merge") && err.contains("not a LoRA bundle"),
        "{err}"
    );
}

#[test]
fn verify_checks_every_adapter_gradient() {
    let config = edpo::runtime::SessionConfig::default();
    let report = edpo::goldens::verify(&lora_bundle(), &config).unwrap();
    assert!(report.passed(), "{report:?}");
    let check = report.check("gradients, 8 tensors (rel)").unwrap();
    assert!(check.error.unwrap() < 1e-5, "{check:?}");
    // Two gradient outputs of equal shape swapped: both tensors fail, far outside the band.
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("bundle");
    std::fs::create_dir_all(dst.join("adapter")).unwrap();
    for f in [
        "edpo-model.json",
        "config.json",
        "goldens.safetensors",
        "params.safetensors",
        "policy.train.onnx",
        "reference.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        std::fs::copy(lora_bundle().join(f), dst.join(f)).unwrap();
    }
    let manifest_path = dst.join("edpo-model.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let b = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let grads = &mut manifest["graphs"]["train"]["grad_outputs"];
    grads[format!("grad.{a}")] = serde_json::json!(b);
    grads[format!("grad.{b}")] = serde_json::json!(a);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let report = edpo::goldens::verify(&dst, &config).unwrap();
    assert!(!report.passed());
    for name in [a, b] {
        let check = report.check(&format!("grad {name} (rel)")).unwrap();
        assert!(
            check.error.unwrap() > 100.0 * check.band.unwrap(),
            "{check:?}"
        );
    }
}
