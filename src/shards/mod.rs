//! Parquet shards of scored pairs: the contract between `edpo prep` and everything that reads
//! its output (train, eval, study-k, inspect, notebooks).
//!
//! - [`schema`]: the columns of `architecture.md` and a pair ↔ Arrow row conversion;
//! - [`metadata`]: the typed `edpo.*` key-value metadata every shard carries;
//! - [`manifest`]: `manifest.json`, per-shard statistics and the shard files of a folder;
//! - [`set`]: a prepared folder opened for reading: its pair index and the pair loader.

pub mod manifest;
pub mod metadata;
pub mod schema;
pub mod set;

use std::path::{Path, PathBuf};

pub use manifest::{list_shards, shard_file_name, ShardManifest, ShardStats, SHARD_MANIFEST};
pub use metadata::ShardMetadata;
pub use set::{PairEntry, PairLoader, ShardSet};

use crate::data::tokenize::TokenizedPair;
use crate::data::Side;
use crate::table::{self, ParquetLayout};

/// Pairs per Parquet row group: small enough to stream, large enough to compress well.
pub const ROW_GROUP_PAIRS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("`{path}` is not an edpo shard: {message}")]
    NotAShard { path: PathBuf, message: String },
    #[error("`{0}` holds no shards (part-*.parquet); make them with `edpo prep`")]
    NoShards(PathBuf),
    #[error("`{0}` has no manifest.json; it was not written by `edpo prep`")]
    NoManifest(PathBuf),
    #[error("`{0}` is incomplete (prep was interrupted); rerun the same `edpo prep` command to finish it")]
    Incomplete(PathBuf),
    #[error("shards `{dir}` were made with bundle {shards_bundle}, but `--model` is bundle {model_bundle} (the shards predate reference identities, so only their own bundle reads them); run `edpo prep` with this model or train the model the shards belong to")]
    OtherBundle {
        dir: PathBuf,
        shards_bundle: String,
        model_bundle: String,
    },
    #[error("shards `{dir}` were scored with another reference ({shards_reference}) than `--model`'s ({model_reference}): a reference is the reference graph, the base weights, the tokenizer and chat template, and a `--lora-init` adapter; run `edpo prep` with this model, or train a bundle of the model the shards were scored with")]
    OtherReference {
        dir: PathBuf,
        shards_reference: String,
        model_reference: String,
    },
}

/// The reference's scores of one response (one side of a pair).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResponseScores {
    /// Sum of the response tokens' log-probs.
    pub logps: f32,
    /// Log-prob of each response token.
    pub token_logps: Vec<f32>,
    /// The top-K ids of each response token's distribution, flattened token-major
    /// ([tokens × topk]).
    pub topk_ids: Vec<u32>,
    /// Their log-probs, descending per token ([tokens × topk]).
    pub topk_logps: Vec<f32>,
}

/// One pair with its reference scores: a row of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair {
    pub pair: TokenizedPair,
    /// Top-K size of the cached distributions.
    pub topk: usize,
    pub chosen: ResponseScores,
    pub rejected: ResponseScores,
}

impl ScoredPair {
    pub fn scores(&self, side: Side) -> &ResponseScores {
        match side {
            Side::Chosen => &self.chosen,
            Side::Rejected => &self.rejected,
        }
    }

    pub fn scores_mut(&mut self, side: Side) -> &mut ResponseScores {
        match side {
            Side::Chosen => &mut self.chosen,
            Side::Rejected => &mut self.rejected,
        }
    }
}

/// Writes `pairs` to the shard file `path` atomically, with `metadata` in its footer.
pub fn write_shard(
    path: &Path,
    pairs: &[ScoredPair],
    metadata: &ShardMetadata,
) -> Result<(), crate::Error> {
    let layout = ParquetLayout {
        row_group_rows: Some(ROW_GROUP_PAIRS),
        metadata: metadata.to_key_values(),
    };
    let batches = pairs.chunks(ROW_GROUP_PAIRS).map(schema::to_record_batch);
    Ok(table::write_parquet(
        path,
        schema::schema(),
        batches,
        &layout,
    )?)
}

/// Reads every pair of one shard file (row group by row group).
pub fn read_shard(path: &Path) -> Result<Vec<ScoredPair>, crate::Error> {
    let mut out = Vec::new();
    for batch in table::read_parquet(path)? {
        let batch = table::next_batch(path, batch)?;
        out.extend(schema::from_record_batch(path, &batch)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(id: u64, topk: usize, prompt: usize, chosen: usize, rejected: usize) -> ScoredPair {
        let response = |len: usize, base: f32| ResponseScores {
            logps: -(len as f32) * base,
            token_logps: (0..len).map(|t| -base - t as f32).collect(),
            topk_ids: (0..len * topk)
                .map(|i| (i as u32 * 7 + id as u32) % 50)
                .collect(),
            topk_logps: (0..len * topk).map(|i| -(i as f32) / 10.0).collect(),
        };
        ScoredPair {
            pair: TokenizedPair {
                pair_id: id * 1_000_003,
                source_row: id,
                prompt_ids: (0..prompt as u32).collect(),
                chosen_ids: (0..chosen as u32).map(|t| t + 100).collect(),
                rejected_ids: (0..rejected as u32).map(|t| t + 200).collect(),
                prompt_truncated: id.is_multiple_of(2),
                response_truncated: id.is_multiple_of(3),
            },
            topk,
            chosen: response(chosen, 0.5),
            rejected: response(rejected, 1.5),
        }
    }

    #[test]
    fn a_shard_reads_back_exactly_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(shard_file_name(0));
        // More pairs than one row group, lengths 1..; top-K 3.
        let pairs: Vec<ScoredPair> = (0..(ROW_GROUP_PAIRS as u64 + 5))
            .map(|i| scored(i, 3, 1 + (i % 4) as usize, 1 + (i % 5) as usize, 2))
            .collect();
        let metadata = ShardMetadata {
            version: "test".into(),
            bundle_sha256: "b".into(),
            reference_sha256: "r".into(),
            fingerprint: "f".into(),
            topk: 3,
            template_sha256: String::new(),
            settings: serde_json::json!({"topk": 3}),
            shard: ShardStats {
                file: shard_file_name(0),
                pairs: pairs.len() as u64,
                ..ShardStats::default()
            },
        };
        write_shard(&path, &pairs, &metadata).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "renamed into place, no temporary file left"
        );
        assert_eq!(read_shard(&path).unwrap(), pairs);
        assert_eq!(ShardMetadata::read(&path).unwrap(), metadata);
        let schema = crate::table::open_parquet(&path).unwrap();
        assert_eq!(
            schema.metadata().num_row_groups(),
            2,
            "{ROW_GROUP_PAIRS} pairs per group"
        );
    }
}
