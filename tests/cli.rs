//! The `edpo` binary run as a user would: exit codes and messages.

mod common;

use common::*;

#[test]
fn verify_passes_on_the_sample_bundle() {
    let out = run_ok(edpo().args(["verify", "--model"]).arg(sample_bundle()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("goldens reproduced"), "{text}");
}

#[test]
fn verify_json_is_machine_readable() {
    let out = run_ok(
        edpo()
            .args(["verify", "--json", "--model"])
            .arg(sample_bundle()),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["passed"], serde_json::Value::Bool(true));
    assert!(v["factor"].as_f64().unwrap() > 1.0 && v["floor"].as_f64().unwrap() > 0.0);
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 9);
    // Every numeric check states ONNX Runtime's error, its band and PyTorch fp32's error.
    let numeric: Vec<_> = checks.iter().filter(|c| c.get("band").is_some()).collect();
    assert!(numeric.len() >= 7, "{checks:?}");
    for c in numeric {
        let (err, band) = (c["error"].as_f64().unwrap(), c["band"].as_f64().unwrap());
        assert!(err <= band && c["torch_fp32"].as_f64().is_some(), "{c}");
    }
}

#[test]
fn corrupted_bundle_exits_2_naming_the_file() {
    let (_tmp, bundle) = bundle_copy();
    std::fs::write(bundle.join("tokenizer.json"), b"{}").unwrap();
    let out = edpo()
        .args(["verify", "--model"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn verify_of_old_goldens_exits_2_asking_for_a_reexport() {
    let (_tmp, bundle) = bundle_copy();
    let path = bundle.join("edpo-model.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["goldens"] = serde_json::json!({"file": "goldens.safetensors", "tolerances": {}});
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let out = edpo()
        .args(["verify", "--model"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("goldens format 1") && err.contains("re-export"),
        "{err}"
    );
}

#[test]
fn missing_onnxruntime_explains_the_install() {
    let out = edpo()
        .args(["verify", "--model"])
        .arg(sample_bundle())
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ORT_DYLIB_PATH") && err.contains("/nonexistent"),
        "{err}"
    );
}

#[test]
fn bad_device_flag_is_a_usage_error() {
    let out = edpo()
        .args(["verify", "--device", "tpu", "--model"])
        .arg(sample_bundle())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device tpu"));
}

#[test]
fn cuda_without_the_gpu_build_fails_loudly_instead_of_falling_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = edpo()
        .args(["--quiet", "prep", "--device", "cuda", "--model"])
        .arg(sample_bundle())
        .arg("--data")
        .arg(repo_root().join("data-samples/prefs/heldout.plain.jsonl"))
        .arg("--out")
        .arg(tmp.path().join("shards"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CUDA execution provider could not be registered")
            && err.contains("onnxruntime-gpu"),
        "{err}"
    );
    assert!(
        !tmp.path()
            .join("shards")
            .join("part-00000.parquet")
            .exists(),
        "nothing was scored on the CPU"
    );
}

#[test]
fn help_documents_every_command() {
    let out = run_ok(edpo().arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "verify", "prep", "train", "eval", "report", "inspect", "study-k",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
}

#[test]
fn inspect_reports_shards_and_plain_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    run_ok(
        edpo()
            .args([
                "--quiet",
                "prep",
                "--limit",
                "40",
                "--shard-size",
                "20",
                "--model",
            ])
            .arg(sample_bundle())
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(&shards),
    );
    let out = run_ok(edpo().arg("inspect").arg(&shards).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"], 40);
    assert_eq!(v["files"], 2);
    let col = |name: &str| {
        v["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        col("ref_chosen_topk_ids")["inner_length_range"],
        serde_json::json!([16.0, 16.0])
    );
    assert!(col("ref_chosen_logps")["max"].as_f64().unwrap() < 0.0);
    assert!(col("chosen_ids")["length_quantiles"][0].as_f64().unwrap() >= 1.0);
    assert_eq!(v["prep"]["topk"], 16);
    let table = run_ok(
        edpo()
            .arg("inspect")
            .arg(repo_root().join("data-samples/prefs/train.plain.parquet")),
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains("1200 rows"));
}

#[test]
fn prep_reads_a_config_file_and_flags_win_over_it() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let config = tmp.path().join("prep.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = [{:?}]\nout = {:?}\ntopk = 4\nlimit = 12\nshard-size = 6\n",
            sample_bundle(),
            repo_root().join("data-samples/prefs/train.plain.jsonl"),
            shards,
        ),
    )
    .unwrap();
    // The file alone is a complete command; --limit on the command line wins over its 12.
    let out = run_ok(
        edpo()
            .args(["--quiet", "prep", "--json", "--limit", "8", "--config"])
            .arg(&config),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pairs_written"], 8);
    assert_eq!(v["topk"], 4);
    assert_eq!(v["shards"], 2);

    // An unknown key is a usage error that names the file and the key.
    std::fs::write(&config, "modle = \"x\"\n").unwrap();
    let out = edpo()
        .args(["prep", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prep.toml") && err.contains("modle"), "{err}");

    // Without --data anywhere: the message says where it may come from.
    std::fs::write(&config, "topk = 4\n").unwrap();
    let out = edpo()
        .args(["prep", "--out", "x", "--model"])
        .arg(sample_bundle())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--data` is required"));
}
