//! A shards folder's `manifest.json` (what made it, whether it is complete, every shard's
//! statistics), shard file names, and the shard files a folder holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ShardError;
use crate::table::{self, TableError};

pub const SHARD_MANIFEST: &str = "manifest.json";

/// Statistics of one shard (also stored in its own metadata, so a shard renamed into place
/// just before a crash is still accounted for on resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardStats {
    pub file: String,
    pub index: usize,
    pub first_source_row: u64,
    pub rows_in: u64,
    pub pairs: u64,
    pub skipped: BTreeMap<String, u64>,
    /// Response tokens scored (chosen + rejected).
    pub response_tokens: u64,
    /// The pairs' rows' tokens (both rows in full), padding excluded; the tokens run through
    /// the scoring graph, padding included.
    pub sequence_tokens: u64,
    pub padded_tokens: u64,
    /// Tokens of the common prefixes that a pair's two rows ran once (a scoring graph that
    /// shares each pair's prefix; 0 otherwise and in shards written before it was recorded).
    #[serde(default)]
    pub shared_tokens: u64,
}

/// `manifest.json` of a shards folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardManifest {
    pub edpo_version: String,
    pub bundle_sha256: String,
    /// What the reference computes (`Bundle::reference_sha256`): the shards' identity that
    /// train, eval and study-k check. Empty in shards written before it was recorded (then the
    /// bundle itself must match).
    #[serde(default)]
    pub reference_sha256: String,
    pub fingerprint: String,
    pub topk: usize,
    pub settings: serde_json::Value,
    pub complete: bool,
    pub shards: Vec<ShardStats>,
}

impl ShardManifest {
    /// The manifest of `dir`; None when it has none.
    pub fn read(dir: &Path) -> Result<Option<ShardManifest>, crate::Error> {
        let path = dir.join(SHARD_MANIFEST);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                ShardError::NotAShard {
                    path,
                    message: format!("bad manifest.json: {e}"),
                }
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TableError::Read {
                path,
                message: e.to_string(),
            }
            .into()),
        }
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), TableError> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        table::write_file(&dir.join(SHARD_MANIFEST), &bytes)
    }
}

/// The file name of shard `index`.
pub fn shard_file_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// The shard files of a folder, sorted by name.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>, TableError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TableError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        })
        .collect();
    files.sort();
    Ok(files)
}
