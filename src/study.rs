//! `edpo study-k`: how often the cached top-K ε-step (objective.md §7) picks the same k as the
//! exact full-vocabulary computation (§2), for several K, at given policy parameters.
//!
//! Both the policy (given parameters) and the reference (the bundle's) are scored with the
//! scoring graph at K = V, so every token's full distributions are known; the exact and the
//! sparse estimates for every K are then computed in plain Rust (objective.rs) from the same
//! numbers. Only the reference's top-K ids (the cache) and its label log-prob enter the sparse
//! estimate, exactly as in training from shards.
//!
//! Two alternatives to the top-K cache can be compared at the same cache size (K ids and
//! their reference log-probs per token): `sampled` (K ids drawn from the reference, an
//! unbiased estimate of the normaliser) and `head-tail` (the K/2 most likely ids exact, K − K/2
//! ids drawn from the rest of the reference); see objective.rs.

use std::path::PathBuf;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::data::tokenize::TokenizedPair;
use crate::data::Side;
use crate::graphs::{ReferenceGraph, ScoreOutputs};
use crate::objective::{
    decision_margin, head_tail_perturbed_logp, logsumexp, sampled_perturbed_logp,
    sparse_perturbed_logp, step_direction, tolerance,
};
use crate::output::Printable;
use crate::runtime::SessionConfig;
use crate::shards::{read_shard, ShardSet};
use crate::Error;

#[derive(Debug, Clone)]
pub struct StudyConfig {
    pub model: PathBuf,
    pub shards: PathBuf,
    /// Policy parameters; None = the reference (policy = reference).
    pub params: Option<PathBuf>,
    /// Top-K sizes to compare (values ≥ V mean the whole vocabulary).
    pub topks: Vec<usize>,
    pub epsilon: f64,
    pub step_tolerance: f64,
    /// Use at most this many pairs.
    pub limit: usize,
    /// Which cache estimates to compare with the exact step.
    pub estimators: Vec<Estimator>,
    /// Seed of the reference draws of the sampled estimators.
    pub seed: u64,
    pub session: SessionConfig,
}

/// How the K cached ids of a token are chosen (and the normaliser estimated from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// The K most likely reference ids, tail merged (objective.md §7; what training uses).
    Topk,
    /// K ids drawn from the reference distribution; plain (unbiased) normaliser estimate.
    Sampled,
    /// The same draws, self-normalised by the a = 1 estimate.
    SampledSn,
    /// The K/2 most likely ids exact, K − K/2 ids drawn from the rest of the reference
    /// (plain estimate of the rest).
    HeadTail,
    /// The same, with the rest self-normalised.
    HeadTailSn,
}

impl Estimator {
    fn label(self) -> &'static str {
        match self {
            Estimator::Topk => "top-K",
            Estimator::Sampled => "sampled",
            Estimator::SampledSn => "sampled, self-norm.",
            Estimator::HeadTail => "head-tail",
            Estimator::HeadTailSn => "head-tail, self-norm.",
        }
    }
}

