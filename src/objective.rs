//! The ε-DPO maths of `objective.md` in plain Rust: the test oracle for the training graph's
//! outputs, and per-pair analyses recomputed from Parquet columns.
//!
//! Notation follows objective.md: s = sequence log-prob of a response, g = s_θ(y_w) − s_θ(y_l),
//! g₊/g₋ the same under the perturbed policies a = 1 ± ε, z the DPO logit per unit β.

/// log-sum-exp of a slice (−∞ for an empty slice).
pub fn logsumexp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// log_softmax of a logit vector.
pub fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let lse = logsumexp(logits);
    logits.iter().map(|l| l - lse).collect()
}

/// §2 exactly: log π̂_a(label) = log_softmax(a·l_θ + (1−a)·l_ref)[label].
pub fn exact_perturbed_logp(
    a: f64,
    policy_logits: &[f64],
    ref_logits: &[f64],
    label: usize,
) -> f64 {
    let mixed: Vec<f64> = policy_logits
        .iter()
        .zip(ref_logits)
        .map(|(p, q)| a * p + (1.0 - a) * q)
        .collect();
    log_softmax(&mixed)[label]
}

/// Floor on the tail masses of §7 (same value as the training graph).
pub const TAIL_FLOOR: f64 = 1e-10;

/// The exactly known set S = cached ids ∪ {label}: policy log-probs, reference log-probs and
/// the mixed terms a·p + (1−a)·q, the label appended unless it is one of the cached ids.
fn exact_set(
    a: f64,
    p_label: f64,
    q_label: f64,
    p_ids: &[f64],
    q_ids: &[f64],
    label_in_ids: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut p_set: Vec<f64> = p_ids.to_vec();
    let mut q_set: Vec<f64> = q_ids.to_vec();
    if !label_in_ids {
        p_set.push(p_label);
        q_set.push(q_label);
    }
    let mixed = p_set
        .iter()
        .zip(&q_set)
        .map(|(p, q)| a * p + (1.0 - a) * q)
        .collect();
    (p_set, q_set, mixed)
}

/// §7: the tail-merged estimate of log π̂_a(y) from the policy log-probs `p_*` and the cached
/// reference log-probs `q_*` at the label and the K cached ids. `label_in_topk` marks a label
/// that is one of the K ids (then it is not counted twice).
pub fn sparse_perturbed_logp(
    a: f64,
    p_label: f64,
    q_label: f64,
    p_topk: &[f64],
    q_topk: &[f64],
    label_in_topk: bool,
) -> f64 {
    let (p_set, q_set, mut mixed) = exact_set(a, p_label, q_label, p_topk, q_topk, label_in_topk);
    let tail_policy = (1.0 - logsumexp(&p_set).exp()).max(TAIL_FLOOR);
    let tail_ref = (1.0 - logsumexp(&q_set).exp()).max(TAIL_FLOOR);
    mixed.push(a * tail_policy.ln() + (1.0 - a) * tail_ref.ln());
    a * p_label + (1.0 - a) * q_label - logsumexp(&mixed)
}

/// log of the sampled estimate of E_{v∼q}[exp(a·(p(v) − q(v)))] from draws v_j of a reference
/// distribution q (the whole reference, or its restriction to a tail). Plain: the sample mean
/// (unbiased for the expectation). Self-normalised: the same sum divided by the a = 1 sum
/// Σ_j exp(p(v_j) − q(v_j)), i.e. the expectation relative to its value at a = 1, which the
/// caller knows exactly (the policy's own mass); sharing the draws cancels most of the noise.
fn log_sampled_mix(a: f64, p_samples: &[f64], q_samples: &[f64], self_normalised: bool) -> f64 {
    let diff: Vec<f64> = p_samples
        .iter()
        .zip(q_samples)
        .map(|(p, q)| p - q)
        .collect();
    let scaled: Vec<f64> = diff.iter().map(|d| a * d).collect();
    if self_normalised {
        logsumexp(&scaled) - logsumexp(&diff)
    } else {
        logsumexp(&scaled) - (diff.len() as f64).ln()
    }
}

