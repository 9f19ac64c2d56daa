//! The optimiser: AdamW exactly as `torch.optim.AdamW` computes it, the learning-rate schedules
//! of Hugging Face `transformers` (warm-up then cosine / linear / constant), and global-norm
//! gradient clipping as `torch.nn.utils.clip_grad_norm_`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning-rate multiplier at optimiser step `step` (0-based), as transformers'
/// `get_{cosine,linear,constant}_schedule_with_warmup`: the first step under warm-up has lr 0.
pub fn lr_factor(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total.saturating_sub(step)) as f64
            / (total.saturating_sub(warmup)).max(1) as f64)
            .max(0.0),
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Parameters that get no weight decay, as the Hugging Face Trainer decides: biases and
/// normalisation weights.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.ends_with(".bias")
        || lower.contains("norm")
        || lower.contains(".ln_")
        || lower.starts_with("ln_"))
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &ParamStore) -> Self {
        AdamW {
            config,
            step: 0,
            exp_avg: params.zeros_like(),
            exp_avg_sq: params.zeros_like(),
        }
    }

    /// One update with learning rate `lr` (torch's single-tensor AdamW, in f32).
    pub fn update(&mut self, params: &mut ParamStore, grads: &[Vec<f32>], lr: f64) {
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = (lr / bias_correction1) as f32;
        let bc2_sqrt = bias_correction2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for (i, p) in params.params.iter_mut().enumerate() {
            let decay = if decays(&p.name) {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            // Element-wise, so splitting into chunks over threads gives the same bits.
            p.data
                .par_chunks_mut(CHUNK)
                .zip(grads[i].par_chunks(CHUNK))
                .zip(self.exp_avg[i].par_chunks_mut(CHUNK))
                .zip(self.exp_avg_sq[i].par_chunks_mut(CHUNK))
                .for_each(|(((x, g), m), v)| {
                    for (((x, g), m), v) in x.iter_mut().zip(g).zip(m).zip(v) {
                        *x *= decay;
                        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                        *m += (*g - *m) * (1.0 - b1);
                        *v = *v * b2 + (1.0 - b2) * *g * *g;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *x += -step_size * (*m / denom);
                    }
                });
        }
    }
}

/// The global L2 norm of all gradients (f64 accumulation).
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    // Fixed chunks summed in order: the same bits for any thread count.
    grads
        .iter()
        .flat_map(|g| {
            g.par_chunks(CHUNK)
                .map(sum_of_squares)
                .collect::<Vec<f64>>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Σ v² in f64 over four interleaved lanes (so the loop vectorises), lanes summed in order.
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let mut quads = values.chunks_exact(4);
    for quad in &mut quads {
        for (lane, &v) in lanes.iter_mut().zip(quad) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = quads
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// Elements per work item of the parallel element-wise loops over parameter-sized buffers.
pub const CHUNK: usize = 1 << 16;

/// Sets every gradient buffer to zero (in parallel; the buffers are kept between steps so
/// their pages are not faulted in again).
pub fn zero(grads: &mut [Vec<f32>]) {
    for g in grads {
        g.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
    }
}

/// Scales gradients whose global norm is `norm` ([`global_norm`], computed once per step) so
/// that it is at most `max_norm` (torch's rule: factor max_norm / (norm + 1e-6), clamped to 1).
pub fn clip_grad_norm(grads: &mut [Vec<f32>], norm: f64, max_norm: f64) {
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
        if coef < 1.0 {
            for g in grads.iter_mut() {
                g.par_chunks_mut(CHUNK)
                    .for_each(|c| c.iter_mut().for_each(|v| *v *= coef));
            }
        }
    }
}

/// `acc += weight · values`, element-wise in parallel chunks (same bits for any thread count).
pub fn add_scaled(acc: &mut [f32], values: &[f32], weight: f32) {
    acc.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(acc, values)| {
            for (a, v) in acc.iter_mut().zip(values) {
                *a += weight * *v;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Param;

    #[test]
    fn schedules_match_transformers() {
        // get_cosine_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10)
        assert_eq!(lr_factor(Schedule::Cosine, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(Schedule::Cosine, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Cosine, 2, 2, 10), 1.0);
        assert!((lr_factor(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(lr_factor(Schedule::Cosine, 10, 2, 10).abs() < 1e-12);
        assert!((lr_factor(Schedule::Linear, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 7, 2, 10), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let mut params = ParamStore::new(vec![Param {
            name: "w".into(),
            shape: vec![2],
            data: vec![1.0, -1.0],
        }]);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(cfg, &params);
        opt.update(&mut params, &[vec![0.5, -2.0]], 0.1);
        assert!((params.params[0].data[0] - 0.9).abs() < 1e-6);
        assert!((params.params[0].data[1] + 0.9).abs() < 1e-6);
    }

    #[test]
    fn global_norm_is_the_plain_sum_within_rounding() {
        let grads: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..(CHUNK * 2 + 7 * k + 3))
                    .map(|i| ((i * 7919 + k) % 1000) as f32 * 1e-3 - 0.5)
                    .collect()
            })
            .collect();
        let plain = grads
            .iter()
            .flatten()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let norm = global_norm(&grads);
        assert!((norm - plain).abs() <= 1e-12 * plain, "{norm} vs {plain}");
        let mut zeroed = grads.clone();
        zero(&mut zeroed);
        assert!(zeroed.iter().flatten().all(|&v| v == 0.0));
        assert_eq!(zeroed[2].len(), grads[2].len());
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0f32]];
        let norm = global_norm(&g);
        clip_grad_norm(&mut g, norm, 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(
            !decays("model.norm.weight")
                && !decays("h.0.attn.c_attn.bias")
                && !decays("transformer.h.0.ln_1.weight")
        );
    }
}
