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
    assert!(v["checks"].as_array().unwrap().len() >= 9);
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
