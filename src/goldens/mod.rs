//! The bundle's golden outputs (computed by PyTorch at export) and their reproduction in Rust.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Ix1, Ix2, Ix3};
use safetensors::tensor::{Dtype, SafeTensors};

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::{Bundle, BundleError};
use crate::graphs::{LossSettings, ReferenceGraph, TrainBatch, TrainGraph};
use crate::output::Printable;
use crate::params::{f32_from_le_bytes, i64_from_le_bytes};
use crate::runtime::SessionConfig;

/// A golden tensor.
#[derive(Debug, Clone)]
pub enum Golden {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum GoldensError {
    #[error("the bundle has no goldens (export it with `python -m edpo_export` to get them)")]
    Absent,
    #[error("`{file}`: {message}")]
    Format { file: String, message: String },
}

pub struct Goldens {
    file: String,
    tensors: BTreeMap<String, Golden>,
    pub tolerances: BTreeMap<String, f64>,
}

impl Goldens {
    pub fn load(bundle: &Bundle) -> Result<Self, crate::Error> {
        let spec = bundle
            .manifest
            .goldens
            .as_ref()
            .ok_or(GoldensError::Absent)?;
        let path = bundle.path(&spec.file);
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let format = |message: String| GoldensError::Format {
            file: spec.file.clone(),
            message,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let golden = match view.dtype() {
                Dtype::F32 => Golden::F32(
                    ArrayD::from_shape_vec(shape, f32_from_le_bytes(view.data()))
                        .map_err(|e| format(e.to_string()))?,
                ),
                Dtype::I64 => Golden::I64(
                    ArrayD::from_shape_vec(shape, i64_from_le_bytes(view.data()))
                        .map_err(|e| format(e.to_string()))?,
                ),
                other => return Err(format(format!("tensor `{name}` has dtype {other:?}")).into()),
            };
            tensors.insert(name, golden);
        }
        Ok(Goldens {
            file: spec.file.clone(),
            tensors,
            tolerances: spec.tolerances.clone(),
        })
    }

    pub fn f32(&self, name: &str) -> Result<&ArrayD<f32>, GoldensError> {
        match self.tensors.get(name) {
            Some(Golden::F32(a)) => Ok(a),
            _ => Err(GoldensError::Format {
                file: self.file.clone(),
                message: format!("no float32 tensor `{name}`"),
            }),
        }
    }

    pub fn i64(&self, name: &str) -> Result<&ArrayD<i64>, GoldensError> {
        match self.tensors.get(name) {
            Some(Golden::I64(a)) => Ok(a),
            _ => Err(GoldensError::Format {
                file: self.file.clone(),
                message: format!("no int64 tensor `{name}`"),
            }),
        }
    }

    fn scalar(&self, name: &str) -> Result<f32, GoldensError> {
        Ok(self.f32(name)?.iter().copied().next().unwrap_or(f32::NAN))
    }

    fn tolerance(&self, key: &str, default: f64) -> f64 {
        self.tolerances.get(key).copied().unwrap_or(default)
    }
}

/// One comparison of a Rust-computed output with its golden.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    #[serde(rename = "check")]
    pub label: String,
    pub detail: String,
    pub ok: bool,
}

/// Every comparison of a goldens run, and which bundle it was.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub bundle: PathBuf,
    pub bundle_sha256: String,
    #[serde(skip)]
    pub architecture: String,
    #[serde(skip)]
    pub num_parameters: u64,
    #[serde(skip)]
    pub vocab_size: usize,
    pub checks: Vec<Check>,
    pub passed: bool,
}

impl VerifyReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.passed
    }

    fn push(&mut self, label: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            label: label.into(),
            ok,
            detail: detail.into(),
        });
        self.passed = self.checks.iter().all(|c| c.ok);
    }
}

