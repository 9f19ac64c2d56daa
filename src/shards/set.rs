//! A prepared shards folder opened for reading: checked against the model bundle, indexed
//! (where each pair lives and how long it is — the only per-pair data held for a whole run),
//! and a loader that reads pair data shard by shard when a step needs it.

use std::path::{Path, PathBuf};

use arrow::array::{ListArray, UInt64Array};
use parquet::arrow::ProjectionMask;

use super::schema::{CHOSEN, PAIR_ID, PROMPT_IDS, REJECTED};
use super::{list_shards, read_shard, ScoredPair, ShardError, ShardManifest};
use crate::bundle::Bundle;
use crate::table::{self, column, TableError};

/// Where a pair lives and how long its sequences are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairEntry {
    pub shard: u32,
    pub row: u32,
    pub pair_id: u64,
    pub prompt_len: u32,
    pub chosen_len: u32,
    pub rejected_len: u32,
}

impl PairEntry {
    /// Length of the longer of the two sequences (prompt + response).
    pub fn max_len(&self) -> usize {
        (self.prompt_len + self.chosen_len.max(self.rejected_len)) as usize
    }
}

/// The shards of one complete prep run, checked against the model bundle.
pub struct ShardSet {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub manifest: ShardManifest,
    pub pairs: Vec<PairEntry>,
}

fn list_len(list: &ListArray, i: usize) -> u32 {
    let offsets = list.value_offsets();
    (offsets[i + 1] - offsets[i]) as u32
}

/// The index entries of one shard file (only the id and length columns are read).
fn index_shard(shard: u32, path: &Path) -> Result<Vec<PairEntry>, crate::Error> {
    let builder = table::open_parquet(path)?;
    let columns = [PAIR_ID, PROMPT_IDS, CHOSEN.ids, REJECTED.ids];
    let schema = builder.parquet_schema();
    let indices: Vec<usize> = columns
        .iter()
        .map(|c| {
            (0..schema.num_columns())
                .find(|&i| schema.column(i).path().parts()[0] == *c)
                .ok_or_else(|| ShardError::NotAShard {
                    path: path.to_path_buf(),
                    message: format!("no column `{c}`"),
                })
        })
        .collect::<Result<_, _>>()?;
    let mask = ProjectionMask::leaves(schema, indices);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| TableError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut entries = Vec::new();
    for batch in reader {
        let batch = table::next_batch(path, batch)?;
        let ids: UInt64Array = column(path, &batch, PAIR_ID, "uint64")?;
        let prompts: ListArray = column(path, &batch, PROMPT_IDS, "list")?;
        let chosen: ListArray = column(path, &batch, CHOSEN.ids, "list")?;
        let rejected: ListArray = column(path, &batch, REJECTED.ids, "list")?;
        for i in 0..batch.num_rows() {
            entries.push(PairEntry {
                shard,
                row: entries.len() as u32,
                pair_id: ids.value(i),
                prompt_len: list_len(&prompts, i),
                chosen_len: list_len(&chosen, i),
                rejected_len: list_len(&rejected, i),
            });
        }
    }
    Ok(entries)
}

impl ShardSet {
    /// Opens the complete shards folder `dir` scored with `bundle`'s reference: the same
    /// `reference_sha256` (any bundle of the same reference, e.g. a full and a LoRA bundle of
    /// one base model), or for shards written before it was recorded, the same bundle.
    pub fn open(dir: &Path, bundle: &Bundle) -> Result<ShardSet, crate::Error> {
        let manifest =
            ShardManifest::read(dir)?.ok_or_else(|| ShardError::NoManifest(dir.to_path_buf()))?;
        if manifest.reference_sha256.is_empty() {
            if manifest.bundle_sha256 != bundle.bundle_sha256 {
                return Err(ShardError::OtherBundle {
                    dir: dir.to_path_buf(),
                    shards_bundle: manifest.bundle_sha256.clone(),
                    model_bundle: bundle.bundle_sha256.clone(),
                }
                .into());
            }
        } else if manifest.reference_sha256 != bundle.reference_sha256 {
            return Err(ShardError::OtherReference {
                dir: dir.to_path_buf(),
                shards_reference: manifest.reference_sha256.clone(),
                model_reference: bundle.reference_sha256.clone(),
            }
            .into());
        }
        if !manifest.complete {
            return Err(ShardError::Incomplete(dir.to_path_buf()).into());
        }
        let files = list_shards(dir)?;
        if files.is_empty() {
            return Err(ShardError::NoShards(dir.to_path_buf()).into());
        }
        let mut pairs = Vec::new();
        for (s, f) in files.iter().enumerate() {
            pairs.extend(index_shard(s as u32, f)?);
        }
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            files,
            manifest,
            pairs,
        })
    }

    /// Top-K size of the cached reference distributions.
    pub fn topk(&self) -> usize {
        self.manifest.topk
    }
}

/// Reads the shard rows a step needs, keeping at most two shards in memory. An epoch uses each
/// pair once and visits the shards one after another (`train::plan`), so a pair is moved out
/// of the cache when it is used: the shard being consumed shrinks as training proceeds, and
/// while a step straddles two shards the first one is almost empty. A row asked for again (not
/// done by the plan) re-reads its shard.
pub struct PairLoader {
    files: Vec<PathBuf>,
    cache: Vec<(u32, Vec<Option<ScoredPair>>)>,
}

impl PairLoader {
    pub fn new(set: &ShardSet) -> Self {
        PairLoader {
            files: set.files.clone(),
            cache: Vec::new(),
        }
    }

    pub fn get(&mut self, entry: &PairEntry) -> Result<ScoredPair, crate::Error> {
        let row = entry.row as usize;
        let cached = self
            .cache
            .iter()
            .position(|(s, rows)| *s == entry.shard && rows.get(row).is_some_and(Option::is_some));
        let slot = match cached {
            Some(slot) => slot,
            None => {
                let pairs = read_shard(&self.files[entry.shard as usize])?;
                self.cache.retain(|(s, _)| *s != entry.shard);
                if self.cache.len() >= 2 {
                    self.cache.remove(0);
                }
                self.cache
                    .push((entry.shard, pairs.into_iter().map(Some).collect()));
                self.cache.len() - 1
            }
        };
        let missing = || ShardError::NotAShard {
            path: self.files[entry.shard as usize].clone(),
            message: format!("row {row} is missing"),
        };
        let pair = self.cache[slot].1.get_mut(row).and_then(Option::take);
        Ok(pair.ok_or_else(missing)?)
    }
}