/// Agreement of one K with the exact step.
#[derive(Debug, Clone, Serialize)]
pub struct KRow {
    pub estimator: Estimator,
    /// Top-K size of the cache (JSON key `k`, as the published study files have it).
    #[serde(rename = "k")]
    pub topk: usize,
    /// Percentage of pairs whose cached k equals the exact k.
    pub agreement_pct: f64,
    /// confusion[exact][cached] with index 0 = −1, 1 = 0, 2 = +1.
    pub confusion: [[u64; 3]; 3],
    pub mae_g_plus: f64,
    pub mae_g_minus: f64,
    /// The largest exact decision margin (objective::decision_margin) among the pairs this
    /// row decides differently from the exact step (0 when it agrees on every pair): how close
    /// to a tie the pairs it gets wrong are.
    pub max_disagreeing_margin: f64,
    /// Bytes cached per response token: K ids (u32) + K log-probs (f32) + the label log-prob.
    pub cache_bytes_per_token: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StudyReport {
    pub pairs: usize,
    pub vocab: usize,
    pub epsilon: f64,
    pub params: String,
    /// Mean per-token KL(π_θ ‖ π_ref) over response tokens.
    pub mean_token_kl: f64,
    /// Reference peakedness: mean top-1 and top-16 probability mass per response token.
    pub ref_top1_mass: f64,
    pub ref_top16_mass: f64,
    /// Exact steps: counts of k = −1, 0, +1.
    pub exact_steps: [u64; 3],
    pub rows: Vec<KRow>,
}

/// Full log-prob vector (id order) at position t of row r from a K = V scoring output.
fn full_row(out: &ScoreOutputs, r: usize, t: usize, vocab: usize) -> Vec<f64> {
    let mut v = vec![f64::NEG_INFINITY; vocab];
    for j in 0..out.topk_ids.dim().2 {
        v[out.topk_ids[[r, t, j]] as usize] = f64::from(out.topk_logps[[r, t, j]]);
    }
    v
}

/// Draws one id from the distribution whose cumulative probabilities are `cdf`.
fn draw(cdf: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let u = rng.random::<f64>() * cdf[cdf.len() - 1];
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

/// Up to `n` draws from the reference restricted to ids outside `head` (rejection from the
/// full distribution; gives up after 64·n tries, when the rest holds almost no mass).
fn draw_outside(cdf: &[f64], head: &[usize], n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n && tries < 64 * n.max(1) {
        let v = draw(cdf, rng);
        if !head.contains(&v) {
            out.push(v);
        }
        tries += 1;
    }
    out
}

/// What one row caches at one token, gathered once for both perturbations a = 1 ± ε: policy
/// and reference log-probs at the head ids (exact) and at the drawn ids.
struct CachedValues {
    p_head: Vec<f64>,
    q_head: Vec<f64>,
    label_in_head: bool,
    p_drawn: Vec<f64>,
    q_drawn: Vec<f64>,
}

impl CachedValues {
    fn at(head: &[usize], drawn: &[usize], label: usize, p: &[f64], q: &[f64]) -> Self {
        let gather = |ids: &[usize], v: &[f64]| ids.iter().map(|&i| v[i]).collect();
        CachedValues {
            p_head: gather(head, p),
            q_head: gather(head, q),
            label_in_head: head.contains(&label),
            p_drawn: gather(drawn, p),
            q_drawn: gather(drawn, q),
        }
    }

    /// log π̂_a(label) by `estimator` from these values (objective.rs).
    fn estimate(&self, estimator: Estimator, a: f64, p_label: f64, q_label: f64) -> f64 {
        let self_normalised = matches!(estimator, Estimator::SampledSn | Estimator::HeadTailSn);
        match estimator {
            Estimator::Topk => sparse_perturbed_logp(
                a,
                p_label,
                q_label,
                &self.p_head,
                &self.q_head,
                self.label_in_head,
            ),
            Estimator::Sampled | Estimator::SampledSn => sampled_perturbed_logp(
                a,
                p_label,
                q_label,
                &self.p_drawn,
                &self.q_drawn,
                self_normalised,
            ),
            Estimator::HeadTail | Estimator::HeadTailSn => head_tail_perturbed_logp(
                a,
                p_label,
                q_label,
                &self.p_head,
                &self.q_head,
                self.label_in_head,
                &self.p_drawn,
                &self.q_drawn,
                self_normalised,
            ),
        }
    }
}

/// Per-sequence sums: exact (a = 1+ε, 1−ε) and sparse for every row, plus the policy sum.
struct SeqSums {
    policy: f64,
    exact: [f64; 2],
    sparse: Vec<[f64; 2]>,
}

/// Sums over every studied response token: KL and reference peakedness.
#[derive(Default)]
struct TokenTotals {
    kl: f64,
    top1: f64,
    top16: f64,
    tokens: u64,
}

/// A study in progress: both scoring graphs, the rows (estimator × top-K) and the totals.
struct Study<'a> {
    cfg: &'a StudyConfig,
    vocab: usize,
    alphas: [f64; 2],
    policy: ReferenceGraph,
    reference: ReferenceGraph,
    rows: Vec<KRow>,
    /// The largest top-K below the vocabulary (how many reference draws a token needs).
    max_topk: usize,
    needs_cdf: bool,
    totals: TokenTotals,
    exact_steps: [u64; 3],
}

/// One row per estimator and top-K size; sampled estimators are not exact at K = V, so they
/// get rows only for K < V.
fn study_rows(cfg: &StudyConfig, topks: &[usize], vocab: usize) -> Vec<KRow> {
    let mut rows = Vec::new();
    for &estimator in &cfg.estimators {
        for &topk in topks {
            if estimator != Estimator::Topk && topk >= vocab {
                continue;
            }
            rows.push(KRow {
                estimator,
                topk,
                agreement_pct: 0.0,
                confusion: [[0; 3]; 3],
                mae_g_plus: 0.0,
                mae_g_minus: 0.0,
                max_disagreeing_margin: 0.0,
                cache_bytes_per_token: topk * 8 + 4,
            });
        }
    }
    rows
}

/// Cumulative reference probabilities of a token (for drawing ids from the reference).
fn cumulative(q: &[f64]) -> Vec<f64> {
    q.iter()
        .scan(0.0, |acc, qv| {
            *acc += qv.exp();
            Some(*acc)
        })
        .collect()
}

impl Study<'_> {
    /// What each row caches at one token (head ids exact, drawn ids), and their values.
    fn cached_values(
        &self,
        q_out: &ScoreOutputs,
        t: usize,
        y: usize,
        (p, q): (&[f64], &[f64]),
        rng: &mut ChaCha8Rng,
    ) -> Vec<CachedValues> {
        let cdf = if self.needs_cdf {
            cumulative(q)
        } else {
            Vec::new()
        };
        let drawn: Vec<usize> = if self.needs_cdf {
            (0..self.max_topk).map(|_| draw(&cdf, rng)).collect()
        } else {
            Vec::new()
        };
        let top = |n: usize| -> Vec<usize> {
            (0..n).map(|j| q_out.topk_ids[[0, t, j]] as usize).collect()
        };
        self.rows
            .iter()
            .map(|row| {
                let (head, tail) = match row.estimator {
                    Estimator::Topk => (top(row.topk), Vec::new()),
                    Estimator::Sampled | Estimator::SampledSn => {
                        (Vec::new(), drawn[..row.topk].to_vec())
                    }
                    Estimator::HeadTail | Estimator::HeadTailSn => {
                        // S = head ∪ {label} is exact; draws come from outside S.
                        let head = top(row.topk / 2);
                        let mut exact_set = head.clone();
                        exact_set.push(y);
                        let n = row.topk - row.topk / 2;
                        (head, draw_outside(&cdf, &exact_set, n, rng))
                    }
                };
                CachedValues::at(&head, &tail, y, p, q)
            })
            .collect()
    }

