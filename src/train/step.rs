//! One optimiser step's computation: read the step's pairs, build each micro-batch (cached or
//! online reference), run the joint graph, accumulate the gradients, and record every pair's
//! ε-DPO decision.

use std::time::Instant;

use crate::batch::{self, row_of};
use crate::bundle::Bundle;
use crate::data::Side;
use crate::dist::Ranks;
use crate::graphs::{LossSettings, ReferenceGraph, TrainBatch, TrainGraph, TrainOutputs};
use crate::objective;
use crate::params::ParamStore;
use crate::shards::{PairLoader, ScoredPair, ShardSet};
use crate::stages::StageTimes;
use crate::Error;

use super::metrics::{self, PairRecord};
use super::optim;
use super::plan::StepPlan;
use super::{ReferenceMode, TrainConfig};

/// Everything one optimiser step computed.
pub struct StepResult {
    /// Mean loss over the step's pairs.
    pub loss: f64,
    /// d loss / d θ, one buffer per parameter.
    pub grads: Vec<Vec<f32>>,
    /// One record per pair, in micro-batch order (rank 0; empty on the other ranks).
    pub records: Vec<PairRecord>,
    /// Mean per-pair step k̄ over the step's pairs (drives the global β update).
    pub mean_step: f64,
    /// Pairs in the step (all ranks).
    pub pairs: usize,
    /// Global L2 norm of `grads` before clipping.
    pub grad_norm: f64,
    /// False when the loss or the gradient norm is NaN or infinite.
    pub finite: bool,
}

/// The graphs and the pair loader that compute steps.
pub struct StepRunner {
    train: TrainGraph,
    /// The scoring graph, when the reference is scored online.
    reference: Option<ReferenceGraph>,
    loader: PairLoader,
    pad_id: u32,
    /// Top-K size of the shards' cached reference.
    topk_cached: usize,
    /// Top-K size of the online reference.
    topk_online: i64,
    epsilon: f64,
    label_smoothing: f64,
    step_tolerance: f64,
    /// Where the steps' time went (the trainer adds its own stages).
    pub times: StageTimes,
    /// The gradient buffers of the next step: the last step's, handed back by `recycle`
    /// (zeroed when taken), or the zeros allocated at start-up.
    spare_grads: Option<Vec<Vec<f32>>>,
    /// Whether `spare_grads` are the start-up zeros (nothing to clear).
    spare_grads_zero: bool,
}

impl StepRunner {
    /// The graphs, the loader and the gradient buffers (parameter-sized, `params`' layout,
    /// faulted in now rather than in the first step).
    pub fn new(
        bundle: &Bundle,
        set: &ShardSet,
        cfg: &TrainConfig,
        params: &ParamStore,
    ) -> Result<Self, Error> {
        let reference = match cfg.reference {
            ReferenceMode::Cached => None,
            ReferenceMode::Online => Some(ReferenceGraph::new(bundle, None, &cfg.session)?),
        };
        Ok(StepRunner {
            train: TrainGraph::new(bundle, &cfg.session)?,
            reference,
            loader: PairLoader::new(set),
            pad_id: bundle.manifest.special_tokens.pad_id(),
            topk_cached: set.topk(),
            topk_online: cfg.online_topk.unwrap_or(bundle.manifest.vocab_size) as i64,
            epsilon: cfg.epsilon,
            label_smoothing: cfg.label_smoothing,
            step_tolerance: cfg.step_tolerance,
            times: StageTimes::default(),
            spare_grads: Some(params.zeros_like()),
            spare_grads_zero: true,
        })
    }

    /// The joint graph's session.
    pub fn train_graph(&self) -> &TrainGraph {
        &self.train
    }

    /// Takes back a step's gradient buffers (after the optimiser used them) for the next step.
    pub fn recycle(&mut self, grads: Vec<Vec<f32>>) {
        self.spare_grads = Some(grads);
        self.spare_grads_zero = false;
    }

    /// Loads the pairs of one micro-batch (`load_pairs`) and builds its joint-graph batch
    /// (`batch`; the online reference's graph time as `reference_run`).
    fn load_micro_batch(
        &mut self,
        set: &ShardSet,
        indices: &[usize],
    ) -> Result<(Vec<ScoredPair>, TrainBatch), Error> {
        let loader = &mut self.loader;
        let pairs: Vec<ScoredPair> = self.times.time("load_pairs", || {
            indices
                .iter()
                .map(|&i| loader.get(&set.pairs[i]))
                .collect::<Result<_, _>>()
        })?;
        let started = Instant::now();
        let reference_before = self.reference.as_ref().map_or(0.0, |r| r.run_seconds());
        let batch = self.micro_batch(&pairs)?;
        self.times.add("batch", started.elapsed().as_secs_f64());
        let reference_run =
            self.reference.as_ref().map_or(0.0, |r| r.run_seconds()) - reference_before;
        self.times.split("batch", "reference_run", reference_run);
        Ok((pairs, batch))
    }

    /// The joint graph's micro-batch for `pairs`, with the cached or the online reference.
    fn micro_batch(&mut self, pairs: &[ScoredPair]) -> Result<TrainBatch, Error> {
        match self.reference.as_mut() {
            None => Ok(batch::cached_batch(pairs, self.pad_id, self.topk_cached)),
            Some(reference) => {
                let rows = batch::online_rows(pairs, self.pad_id);
                let scores = reference.score(
                    rows.input_ids.view(),
                    rows.attention_mask.view(),
                    Some(rows.loss_mask.view()),
                    self.topk_online,
                )?;
                Ok(batch::online_batch(rows, scores))
            }
        }
    }

