//! Helpers shared by the integration tests: the sample bundle, scratch copies, the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn sample_bundle() -> PathBuf {
    repo_root().join("data-samples/bundle")
}

/// A scratch copy of the sample bundle that a test may damage.
pub fn bundle_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("bundle");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for entry in std::fs::read_dir(sample_bundle()).expect("sample bundle exists") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    (dir, dst)
}

/// Rewrites the manifest's recorded sha256 of `file` to match its current content (and drops
/// the recorded reference identity, which then is computed from the files).
pub fn rehash(bundle: &Path, file: &str) {
    let manifest_path = bundle.join("edpo-model.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let digest = edpo::bundle::sha256_file(&bundle.join(file)).unwrap();
    manifest["files"][file]["sha256"] = serde_json::Value::String(digest);
    // The recorded reference identity covers these files too; without it the bundle computes
    // it from them (as for bundles exported before it was recorded).
    if let Some(fields) = manifest.as_object_mut() {
        fields.remove("reference_sha256");
    }
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

/// Replaces every occurrence of `from` by `to` (same length) in a file's bytes.
pub fn replace_bytes(path: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(
        from.len(),
        to.len(),
        "same-length replacement keeps protobuf valid"
    );
    let mut bytes = std::fs::read(path).unwrap();
    let mut count = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            count += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(path, bytes).unwrap();
    count
}

/// The edpo binary, without the variables that would make a prep process a worker of a
/// Slurm array or a Kubernetes Indexed Job (should the tests run inside one).
pub fn edpo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edpo"));
    for var in [
        "SLURM_ARRAY_TASK_ID",
        "JOB_COMPLETION_INDEX",
        "EDPO_WORKERS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("edpo runs");
    assert!(
        out.status.success(),
        "edpo failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Number of cases in a corpus folder (for the ≥20 check).
pub fn corpus_files() -> usize {
    std::fs::read_dir(repo_root().join("tests/malformed"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.path().extension().is_some_and(|x| x != "py"))
                .unwrap_or(false)
        })
        .count()
}
