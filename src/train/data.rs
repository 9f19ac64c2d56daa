//! Training data: an index of the shards (pair lengths only), the deterministic order of each
//! epoch (shuffled from the seed), and micro-batch tensors assembled from shard rows.
//!
//! Only the index lives in memory for the whole run; pair data is read shard by shard when a
//! step needs it (at most two shards at a time).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Array3};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::graphs::{ScoreOutputs, TrainBatch};
use crate::shards::{list_shards, read_shard, typed_column, ScoredPair, ShardError, ShardManifest};

#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    #[error("`{0}` holds no shards (part-*.parquet); make them with `edpo prep`")]
    NoShards(PathBuf),
    #[error("`{0}` has no manifest.json; it was not written by `edpo prep`")]
    NoManifest(PathBuf),
    #[error("`{0}` is incomplete (prep was interrupted); rerun the same `edpo prep` command to finish it")]
    Incomplete(PathBuf),
    #[error("shards `{dir}` were made with bundle {shards_bundle}, but `--model` is bundle {model_bundle}; run `edpo prep` with this model or train the model the shards belong to")]
    OtherBundle {
        dir: PathBuf,
        shards_bundle: String,
        model_bundle: String,
    },
    #[error(transparent)]
    Shard(#[from] ShardError),
}

impl TrainDataError {
    pub fn exit_code(&self) -> i32 {
        2
    }
}

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

/// The shards of one prep run, checked against the model bundle.
pub struct ShardSet {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub manifest: ShardManifest,
    pub pairs: Vec<PairEntry>,
}

fn list_len(list: &arrow::array::ListArray, i: usize) -> u32 {
    let offsets = list.value_offsets();
    (offsets[i + 1] - offsets[i]) as u32
}

impl ShardSet {
    pub fn open(dir: &Path, bundle_sha256: &str) -> Result<ShardSet, TrainDataError> {
        let manifest = ShardManifest::read(dir)?
            .ok_or_else(|| TrainDataError::NoManifest(dir.to_path_buf()))?;
        if manifest.bundle_sha256 != bundle_sha256 {
            return Err(TrainDataError::OtherBundle {
                dir: dir.to_path_buf(),
                shards_bundle: manifest.bundle_sha256.clone(),
                model_bundle: bundle_sha256.to_string(),
            });
        }
        if !manifest.complete {
            return Err(TrainDataError::Incomplete(dir.to_path_buf()));
        }
        let files = list_shards(dir)?;
        if files.is_empty() {
            return Err(TrainDataError::NoShards(dir.to_path_buf()));
        }
        let mut pairs = Vec::new();
        for (s, f) in files.iter().enumerate() {
            let read_err = |e: String| ShardError::Read {
                path: f.clone(),
                message: e,
            };
            let file = File::open(f).map_err(|e| read_err(e.to_string()))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| read_err(e.to_string()))?;
            let columns = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"];
            let schema = builder.parquet_schema();
            let indices: Vec<usize> = columns
                .iter()
                .map(|c| {
                    (0..schema.num_columns())
                        .find(|&i| schema.column(i).path().parts()[0] == *c)
                        .ok_or_else(|| ShardError::NotAShard {
                            path: f.clone(),
                            message: format!("no column `{c}`"),
                        })
                })
                .collect::<Result<_, _>>()?;
            let mask = ProjectionMask::leaves(schema, indices);
            let reader = builder
                .with_projection(mask)
                .build()
                .map_err(|e| read_err(e.to_string()))?;
            let mut row = 0u32;
            for batch in reader {
                let batch = batch.map_err(|e| read_err(e.to_string()))?;
                let ids = typed_column::<arrow::array::UInt64Array>(&batch, "pair_id")
                    .ok_or_else(|| read_err("pair_id is not uint64".into()))?;
                let list = |name: &str| {
                    typed_column::<arrow::array::ListArray>(&batch, name)
                        .ok_or_else(|| read_err(format!("{name} is not a list")))
                };
                let (p, c, r) = (
                    list("prompt_ids")?,
                    list("chosen_ids")?,
                    list("rejected_ids")?,
                );
                for i in 0..batch.num_rows() {
                    pairs.push(PairEntry {
                        shard: s as u32,
                        row,
                        pair_id: ids.value(i),
                        prompt_len: list_len(&p, i),
                        chosen_len: list_len(&c, i),
                        rejected_len: list_len(&r, i),
                    });
                    row += 1;
                }
            }
        }
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            files,
            manifest,
            pairs,
        })
    }

    pub fn topk(&self) -> usize {
        self.manifest.topk
    }
}

/// One optimiser step: indices into `ShardSet::pairs`, split into micro-batches of similar
/// length (longest first).
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub micro_batches: Vec<Vec<usize>>,
}

impl StepPlan {
    pub fn num_pairs(&self) -> usize {
        self.micro_batches.iter().map(Vec::len).sum()
    }
}

/// The steps of one epoch: shard order shuffled, pairs shuffled within each shard, consecutive
/// `batch_size` pairs form a step, and each step is cut into length-sorted micro-batches.
pub fn epoch_plan(
    set: &ShardSet,
    seed: u64,
    epoch: u64,
    batch_size: usize,
    micro_batch: usize,
) -> Vec<StepPlan> {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, p) in set.pairs.iter().enumerate() {
        by_shard.entry(p.shard).or_default().push(i);
    }
    let mut shard_order: Vec<u32> = by_shard.keys().copied().collect();
    shard_order.shuffle(&mut rng);
    let mut order = Vec::with_capacity(set.pairs.len());
    for s in shard_order {
        let mut rows = by_shard.remove(&s).unwrap_or_default();
        rows.shuffle(&mut rng);
        order.extend(rows);
    }
    order
        .chunks(batch_size.max(1))
        .map(|step| {
            let mut sorted = step.to_vec();
            sorted.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(set.pairs[i].max_len()),
                    set.pairs[i].pair_id,
                )
            });
            StepPlan {
                micro_batches: sorted
                    .chunks(micro_batch.max(1))
                    .map(<[usize]>::to_vec)
                    .collect(),
            }
        })
        .collect()
}