/// The sampled alternative to §7 (studied by `edpo study-k`, not used in training): the
/// normaliser Σ_v exp(a·p(v) + (1−a)·q(v)) = E_{v∼π_ref}[exp(a·(p(v) − q(v)))] estimated from
/// ids drawn from the reference and the policy and reference log-probs at those ids (see
/// `log_sampled_mix`; self-normalised, the a = 1 value is the policy's total mass, 1).
pub fn sampled_perturbed_logp(
    a: f64,
    p_label: f64,
    q_label: f64,
    p_samples: &[f64],
    q_samples: &[f64],
    self_normalised: bool,
) -> f64 {
    a * p_label + (1.0 - a) * q_label - log_sampled_mix(a, p_samples, q_samples, self_normalised)
}

/// Head exact, tail sampled (studied by `edpo study-k`, not used in training): S = top ids ∪
/// {label} is summed exactly as in §7; the rest of the normaliser, Σ_{v∉S} q(v)·exp(a·(p(v) −
/// q(v))), is estimated from ids drawn from the reference restricted to v ∉ S: R_ref times the
/// sample mean (plain, unbiased), or R_θ times the self-normalised ratio (`log_sampled_mix`).
/// No draws: the tail is taken as empty.
#[allow(clippy::too_many_arguments)]
pub fn head_tail_perturbed_logp(
    a: f64,
    p_label: f64,
    q_label: f64,
    p_top: &[f64],
    q_top: &[f64],
    label_in_top: bool,
    p_tail_samples: &[f64],
    q_tail_samples: &[f64],
    self_normalised: bool,
) -> f64 {
    let (p_set, q_set, mut mixed) = exact_set(a, p_label, q_label, p_top, q_top, label_in_top);
    if !p_tail_samples.is_empty() {
        let set = if self_normalised { &p_set } else { &q_set };
        let tail_mass = (1.0 - logsumexp(set).exp()).max(TAIL_FLOOR);
        mixed.push(
            tail_mass.ln() + log_sampled_mix(a, p_tail_samples, q_tail_samples, self_normalised),
        );
    }
    a * p_label + (1.0 - a) * q_label - logsumexp(&mixed)
}

/// §3: δ = τ (1 + |s_θ(y_w)| + |s_θ(y_l)|).
pub fn tolerance(step_tolerance: f64, logps_chosen: f64, logps_rejected: f64) -> f64 {
    step_tolerance * (1.0 + logps_chosen.abs() + logps_rejected.abs())
}

/// §3: the per-pair step k ∈ {−1, 0, +1}.
pub fn step_direction(g: f64, g_plus: f64, g_minus: f64, delta: f64) -> i8 {
    if g_plus - g > delta && g - g_minus > delta {
        1
    } else if g_minus - g > delta && g - g_plus > delta {
        -1
    } else {
        0
    }
}

/// How far a pair's decision is from flipping: min(|g₊ − g|, |g − g₋|), in the units of δ
/// comparisons (pairs with a margin of a few δ can flip on float noise).
pub fn decision_margin(g: f64, g_plus: f64, g_minus: f64) -> f64 {
    (g_plus - g).abs().min((g - g_minus).abs())
}

/// §3: β_i = β / (1 + ε k).
pub fn pair_beta(beta: f64, epsilon: f64, k: i8) -> f64 {
    beta / (1.0 + epsilon * f64::from(k))
}

/// log σ(x), computed stably.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// §4: ℓ = −(1−λ) log σ(β_i z) − λ log σ(−β_i z).
pub fn pair_loss(beta_i: f64, z: f64, label_smoothing: f64) -> f64 {
    -(1.0 - label_smoothing) * log_sigmoid(beta_i * z) - label_smoothing * log_sigmoid(-beta_i * z)
}

/// §5: β ← β / (1 + ε k̄).
pub fn beta_update(beta: f64, epsilon: f64, mean_step: f64) -> f64 {
    beta / (1.0 + epsilon * mean_step)
}

/// Everything §3–§6 say about one pair, from its sequence log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairDecision {
    pub k: i8,
    pub beta_i: f64,
    pub z: f64,
    pub g: f64,
    pub g_plus: f64,
    pub g_minus: f64,
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub margin: f64,
}

/// Sequence log-probs of one pair: policy, perturbed (a = 1 ± ε) and reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_plus: f64,
    pub rejected_plus: f64,
    pub chosen_minus: f64,
    pub rejected_minus: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// The ε-DPO hyper-parameters that act per pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpsDpoSettings {
    pub beta: f64,
    pub epsilon: f64,
    pub label_smoothing: f64,
    pub step_tolerance: f64,
}

