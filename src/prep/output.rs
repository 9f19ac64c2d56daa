//! The output folder of prep: what it already holds (this run's complete shards, or another
//! run's), the manifest while shards are written, and the complete manifest, written by
//! whichever process finds every shard in place (or by `edpo prep --finalize`).
//!
//! Workers share the folder: they write only their own shards (each through a temporary file
//! of its own, renamed into place), never the manifest while they work; the complete manifest
//! is built from the shards' own metadata, so every process that writes it writes the same
//! bytes as one process would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Plan, PrepConfig, PrepError, EDPO_VERSION};
use crate::shards::{list_shards, ShardManifest, ShardMetadata, ShardStats};
use crate::{table, Error};

fn check_writable(dir: &Path) -> Result<(), PrepError> {
    let unwritable = |message: String| PrepError::Unwritable {
        dir: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| unwritable(e.to_string()))?;
    let probe = table::tmp_path(&dir.join(".edpo-write-probe"));
    std::fs::write(&probe, b"ok").map_err(|e| unwritable(e.to_string()))?;
    std::fs::remove_file(&probe).map_err(|e| unwritable(e.to_string()))
}

/// What `--out` already holds.
enum Existing {
    /// Shards of this very run (same fingerprint), complete ones by index.
    Resumable(BTreeMap<usize, ShardStats>),
    /// Shards of another run or model: refused unless `--overwrite`, and deleted only after
    /// the new input was validated (a failed run must not lose what was there).
    Foreign { what: String, files: Vec<PathBuf> },
}

/// The complete shards of this run in `dir`, by index (a shard is complete once renamed into
/// place; its own metadata says which run and which input rows it holds).
fn complete_shards(dir: &Path, plan: &Plan) -> Result<BTreeMap<usize, ShardStats>, Error> {
    let mut done = BTreeMap::new();
    for f in list_shards(dir)? {
        let Ok(meta) = ShardMetadata::read(&f) else {
            continue;
        };
        let named = f.file_name().is_some_and(|n| *n == *meta.shard.file);
        if meta.fingerprint == plan.fingerprint && named {
            done.insert(meta.shard.index, meta.shard);
        }
    }
    Ok(done)
}

fn existing_shards(dir: &Path, plan: &Plan) -> Result<Existing, Error> {
    let manifest = ShardManifest::read(dir)?;
    let files = list_shards(dir)?;
    let foreign = match &manifest {
        Some(m) if m.fingerprint != plan.fingerprint => Some(format!(
            "reference {} vs {}, settings fingerprint {} vs {}{}",
            short(&m.reference_sha256),
            short(&plan.bundle.reference_sha256),
            short(&m.fingerprint),
            short(&plan.fingerprint),
            differing_settings(&m.settings, &plan.settings)
        )),
        None if !files.is_empty() => Some("shards without a manifest.json".to_string()),
        _ => None,
    };
    if let Some(what) = foreign {
        return Ok(Existing::Foreign { what, files });
    }
    Ok(Existing::Resumable(complete_shards(dir, plan)?))
}