    /// Adds one response token's KL, peakedness, exact and sparse perturbed log-probs.
    fn token(
        &mut self,
        (p_out, q_out): (&ScoreOutputs, &ScoreOutputs),
        t: usize,
        y: usize,
        sums: &mut SeqSums,
        rng: &mut ChaCha8Rng,
    ) {
        let p = full_row(p_out, 0, t, self.vocab);
        let q = full_row(q_out, 0, t, self.vocab);
        sums.policy += p[y];
        // KL(π_θ ‖ π_ref) and reference peakedness at this token.
        self.totals.kl += p
            .iter()
            .zip(&q)
            .filter(|(pv, _)| pv.is_finite())
            .map(|(pv, qv)| pv.exp() * (pv - qv))
            .sum::<f64>();
        self.totals.top1 += f64::from(q_out.topk_logps[[0, t, 0]]).exp();
        self.totals.top16 += (0..16.min(self.vocab))
            .map(|j| f64::from(q_out.topk_logps[[0, t, j]]).exp())
            .sum::<f64>();
        self.totals.tokens += 1;
        let cached = self.cached_values(q_out, t, y, (&p, &q), rng);
        for (ai, &a) in self.alphas.iter().enumerate() {
            let mixed: Vec<f64> = p
                .iter()
                .zip(&q)
                .map(|(pv, qv)| a * pv + (1.0 - a) * qv)
                .collect();
            sums.exact[ai] += mixed[y] - logsumexp(&mixed);
            for (ri, (row, values)) in self.rows.iter().zip(&cached).enumerate() {
                sums.sparse[ri][ai] += values.estimate(row.estimator, a, p[y], q[y]);
            }
        }
    }

    /// Scores prompt + `response` with both graphs at K = V and sums its response tokens.
    fn sequence(
        &mut self,
        prompt: &[u32],
        response: &[u32],
        rng: &mut ChaCha8Rng,
    ) -> Result<SeqSums, Error> {
        let ids: Vec<i64> = prompt
            .iter()
            .chain(response)
            .map(|&x| i64::from(x))
            .collect();
        let len = ids.len();
        let input = ndarray::Array2::from_shape_vec((1, len), ids.clone()).expect("shape");
        let mask = ndarray::Array2::<i64>::ones((1, len));
        let labels =
            ndarray::Array2::from_shape_fn((1, len), |(_, t)| i64::from(t >= prompt.len()));
        let all = self.vocab as i64;
        let p_out = (self.policy).score(input.view(), mask.view(), Some(labels.view()), all)?;
        let q_out = (self.reference).score(input.view(), mask.view(), Some(labels.view()), all)?;
        let mut sums = SeqSums {
            policy: 0.0,
            exact: [0.0; 2],
            sparse: vec![[0.0; 2]; self.rows.len()],
        };
        for (t, &label) in ids.iter().enumerate().skip(prompt.len()) {
            self.token((&p_out, &q_out), t, label as usize, &mut sums, rng);
        }
        Ok(sums)
    }