    /// Runs one optimiser step at global β `beta`: this rank's share of the micro-batches
    /// (micro-batch j goes to rank j mod N), then the sums over the ranks. Every rank gets the
    /// step's gradient, loss and mean per-pair step; rank 0 also gets every pair's record, in
    /// micro-batch order.
    pub fn run(
        &mut self,
        ranks: &dyn Ranks,
        set: &ShardSet,
        plan: &StepPlan,
        params: &ParamStore,
        beta: f64,
        step: u64,
    ) -> Result<StepResult, Error> {
        let total = plan.num_pairs() as f64;
        let settings = LossSettings {
            beta: beta as f32,
            epsilon: self.epsilon as f32,
            label_smoothing: self.label_smoothing as f32,
            step_tolerance: self.step_tolerance as f32,
        };
        let mut grads = match self.spare_grads.take() {
            Some(grads) if self.spare_grads_zero => grads,
            Some(mut grads) => {
                self.times
                    .time("grad_accumulate", || optim::zero(&mut grads));
                grads
            }
            None => params.zeros_like(),
        };
        self.spare_grads_zero = false;
        // Loss, non-finite micro-batches, Σ k over pairs: summed over the ranks below.
        let mut totals = [0.0f64; 3];
        let mut encoded = Vec::new();
        let mine = plan
            .micro_batches
            .iter()
            .enumerate()
            .filter(|(j, _)| j % ranks.size() == ranks.rank());
        for (j, micro_batch) in mine {
            let (pairs, batch) = self.load_micro_batch(set, micro_batch)?;
            let weight = micro_batch.len() as f64 / total;
            let graph_before = self.train.run_seconds();
            let train = &mut self.train;
            let out = self.times.time("grad_accumulate", || {
                train.run(params, &batch, &settings, &mut grads, weight as f32)
            })?;
            let graph_run = self.train.run_seconds() - graph_before;
            self.times.split("grad_accumulate", "graph_run", graph_run);
            totals[0] += weight * f64::from(out.loss);
            totals[1] += f64::from(u8::from(!out.loss.is_finite()));
            let records = pair_records(&pairs, &batch, &out, beta, self.epsilon, step);
            totals[2] += records.iter().map(|r| f64::from(r.pair_step)).sum::<f64>();
            encoded.extend((j as u64).to_le_bytes());
            encoded.extend((records.len() as u64).to_le_bytes());
            for r in &records {
                r.to_bytes(&mut encoded);
            }
        }
        self.times.time("sum", || {
            for g in &mut grads {
                ranks.sum_f32(g);
            }
            ranks.sum_f64(&mut totals);
        });
        let grad_norm = optim::global_norm(&grads);
        let finite = totals[1] == 0.0 && grad_norm.is_finite();
        let records = self
            .times
            .time("sum", || decode_in_order(&ranks.gather_to_root(&encoded)));
        Ok(StepResult {
            loss: totals[0],
            grads,
            grad_norm,
            records,
            mean_step: totals[2] / total,
            pairs: plan.num_pairs(),
            finite,
        })
    }
}

/// Every rank's records (micro-batch index, count, records …), in micro-batch order.
fn decode_in_order(parts: &[Vec<u8>]) -> Vec<PairRecord> {
    let mut by_micro_batch: Vec<(u64, Vec<PairRecord>)> = Vec::new();
    for part in parts {
        let mut rest = part.as_slice();
        while rest.len() >= 16 {
            let index = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes")) as usize;
            let bytes = count * metrics::RECORD_BYTES;
            by_micro_batch.push((index, PairRecord::from_bytes(&rest[16..16 + bytes])));
            rest = &rest[16 + bytes..];
        }
    }
    by_micro_batch.sort_by_key(|(index, _)| *index);
    by_micro_batch.into_iter().flat_map(|(_, r)| r).collect()
}

/// Every pair's decision in one micro-batch's outputs.
fn pair_records(
    pairs: &[ScoredPair],
    batch: &TrainBatch,
    out: &TrainOutputs,
    beta: f64,
    epsilon: f64,
    step: u64,
) -> Vec<PairRecord> {
    let n = pairs.len();
    pairs
        .iter()
        .enumerate()
        .map(|(j, pair)| {
            let (c, r) = (row_of(j, Side::Chosen, n), row_of(j, Side::Rejected, n));
            let pair_step = out.pair_steps[j].clamp(-1, 1) as i8;
            let beta_i = objective::pair_beta(beta, epsilon, pair_step);
            let (lc, lr) = (f64::from(out.logps[c]), f64::from(out.logps[r]));
            let (rc, rr) = (f64::from(batch.ref_logps[c]), f64::from(batch.ref_logps[r]));
            let g = lc - lr;
            PairRecord {
                pair_id: pair.pair.pair_id,
                step,
                pair_step,
                beta_i,
                z: g - (rc - rr),
                g,
                g_plus: f64::from(out.logps_plus[c]) - f64::from(out.logps_plus[r]),
                g_minus: f64::from(out.logps_minus[c]) - f64::from(out.logps_minus[r]),
                reward_chosen: beta_i * (lc - rc),
                reward_rejected: beta_i * (lr - rr),
                logps_chosen: lc,
                logps_rejected: lr,
                ref_chosen: rc,
                ref_rejected: rr,
            }
        })
        .collect()
}