/// §3–§6 for one pair.
pub fn decide(l: &PairLogps, s: &EpsDpoSettings) -> PairDecision {
    let g = l.chosen - l.rejected;
    let g_plus = l.chosen_plus - l.rejected_plus;
    let g_minus = l.chosen_minus - l.rejected_minus;
    let delta = tolerance(s.step_tolerance, l.chosen, l.rejected);
    let k = step_direction(g, g_plus, g_minus, delta);
    let beta_i = pair_beta(s.beta, s.epsilon, k);
    let z = g - (l.ref_chosen - l.ref_rejected);
    PairDecision {
        k,
        beta_i,
        z,
        g,
        g_plus,
        g_minus,
        loss: pair_loss(beta_i, z, s.label_smoothing),
        reward_chosen: beta_i * (l.chosen - l.ref_chosen),
        reward_rejected: beta_i * (l.rejected - l.ref_rejected),
        margin: decision_margin(g, g_plus, g_minus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic pseudo-random generator for test vectors.
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn sparse_estimate_is_exact_when_the_cache_covers_the_vocabulary() {
        let mut seed = 7;
        let v = 50;
        for _ in 0..20 {
            let pl: Vec<f64> = (0..v).map(|_| 3.0 * lcg(&mut seed)).collect();
            let ql: Vec<f64> = (0..v).map(|_| 3.0 * lcg(&mut seed)).collect();
            let (p, q) = (log_softmax(&pl), log_softmax(&ql));
            let label = ((lcg(&mut seed) + 1.0) * 0.5 * (v as f64 - 1.0)) as usize;
            for a in [1.1, 0.9, 1.5] {
                let exact = exact_perturbed_logp(a, &pl, &ql, label);
                let sparse = sparse_perturbed_logp(a, p[label], q[label], &p, &q, true);
                assert!((exact - sparse).abs() < 1e-9, "a={a}: {exact} vs {sparse}");
            }
        }
    }

    #[test]
    fn tail_merge_is_exact_when_tails_are_proportional() {
        // Policy and reference agree outside S (up to a common factor): the merged tail is
        // then exactly right, whatever K.
        let p = log_softmax(&[2.0, 1.0, 0.5, -1.0, -1.0, -1.0]);
        let q = log_softmax(&[1.0, 2.0, 0.0, -1.0, -1.0, -1.0]);
        let pl = [2.0, 1.0, 0.5, -1.0, -1.0, -1.0];
        let ql = [1.0, 2.0, 0.0, -1.0, -1.0, -1.0];
        for a in [1.2, 0.8] {
            let exact = exact_perturbed_logp(a, &pl, &ql, 2);
            let sparse = sparse_perturbed_logp(a, p[2], q[2], &p[..2], &q[..2], false);
            let sum_p_tail: f64 = p[3..].iter().map(|v| v.exp()).sum();
            let sum_q_tail: f64 = q[3..].iter().map(|v| v.exp()).sum();
            // Tail tokens are equal within each distribution, so the tail is one merged token.
            assert!(sum_p_tail > 0.0 && sum_q_tail > 0.0);
            assert!((exact - sparse).abs() < 1e-9, "{exact} vs {sparse}");
        }
    }

    #[test]
    fn head_tail_estimate_is_exact_with_the_whole_head_and_no_tail() {
        let mut seed = 11;
        let v = 40;
        let pl: Vec<f64> = (0..v).map(|_| 3.0 * lcg(&mut seed)).collect();
        let ql: Vec<f64> = (0..v).map(|_| 3.0 * lcg(&mut seed)).collect();
        let (p, q) = (log_softmax(&pl), log_softmax(&ql));
        for a in [1.2, 0.8] {
            let exact = exact_perturbed_logp(a, &pl, &ql, 5);
            let est = head_tail_perturbed_logp(a, p[5], q[5], &p, &q, true, &[], &[], false);
            assert!((exact - est).abs() < 1e-9, "{exact} vs {est}");
        }
    }

    #[test]
    fn sampled_normalisers_are_unbiased() {
        // Enumerate the sampling distribution instead of drawing: with one draw, the expected
        // normaliser estimate equals the exact normaliser, for the pure and the head-tail form.
        let mut seed = 5;
        let v = 30;
        let pl: Vec<f64> = (0..v).map(|_| 2.0 * lcg(&mut seed)).collect();
        let ql: Vec<f64> = (0..v).map(|_| 2.0 * lcg(&mut seed)).collect();
        let (p, q) = (log_softmax(&pl), log_softmax(&ql));
        let (a, label) = (1.3, 7);
        let exact = exact_perturbed_logp(a, &pl, &ql, label);
        let numerator = a * p[label] + (1.0 - a) * q[label];
        let expected_z: f64 = (0..v)
            .map(|j| {
                q[j].exp()
                    * (numerator
                        - sampled_perturbed_logp(
                            a,
                            p[label],
                            q[label],
                            &p[j..=j],
                            &q[j..=j],
                            false,
                        ))
                    .exp()
            })
            .sum();
        assert!((numerator - expected_z.ln() - exact).abs() < 1e-9);
        // Head = ids 0..4 (label 7 outside it); tail draws ∝ q over the rest.
        let head = 4;
        let tail: Vec<usize> = (head..v).filter(|&j| j != label).collect();
        let tail_mass: f64 = tail.iter().map(|&j| q[j].exp()).sum();
        let expected_z: f64 = tail
            .iter()
            .map(|&j| {
                let est = head_tail_perturbed_logp(
                    a,
                    p[label],
                    q[label],
                    &p[..head],
                    &q[..head],
                    false,
                    &p[j..=j],
                    &q[j..=j],
                    false,
                );
                q[j].exp() / tail_mass * (numerator - est).exp()
            })
            .sum();
        assert!((numerator - expected_z.ln() - exact).abs() < 1e-9);
    }

    #[test]
    fn self_normalised_estimates_are_exact_when_the_draws_are_the_whole_tail() {
        // Drawing every tail id once, weighted by its reference probability, is what the
        // self-normalised ratio converges to; with equal reference probabilities over the
        // tail the unweighted sum over all tail ids is that limit exactly.
        let pl = [2.0, 1.0, 0.3, -0.4, 0.9, -1.2];
        let ql = [1.0, 2.0, 0.0, -1.0, -1.0, -1.0];
        let (p, q) = (log_softmax(&pl), log_softmax(&ql));
        for a in [1.2, 0.8] {
            let exact = exact_perturbed_logp(a, &pl, &ql, 2);
            let est = head_tail_perturbed_logp(
                a,
                p[2],
                q[2],
                &p[..2],
                &q[..2],
                false,
                &p[3..],
                &q[3..],
                true,
            );
            assert!((exact - est).abs() < 1e-9, "{exact} vs {est}");
        }
    }

    #[test]
    fn steps_follow_the_monotonicity_rule() {
        assert_eq!(step_direction(0.0, 1.0, -1.0, 1e-6), 1);
        assert_eq!(step_direction(0.0, -1.0, 1.0, 1e-6), -1);
        assert_eq!(step_direction(0.0, 1.0, 1.0, 1e-6), 0);
        // Within the tolerance: no step.
        assert_eq!(step_direction(0.0, 1e-7, -1e-7, 1e-6), 0);
        assert_eq!(pair_beta(0.1, 0.5, 1), 0.1 / 1.5);
        assert!((beta_update(0.1, 0.1, 0.5) - 0.1 / 1.05).abs() < 1e-15);
    }

    #[test]
    fn loss_is_dpo_at_zero_epsilon_and_smooths_with_lambda() {
        let s = EpsDpoSettings {
            beta: 0.1,
            epsilon: 0.0,
            label_smoothing: 0.0,
            step_tolerance: 1e-6,
        };
        let l = PairLogps {
            chosen: -10.0,
            rejected: -12.0,
            chosen_plus: -9.0,
            rejected_plus: -12.5,
            chosen_minus: -11.0,
            rejected_minus: -11.5,
            ref_chosen: -11.0,
            ref_rejected: -11.0,
        };
        let d = decide(&l, &s);
        assert_eq!(d.k, 1);
        assert_eq!(d.beta_i, 0.1, "ε = 0 keeps β whatever k");
        assert!((d.z - 2.0).abs() < 1e-12);
        assert!((d.loss - (1.0 + (-0.2f64).exp()).ln()).abs() < 1e-12);
        let smoothed = decide(
            &l,
            &EpsDpoSettings {
                label_smoothing: 0.1,
                ..s
            },
        );
        assert!(smoothed.loss > d.loss);
        assert!((d.reward_chosen - 0.1).abs() < 1e-12 && (d.reward_rejected + 0.1).abs() < 1e-12);
    }
}