    /// Studies one pair: the exact step, and each row's cached step against it.
    fn pair(&mut self, pair: &TokenizedPair, index: usize) -> Result<(), Error> {
        let mut sums: Vec<SeqSums> = Vec::with_capacity(2);
        for (side_index, side) in Side::BOTH.into_iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.cfg.seed
                    ^ ((index as u64) << 1 | side_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            sums.push(self.sequence(&pair.prompt_ids, pair.response(side), &mut rng)?);
        }
        let (c, r) = (&sums[0], &sums[1]);
        let g = c.policy - r.policy;
        let delta = tolerance(self.cfg.step_tolerance, c.policy, r.policy);
        let gp = c.exact[0] - r.exact[0];
        let gm = c.exact[1] - r.exact[1];
        let step_exact = step_direction(g, gp, gm, delta);
        self.exact_steps[(step_exact + 1) as usize] += 1;
        for (ri, row) in self.rows.iter_mut().enumerate() {
            let sp = c.sparse[ri][0] - r.sparse[ri][0];
            let sm = c.sparse[ri][1] - r.sparse[ri][1];
            let step_cached = step_direction(g, sp, sm, delta);
            if step_cached != step_exact {
                row.max_disagreeing_margin =
                    row.max_disagreeing_margin.max(decision_margin(g, gp, gm));
            }
            row.confusion[(step_exact + 1) as usize][(step_cached + 1) as usize] += 1;
            row.mae_g_plus += (sp - gp).abs();
            row.mae_g_minus += (sm - gm).abs();
        }
        Ok(())
    }

    fn report(mut self, pairs: usize) -> StudyReport {
        let n = pairs.max(1) as f64;
        for row in &mut self.rows {
            let agree: u64 = (0..3).map(|i| row.confusion[i][i]).sum();
            row.agreement_pct = 100.0 * agree as f64 / n;
            row.mae_g_plus /= n;
            row.mae_g_minus /= n;
        }
        let tok = self.totals.tokens.max(1) as f64;
        StudyReport {
            pairs,
            vocab: self.vocab,
            epsilon: self.cfg.epsilon,
            params: self
                .cfg
                .params
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "reference".into()),
            mean_token_kl: self.totals.kl / tok,
            ref_top1_mass: self.totals.top1 / tok,
            ref_top16_mass: self.totals.top16 / tok,
            exact_steps: self.exact_steps,
            rows: self.rows,
        }
    }
}

pub fn run(cfg: &StudyConfig) -> Result<StudyReport, Error> {
    let bundle = Bundle::open(&cfg.model)?;
    let vocab = bundle.manifest.vocab_size;
    let set = ShardSet::open(&cfg.shards, &bundle)?;
    let params = match &cfg.params {
        Some(p) => Some(bundle.policy_weights_from(p)?),
        None => None,
    };
    let topks: Vec<usize> = cfg.topks.iter().map(|&k| k.min(vocab)).collect();
    let mut study = Study {
        cfg,
        vocab,
        alphas: [1.0 + cfg.epsilon, 1.0 - cfg.epsilon],
        policy: ReferenceGraph::new(&bundle, params.as_ref(), &cfg.session)?,
        reference: ReferenceGraph::new(&bundle, None, &cfg.session)?,
        rows: study_rows(cfg, &topks, vocab),
        max_topk: topks
            .iter()
            .copied()
            .filter(|&k| k < vocab)
            .max()
            .unwrap_or(1),
        needs_cdf: cfg.estimators.iter().any(|&e| e != Estimator::Topk),
        totals: TokenTotals::default(),
        exact_steps: [0; 3],
    };
    let mut pairs_done = 0usize;
    'files: for file in &set.files {
        for pair in read_shard(file)? {
            if pairs_done >= cfg.limit {
                break 'files;
            }
            study.pair(&pair.pair, pairs_done)?;
            pairs_done += 1;
        }
    }
    Ok(study.report(pairs_done))
}

impl Printable for StudyReport {
    fn to_table(&self) -> String {
        let mut s = format!(
            "study-k: {} pairs, V = {}, ε = {}, params {}\n  mean per-token KL(π‖π_ref) {:.4}; reference top-1 mass {:.3}, top-16 mass {:.3}\n  exact steps: k=−1 {}, k=0 {}, k=+1 {}\n\n",
            self.pairs, self.vocab, self.epsilon, self.params, self.mean_token_kl, self.ref_top1_mass, self.ref_top16_mass,
            self.exact_steps[0], self.exact_steps[1], self.exact_steps[2]
        );
        s.push_str("| estimator | K | agreement % | confusion (rows exact −1/0/+1, cols cached) | MAE g₊ | MAE g₋ | largest margin missed | cache bytes/token |\n|---|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let c = r.confusion;
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:?} {:?} {:?} | {:.2e} | {:.2e} | {:.1e} | {} |\n",
                r.estimator.label(),
                if r.topk >= self.vocab {
                    format!("V={}", r.topk)
                } else {
                    r.topk.to_string()
                },
                r.agreement_pct,
                c[0],
                c[1],
                c[2],
                r.mae_g_plus,
                r.mae_g_minus,
                r.max_disagreeing_margin,
                r.cache_bytes_per_token
            ));
        }
        s
    }
}