impl Printable for VerifyReport {
    fn to_table(&self) -> String {
        let mut s = format!(
            "bundle {} ({}, {} parameters, vocab {})\n",
            self.bundle.display(),
            self.architecture,
            self.num_parameters,
            self.vocab_size
        );
        for c in &self.checks {
            s.push_str(&format!(
                "  {} {:<48} {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.label,
                c.detail
            ));
        }
        s.push_str(if self.passed {
            "goldens reproduced\n"
        } else {
            "goldens NOT reproduced\n"
        });
        s
    }
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    if a.shape() != b.shape() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

impl Goldens {
    /// A golden tensor of rank `D` (an error names it when its rank differs).
    fn array<T: Clone, D: ndarray::Dimension>(
        &self,
        tensor: &ArrayD<T>,
    ) -> Result<ndarray::Array<T, D>, GoldensError> {
        tensor
            .clone()
            .into_dimensionality::<D>()
            .map_err(|e| GoldensError::Format {
                file: self.file.clone(),
                message: e.to_string(),
            })
    }

    /// The golden micro-batch of the joint graph.
    fn train_batch(&self) -> Result<TrainBatch, GoldensError> {
        Ok(TrainBatch {
            input_ids: self.array::<_, Ix2>(self.i64("train.in.input_ids")?)?,
            attention_mask: self.array::<_, Ix2>(self.i64("train.in.attention_mask")?)?,
            loss_mask: self.array::<_, Ix2>(self.i64("train.in.loss_mask")?)?,
            ref_logps: self.array::<_, Ix1>(self.f32("train.in.ref_logps")?)?,
            ref_token_logps: self.array::<_, Ix2>(self.f32("train.in.ref_token_logps")?)?,
            ref_topk_ids: self.array::<_, Ix3>(self.i64("train.in.ref_topk_ids")?)?,
            ref_topk_logps: self.array::<_, Ix3>(self.f32("train.in.ref_topk_logps")?)?,
        })
    }
}

/// Reference graph on the golden batch: label and top-K log-probs, top-K ids where the
/// values are not tied.
fn verify_reference(
    bundle: &Bundle,
    config: &SessionConfig,
    goldens: &Goldens,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let logps_tol = goldens.tolerance("logps_abs", 1e-4);
    let mut reference = ReferenceGraph::new(bundle, None, config)?;
    let ids = goldens.array::<_, Ix2>(goldens.i64("reference.in.input_ids")?)?;
    let mask = goldens.array::<_, Ix2>(goldens.i64("reference.in.attention_mask")?)?;
    let topk = goldens
        .i64("reference.in.k")?
        .iter()
        .copied()
        .next()
        .unwrap_or(1);
    let scored = reference.score(ids.view(), mask.view(), topk)?;
    let err = max_abs_diff(
        &scored.token_logps.into_dyn(),
        goldens.f32("reference.out.token_logps")?,
    );
    report.push(
        "reference token_logps (abs)",
        err <= logps_tol,
        format!("max |Δ| = {err:.2e}"),
    );
    let want_topk = goldens.f32("reference.out.topk_logps")?;
    let err = max_abs_diff(&scored.topk_logps.clone().into_dyn(), want_topk);
    report.push(
        "reference topk_logps (abs)",
        err <= logps_tol,
        format!("max |Δ| = {err:.2e}"),
    );
    let want_ids = goldens.array::<_, Ix3>(goldens.i64("reference.out.topk_ids")?)?;
    let want_vals = goldens.array::<_, Ix3>(want_topk)?;
    let (mut differ, mut untied_differ) = (0usize, 0usize);
    for ((idx, got), want) in scored.topk_ids.indexed_iter().zip(want_ids.iter()) {
        if got != want {
            differ += 1;
            let (n, t, j) = idx;
            let width = want_vals.dim().2;
            let v = want_vals[[n, t, j]];
            let tied = (j > 0 && (want_vals[[n, t, j - 1]] - v).abs() < 1e-5)
                || (j + 1 < width && (want_vals[[n, t, j + 1]] - v).abs() < 1e-5);
            if !tied {
                untied_differ += 1;
            }
        }
    }
    report.push(
        "reference topk_ids (where values are not tied)",
        untied_differ == 0,
        format!("{differ} differ, {untied_differ} of them at untied values"),
    );
    Ok(())
}

/// Joint graph on the golden batch: loss, log-probs, per-pair steps and every gradient.
fn verify_train(
    bundle: &Bundle,
    config: &SessionConfig,
    goldens: &Goldens,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let logps_tol = goldens.tolerance("logps_abs", 1e-4);
    let loss_tol = goldens.tolerance("loss_abs", 1e-5);
    let grad_tol = goldens.tolerance("grad_rel", 1e-4);
    let mut train = TrainGraph::new(bundle, config)?;
    let params = bundle.load_params()?;
    let batch = goldens.train_batch()?;
    let settings = LossSettings {
        beta: goldens.scalar("train.in.beta")?,
        epsilon: goldens.scalar("train.in.epsilon")?,
        label_smoothing: goldens.scalar("train.in.label_smoothing")?,
        step_tolerance: goldens.scalar("train.in.step_tolerance")?,
    };
    let mut grads: Vec<Vec<f32>> = params.zeros_like();
    let out = train.run(&params, &batch, &settings, &mut grads, 1.0)?;
    let want_loss = f64::from(goldens.scalar("train.out.loss")?);
    let err = (f64::from(out.loss) - want_loss).abs();
    report.push(
        "train loss (abs)",
        err <= loss_tol,
        format!("|Δ| = {err:.2e} (loss {:.6})", out.loss),
    );
    for (name, got) in [
        ("logps", &out.logps),
        ("logps_plus", &out.logps_plus),
        ("logps_minus", &out.logps_minus),
    ] {
        let err = max_abs_diff(
            &got.clone().into_dyn(),
            goldens.f32(&format!("train.out.{name}"))?,
        );
        report.push(
            format!("train {name} (abs)"),
            err <= logps_tol,
            format!("max |Δ| = {err:.2e}"),
        );
    }
    let want_steps: Vec<i64> = goldens.i64("train.out.steps")?.iter().copied().collect();
    let got_steps = out.pair_steps.to_vec();
    report.push(
        "train steps (identical)",
        got_steps == want_steps,
        format!("{got_steps:?} vs {want_steps:?}"),
    );
    let mut worst = (0.0f64, String::new());
    for (p, grad) in params.params.iter().zip(&grads) {
        let want: Vec<f32> = goldens
            .f32(&format!("train.out.grad.{}", p.name))?
            .iter()
            .copied()
            .collect();
        let rel = rel_l2(grad, &want);
        if rel > worst.0 || worst.1.is_empty() {
            worst = (rel, p.name.clone());
        }
    }
    report.push(
        format!("gradients, {} tensors (rel, worst)", params.len()),
        worst.0 <= grad_tol,
        format!("{:.2e} ({})", worst.0, worst.1),
    );
    Ok(())
}

/// Runs both graphs on the golden batch and compares with PyTorch's outputs.
pub fn verify_bundle(
    bundle: &Bundle,
    config: &SessionConfig,
) -> Result<VerifyReport, crate::Error> {
    let goldens = Goldens::load(bundle)?;
    let mut report = VerifyReport {
        bundle: bundle.dir.clone(),
        bundle_sha256: bundle.bundle_sha256.clone(),
        architecture: bundle.manifest.architecture.clone(),
        num_parameters: bundle.manifest.num_parameters,
        vocab_size: bundle.manifest.vocab_size,
        ..VerifyReport::default()
    };
    verify_reference(bundle, config, &goldens, &mut report)?;
    verify_train(bundle, config, &goldens, &mut report)?;
    Ok(report)
}

/// `edpo verify`: opens the bundle folder `model` (manifest, file hashes) and replays its
/// goldens.
pub fn verify(model: &Path, config: &SessionConfig) -> Result<VerifyReport, crate::Error> {
    verify_bundle(&Bundle::open(model)?, config)
}