/// `: key: value then, value now; …` for the recorded settings that differ from this run's
/// (empty when none does, e.g. only the reference changed).
fn differing_settings(then: &serde_json::Value, now: &serde_json::Value) -> String {
    let diffs = crate::config::setting_differences(then, now, &[]);
    if diffs.is_empty() {
        String::new()
    } else {
        format!(": {}", diffs.join("; "))
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The shards of this run already complete in `--out`, and the foreign files `--overwrite`
/// will replace (refused without it). Temporary files of killed runs on this host go.
pub(super) fn claim_output(
    cfg: &PrepConfig,
    plan: &Plan,
) -> Result<(BTreeMap<usize, ShardStats>, Vec<PathBuf>), Error> {
    check_writable(&cfg.out)?;
    table::remove_stale_tmp(&cfg.out);
    match existing_shards(&cfg.out, plan)? {
        Existing::Resumable(done) => Ok((done, Vec::new())),
        Existing::Foreign { what, .. } if !cfg.overwrite => Err(PrepError::OtherSettings {
            dir: cfg.out.clone(),
            what,
        }
        .into()),
        Existing::Foreign { files, .. } => Ok((BTreeMap::new(), files)),
    }
}

/// Deletes the foreign files `--overwrite` replaces. Workers keep a file that another worker
/// of this run has put there meanwhile, and one that another worker deleted first is no error.
pub(super) fn remove_replaced(
    cfg: &PrepConfig,
    plan: &Plan,
    files: &[PathBuf],
) -> Result<(), Error> {
    let shared = cfg.worker.shared();
    for f in files {
        if shared && ShardMetadata::read(f).is_ok_and(|m| m.fingerprint == plan.fingerprint) {
            continue;
        }
        match std::fs::remove_file(f) {
            Err(e) if !(shared && e.kind() == std::io::ErrorKind::NotFound) => {
                return Err(PrepError::Unwritable {
                    dir: cfg.out.clone(),
                    message: e.to_string(),
                }
                .into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// The manifest of this run, incomplete, listing `done`.
pub(super) fn manifest(plan: &Plan, shards: Vec<ShardStats>, complete: bool) -> ShardManifest {
    ShardManifest {
        edpo_version: EDPO_VERSION.into(),
        bundle_sha256: plan.bundle.bundle_sha256.clone(),
        reference_sha256: plan.bundle.reference_sha256.clone(),
        fingerprint: plan.fingerprint.clone(),
        topk: plan.topk,
        settings: plan.settings.clone(),
        complete,
        shards,
    }
}

/// A worker's start: the folder gets this run's (incomplete) manifest unless it has one, so
/// that shards never stand without it; one of another run (replaced with `--overwrite`) goes
/// first. Created in one step: a complete manifest is never overwritten by an incomplete one.
pub(super) fn ensure_manifest(
    cfg: &PrepConfig,
    plan: &Plan,
    done: &BTreeMap<usize, ShardStats>,
) -> Result<(), Error> {
    if let Some(m) = ShardManifest::read(&cfg.out)? {
        if m.fingerprint == plan.fingerprint {
            return Ok(());
        }
        let path = cfg.out.join(crate::shards::SHARD_MANIFEST);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(table::TableError::Write {
                    path,
                    message: e.to_string(),
                }
                .into())
            }
            _ => {}
        }
    }
    let m = manifest(plan, done.values().cloned().collect(), false);
    let bytes = serde_json::to_vec_pretty(&m).expect("manifest serialises");
    table::write_file_new(&cfg.out.join(crate::shards::SHARD_MANIFEST), &bytes)?;
    Ok(())
}

/// Writes the complete manifest when all `total` shards of this run are in `--out` (built
/// from their metadata: the bytes one process writes); else the missing shards' indices.
pub(super) fn finalize(
    cfg: &PrepConfig,
    plan: &Plan,
    total: usize,
) -> Result<Result<ShardManifest, Vec<usize>>, Error> {
    let mut done = complete_shards(&cfg.out, plan)?;
    done.retain(|&index, _| index < total);
    let missing: Vec<usize> = (0..total).filter(|i| !done.contains_key(i)).collect();
    if !missing.is_empty() {
        return Ok(Err(missing));
    }
    let m = manifest(plan, done.into_values().collect(), true);
    m.write(&cfg.out)?;
    Ok(Ok(m))
}

/// `--finalize` on a folder whose manifest belongs to another run is refused.
pub(super) fn check_same_run(cfg: &PrepConfig, plan: &Plan) -> Result<(), Error> {
    match existing_shards(&cfg.out, plan)? {
        Existing::Foreign { what, .. } => Err(PrepError::OtherSettings {
            dir: cfg.out.clone(),
            what,
        }
        .into()),
        Existing::Resumable(_) => Ok(()),
    }
}