/// Reads the shard rows a step needs, keeping at most two shards in memory. An epoch uses each
/// pair once and visits the shards one after another (`epoch_plan`), so a pair is moved out of
/// the cache when it is used: the shard being consumed shrinks as training proceeds, and while
/// a step straddles two shards the first one is almost empty. A row asked for again (not done
/// by the plan) re-reads its shard.
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

    pub fn get(&mut self, entry: &PairEntry) -> Result<ScoredPair, TrainDataError> {
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
        self.cache[slot]
            .1
            .get_mut(row)
            .and_then(Option::take)
            .ok_or_else(|| {
                TrainDataError::Shard(ShardError::NotAShard {
                    path: self.files[entry.shard as usize].clone(),
                    message: format!("row {row} is missing"),
                })
            })
    }
}

/// Padded token tensors of a micro-batch (rows 0..B chosen, B..2B rejected).
pub struct Sequences {
    pub input_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub loss_mask: Array2<i64>,
    /// (prompt length, total length) per row.
    pub spans: Vec<(usize, usize)>,
}

pub fn sequences(pairs: &[ScoredPair], pad_id: u32) -> Sequences {
    let b = pairs.len();
    let rows: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.pair.prompt_ids.as_slice(), p.pair.chosen_ids.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.pair.prompt_ids.as_slice(), p.pair.rejected_ids.as_slice())),
        )
        .collect();
    let t = rows
        .iter()
        .map(|(p, r)| p.len() + r.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut input_ids = Array2::<i64>::from_elem((2 * b, t), i64::from(pad_id));
    let mut attention_mask = Array2::<i64>::zeros((2 * b, t));
    let mut loss_mask = Array2::<i64>::zeros((2 * b, t));
    let mut spans = Vec::with_capacity(2 * b);
    for (n, (prompt, response)) in rows.iter().enumerate() {
        for (j, &tok) in prompt.iter().chain(response.iter()).enumerate() {
            input_ids[[n, j]] = i64::from(tok);
            attention_mask[[n, j]] = 1;
            if j >= prompt.len() {
                loss_mask[[n, j]] = 1;
            }
        }
        spans.push((prompt.len(), prompt.len() + response.len()));
    }
    Sequences {
        input_ids,
        attention_mask,
        loss_mask,
        spans,
    }
}

/// A micro-batch for the joint graph with the cached (shard) reference.
pub fn cached_batch(pairs: &[ScoredPair], pad_id: u32, k: usize) -> TrainBatch {
    let seq = sequences(pairs, pad_id);
    let (n, t) = seq.input_ids.dim();
    let b = pairs.len();
    let mut ref_logps = Array1::<f32>::zeros(n);
    let mut ref_token_logps = Array2::<f32>::zeros((n, t));
    let mut ref_topk_ids = Array3::<i64>::zeros((n, t, k));
    let mut ref_topk_logps = Array3::<f32>::zeros((n, t, k));
    for (row, &(start, end)) in seq.spans.iter().enumerate() {
        let (p, rejected) = if row < b {
            (&pairs[row], false)
        } else {
            (&pairs[row - b], true)
        };
        let (total, tok, ids, vals) = if rejected {
            (
                p.ref_rejected_logps,
                &p.ref_rejected_token_logps,
                &p.ref_rejected_topk_ids,
                &p.ref_rejected_topk_logps,
            )
        } else {
            (
                p.ref_chosen_logps,
                &p.ref_chosen_token_logps,
                &p.ref_chosen_topk_ids,
                &p.ref_chosen_topk_logps,
            )
        };
        ref_logps[row] = total;
        let kk = p.k.min(k);
        for (j, t_pos) in (start..end).enumerate() {
            ref_token_logps[[row, t_pos]] = tok[j];
            for c in 0..kk {
                ref_topk_ids[[row, t_pos, c]] = i64::from(ids[j * p.k + c]);
                ref_topk_logps[[row, t_pos, c]] = vals[j * p.k + c];
            }
        }
    }
    TrainBatch {
        input_ids: seq.input_ids,
        attention_mask: seq.attention_mask,
        loss_mask: seq.loss_mask,
        ref_logps,
        ref_token_logps,
        ref_topk_ids,
        ref_topk_logps,
    }
}

/// A micro-batch with the reference scored online (the scoring graph's outputs for `seq`).
pub fn online_batch(seq: Sequences, scores: ScoreOutputs) -> TrainBatch {
    let n = seq.input_ids.nrows();
    let mut ref_logps = Array1::<f32>::zeros(n);
    for (row, &(start, end)) in seq.spans.iter().enumerate() {
        ref_logps[row] = (start..end)
            .map(|t| f64::from(scores.token_logps[[row, t]]))
            .sum::<f64>() as f32;
    }
    TrainBatch {
        input_ids: seq.input_ids,
        attention_mask: seq.attention_mask,
        loss_mask: seq.loss_mask,
        ref_logps,
        ref_token_logps: scores.token_logps,
        ref_topk_ids: scores.topk_ids,
        ref_topk_logps: scores.topk_logps,
    }
}
