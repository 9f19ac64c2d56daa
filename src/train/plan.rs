//! The order of training: each epoch's steps, shuffled from the seed, and each step's pairs cut
//! into length-sorted micro-batches. Deterministic in (seed, epoch), so a resumed run replays
//! the same order from its data position.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::shards::ShardSet;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::{PairEntry, ShardManifest};

    fn set(shards: u32, per_shard: u32) -> ShardSet {
        let mut pairs = Vec::new();
        for shard in 0..shards {
            for row in 0..per_shard {
                let id = u64::from(shard * 1000 + row);
                pairs.push(PairEntry {
                    shard,
                    row,
                    pair_id: id,
                    prompt_len: 3,
                    chosen_len: 1 + (id % 7) as u32,
                    rejected_len: 2,
                });
            }
        }
        ShardSet {
            dir: "s".into(),
            files: Vec::new(),
            manifest: ShardManifest {
                edpo_version: String::new(),
                bundle_sha256: String::new(),
                reference_sha256: String::new(),
                fingerprint: String::new(),
                topk: 4,
                settings: serde_json::Value::Null,
                complete: true,
                shards: Vec::new(),
            },
            pairs,
        }
    }

    #[test]
    fn an_epoch_uses_every_pair_once_shard_after_shard() {
        let s = set(3, 10);
        let plan = epoch_plan(&s, 42, 0, 8, 3);
        assert_eq!(plan.len(), 4, "30 pairs in steps of 8");
        let order: Vec<usize> = plan
            .iter()
            .flat_map(|p| p.micro_batches.iter().flatten().copied())
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..30).collect::<Vec<_>>());
        // Shards are visited one after another: a step smaller than a shard touches at most
        // two of them.
        for step in &plan {
            let mut shards: Vec<u32> = step
                .micro_batches
                .iter()
                .flatten()
                .map(|&i| s.pairs[i].shard)
                .collect();
            shards.sort();
            shards.dedup();
            assert!(shards.len() <= 2, "{shards:?}");
        }
        for step in &plan {
            assert!(step.micro_batches.iter().all(|mb| mb.len() <= 3));
            let lens: Vec<usize> = step
                .micro_batches
                .iter()
                .flatten()
                .map(|&i| s.pairs[i].max_len())
                .collect();
            assert!(
                lens.windows(2).all(|w| w[0] >= w[1]),
                "longest first: {lens:?}"
            );
        }
    }

    #[test]
    fn the_plan_depends_only_on_seed_and_epoch() {
        let s = set(2, 9);
        assert_eq!(epoch_plan(&s, 1, 3, 4, 2), epoch_plan(&s, 1, 3, 4, 2));
        assert_ne!(epoch_plan(&s, 1, 3, 4, 2), epoch_plan(&s, 1, 4, 4, 2));
        assert_ne!(epoch_plan(&s, 1, 3, 4, 2), epoch_plan(&s, 2, 3, 4, 2));
    }
}
