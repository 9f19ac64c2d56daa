//! The `edpo.*` key-value metadata in every shard's Parquet footer: what made the shard (edpo
//! version, bundle, reference identity, settings and their fingerprint, top-K size, chat template) and which input
//! rows it holds, so a shard renamed into place just before a crash is still accounted for.

use std::collections::BTreeMap;
use std::path::Path;

use super::{ShardError, ShardStats};

/// The metadata keys, as written in the Parquet footer.
pub mod keys {
    pub const VERSION: &str = "edpo.version";
    pub const BUNDLE_SHA256: &str = "edpo.bundle_sha256";
    pub const REFERENCE_SHA256: &str = "edpo.reference_sha256";
    pub const FINGERPRINT: &str = "edpo.fingerprint";
    pub const TOPK: &str = "edpo.topk";
    pub const TEMPLATE_SHA256: &str = "edpo.template_sha256";
    pub const SETTINGS: &str = "edpo.settings";
    pub const SHARD: &str = "edpo.shard";
}

/// A shard's `edpo.*` metadata, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardMetadata {
    pub version: String,
    pub bundle_sha256: String,
    /// What the reference computes (`Bundle::reference_sha256`); "" in shards written before
    /// it was recorded.
    pub reference_sha256: String,
    /// sha256 of the prep settings (`settings`); equal fingerprints mean the same run.
    pub fingerprint: String,
    pub topk: usize,
    /// sha256 of the chat template ("" without one).
    pub template_sha256: String,
    /// The prep settings as JSON.
    pub settings: serde_json::Value,
    /// Which input rows the shard holds and what was done with them.
    pub shard: ShardStats,
}

impl ShardMetadata {
    /// The key-value pairs of the footer.
    pub fn to_key_values(&self) -> BTreeMap<String, String> {
        let shard = serde_json::to_string(&self.shard).expect("shard statistics serialise");
        [
            (keys::VERSION, self.version.clone()),
            (keys::BUNDLE_SHA256, self.bundle_sha256.clone()),
            (keys::REFERENCE_SHA256, self.reference_sha256.clone()),
            (keys::FINGERPRINT, self.fingerprint.clone()),
            (keys::TOPK, self.topk.to_string()),
            (keys::TEMPLATE_SHA256, self.template_sha256.clone()),
            (keys::SETTINGS, self.settings.to_string()),
            (keys::SHARD, shard),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Reads the metadata back from a footer's key-value pairs (`path` names the file in
    /// errors).
    pub fn from_key_values(
        path: &Path,
        kv: &BTreeMap<String, String>,
    ) -> Result<ShardMetadata, ShardError> {
        let not_shard = |message: String| ShardError::NotAShard {
            path: path.to_path_buf(),
            message,
        };
        let get = |key: &str| {
            kv.get(key)
                .cloned()
                .ok_or_else(|| not_shard(format!("no `{key}` metadata")))
        };
        let parse_err = |key: &str, e: &dyn std::fmt::Display| not_shard(format!("`{key}`: {e}"));
        Ok(ShardMetadata {
            version: get(keys::VERSION)?,
            bundle_sha256: get(keys::BUNDLE_SHA256)?,
            reference_sha256: kv.get(keys::REFERENCE_SHA256).cloned().unwrap_or_default(),
            fingerprint: get(keys::FINGERPRINT)?,
            topk: get(keys::TOPK)?
                .parse()
                .map_err(|e| parse_err(keys::TOPK, &e))?,
            template_sha256: get(keys::TEMPLATE_SHA256)?,
            settings: serde_json::from_str(&get(keys::SETTINGS)?)
                .map_err(|e| parse_err(keys::SETTINGS, &e))?,
            shard: serde_json::from_str(&get(keys::SHARD)?)
                .map_err(|e| parse_err(keys::SHARD, &e))?,
        })
    }

    /// The metadata of the shard file `path`.
    pub fn read(path: &Path) -> Result<ShardMetadata, crate::Error> {
        let kv = crate::table::read_metadata(path)?;
        Ok(ShardMetadata::from_key_values(path, &kv)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_key_values() {
        let meta = ShardMetadata {
            version: "0.1.0".into(),
            bundle_sha256: "ab".repeat(32),
            reference_sha256: "ef".repeat(32),
            fingerprint: "cd".repeat(32),
            topk: 16,
            template_sha256: String::new(),
            settings: serde_json::json!({"topk": 16, "format": "plain"}),
            shard: ShardStats {
                file: "part-00003.parquet".into(),
                index: 3,
                rows_in: 10,
                pairs: 9,
                ..ShardStats::default()
            },
        };
        let kv = meta.to_key_values();
        assert_eq!(kv[keys::TOPK], "16");
        assert_eq!(
            ShardMetadata::from_key_values(Path::new("x"), &kv).unwrap(),
            meta
        );
        let mut missing = kv.clone();
        missing.remove(keys::FINGERPRINT);
        let err = ShardMetadata::from_key_values(Path::new("x"), &missing).unwrap_err();
        assert!(err.to_string().contains("edpo.fingerprint"), "{err}");
        // Shards written before the reference identity was recorded still read.
        let mut older = kv.clone();
        older.remove(keys::REFERENCE_SHA256);
        let read = ShardMetadata::from_key_values(Path::new("x"), &older).unwrap();
        assert_eq!(read.reference_sha256, "");
    }
}
