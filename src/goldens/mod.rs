//! `edpo verify`: the bundle's goldens (PyTorch float64 outputs on a fixed batch, computed at
//! export) replayed through ONNX Runtime, each output judged within its noise band.
//!
//! The goldens file layout and the manifest fields are a contract with the exporter
//! (`python/edpo_export/goldens.py`, ARCHITECTURE.md "Contracts"); `band` holds the rules,
//! `signs` the seeded projections of the gradients.

pub mod band;
pub mod signs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayD, ArrayView2, ArrayView3, Ix1, Ix2, Ix3};
use safetensors::tensor::{Dtype, SafeTensors};
use serde::Serialize;

use crate::bundle::{Bundle, BundleError, GoldensSpec};
use crate::graphs::{LossSettings, ReferenceGraph, TrainBatch, TrainGraph};
use crate::output::Printable;
use crate::params::{f32_from_le_bytes, i64_from_le_bytes};
use crate::runtime::SessionConfig;
use band::{Band, Bands};

/// The goldens format this build reads (`goldens.format` in the manifest).
pub const GOLDENS_FORMAT: u32 = 2;
const REEXPORT: &str =
    "re-export the bundle with `python -m edpo_export --model HF_DIR --out BUNDLE`";

/// A golden tensor.
#[derive(Debug, Clone)]
pub enum Golden {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum GoldensError {
    #[error("the bundle has no goldens; {REEXPORT}")]
    Absent,
    #[error("`{file}` holds goldens format {got} (float32 outputs, fixed tolerances); this edpo verifies format {GOLDENS_FORMAT} (float64 outputs, noise bands): {REEXPORT}")]
    OldFormat { file: PathBuf, got: u32 },
    #[error("`{file}`: {message}")]
    Format { file: String, message: String },
}

/// The tensors of `goldens.safetensors`, by name.
pub struct Goldens {
    file: String,
    tensors: BTreeMap<String, Golden>,
}

fn f64_from_le_bytes(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

impl Goldens {
    /// Reads the goldens of a bundle whose manifest says goldens format 2.
    pub fn load(bundle: &Bundle) -> Result<Self, crate::Error> {
        let spec = goldens_spec(bundle)?;
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
            let data = view.data();
            let golden = match view.dtype() {
                Dtype::F32 => {
                    ArrayD::from_shape_vec(shape, f32_from_le_bytes(data)).map(Golden::F32)
                }
                Dtype::F64 => {
                    ArrayD::from_shape_vec(shape, f64_from_le_bytes(data)).map(Golden::F64)
                }
                Dtype::I64 => {
                    ArrayD::from_shape_vec(shape, i64_from_le_bytes(data)).map(Golden::I64)
                }
                other => return Err(format(format!("tensor `{name}` has dtype {other:?}")).into()),
            }
            .map_err(|e| format(e.to_string()))?;
            tensors.insert(name, golden);
        }
        Ok(Goldens {
            file: spec.file.clone(),
            tensors,
        })
    }

    fn missing(&self, name: &str, dtype: &str) -> GoldensError {
        GoldensError::Format {
            file: self.file.clone(),
            message: format!("no {dtype} tensor `{name}`; {REEXPORT}"),
        }
    }

    pub fn f32(&self, name: &str) -> Result<&ArrayD<f32>, GoldensError> {
        match self.tensors.get(name) {
            Some(Golden::F32(a)) => Ok(a),
            _ => Err(self.missing(name, "float32")),
        }
    }

    pub fn f64(&self, name: &str) -> Result<&ArrayD<f64>, GoldensError> {
        match self.tensors.get(name) {
            Some(Golden::F64(a)) => Ok(a),
            _ => Err(self.missing(name, "float64")),
        }
    }

    pub fn i64(&self, name: &str) -> Result<&ArrayD<i64>, GoldensError> {
        match self.tensors.get(name) {
            Some(Golden::I64(a)) => Ok(a),
            _ => Err(self.missing(name, "int64")),
        }
    }

    fn scalar(&self, name: &str) -> Result<f32, GoldensError> {
        Ok(self.f32(name)?.iter().copied().next().unwrap_or(f32::NAN))
    }

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

    /// The values the joint graph is run with: `params`, each replaced by its
    /// `train.in.param.<name>` golden where the goldens have one (a LoRA bundle's adapter with
    /// every lora_B non-zero, so that every adapter matrix has a gradient to check).
    fn trained_params(
        &self,
        mut params: crate::params::ParamStore,
    ) -> Result<crate::params::ParamStore, GoldensError> {
        for p in &mut params.params {
            let name = format!("train.in.param.{}", p.name);
            if !self.tensors.contains_key(&name) {
                continue;
            }
            let value = self.f32(&name)?;
            if value.shape() != p.shape.as_slice() {
                return Err(GoldensError::Format {
                    file: self.file.clone(),
                    message: format!(
                        "`{name}` has shape {:?}, expected {:?}",
                        value.shape(),
                        p.shape
                    ),
                });
            }
            p.data = value.iter().copied().collect();
        }
        Ok(params)
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

/// The manifest's goldens section, refused with a re-export message unless it is format 2.
fn goldens_spec(bundle: &Bundle) -> Result<&GoldensSpec, GoldensError> {
    let spec = bundle
        .manifest
        .goldens
        .as_ref()
        .ok_or(GoldensError::Absent)?;
    if spec.format != GOLDENS_FORMAT {
        return Err(GoldensError::OldFormat {
            file: bundle.path(&spec.file),
            got: spec.format,
        });
    }
    Ok(spec)
}

/// One comparison of an ONNX Runtime output with its float64 golden.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    #[serde(rename = "check")]
    pub label: String,
    pub detail: String,
    pub ok: bool,
    /// ONNX Runtime's error against float64 (absolute, or relative for gradients).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<f64>,
    /// The allowed error (the noise band).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub band: Option<f64>,
    /// PyTorch fp32's error on the same batch, which the band was derived from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_fp32: Option<f64>,
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
    /// The band is `factor` × PyTorch fp32's error + `floor` × max(1, |value|).
    pub factor: f64,
    pub floor: f64,
    pub checks: Vec<Check>,
    pub passed: bool,
}

impl VerifyReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.passed
    }

    /// The check called `label`, if it ran.
    pub fn check(&self, label: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.label == label)
    }

    fn push(&mut self, label: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.push_check(Check {
            label: label.into(),
            ok,
            detail: detail.into(),
            error: None,
            band: None,
            torch_fp32: None,
        });
    }

    /// A check of `error` against `band`.
    fn within(&mut self, label: impl Into<String>, error: f64, band: Band) {
        let ok = error <= band.allowed;
        self.push_check(Check {
            label: label.into(),
            ok,
            detail: format!(
                "ORT {error:.2e} {} band {:.2e} (torch fp32 {:.2e})",
                if ok { "≤" } else { ">" },
                band.allowed,
                band.torch_fp32
            ),
            error: Some(error),
            band: Some(band.allowed),
            torch_fp32: Some(band.torch_fp32),
        });
    }

    fn push_check(&mut self, check: Check) {
        self.checks.push(check);
        self.passed = self.checks.iter().all(|c| c.ok);
    }
}

impl Printable for VerifyReport {
    fn to_table(&self) -> String {
        let mut s = format!(
            "bundle {} ({}, {} parameters, vocab {})\n\
             ONNX Runtime vs PyTorch float64; band = {} × torch fp32 error + {:.2e} × max(1, |value|)\n",
            self.bundle.display(),
            self.architecture,
            self.num_parameters,
            self.vocab_size,
            self.factor,
            self.floor,
        );
        for c in &self.checks {
            s.push_str(&format!(
                "  {} {:<40} {}\n",
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

/// max |got − want| over matching elements (infinite when the shapes differ).
fn max_abs_diff(got: &ArrayD<f32>, want: &ArrayD<f64>) -> f64 {
    if got.shape() != want.shape() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want.iter())
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max)
}

/// Reference graph on the golden batch: label and top-K log-probs within their bands, top-K
/// ids equal to float64's up to near-ties, at the batch's real tokens (the scoring graph's values
/// at padding are not defined: its attention may be causal without the padding mask, which gives
/// real tokens of right-padded rows the same values).
fn verify_reference(
    bundle: &Bundle,
    config: &SessionConfig,
    goldens: &Goldens,
    bands: &Bands,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let mut reference = ReferenceGraph::new(bundle, None, config)?;
    let ids = goldens.array::<_, Ix2>(goldens.i64("reference.in.input_ids")?)?;
    let mask = goldens.array::<_, Ix2>(goldens.i64("reference.in.attention_mask")?)?;
    let topk = goldens
        .i64("reference.in.k")?
        .iter()
        .copied()
        .next()
        .unwrap_or(1);
    let scored = reference.score(ids.view(), mask.view(), None, topk)?;
    let real = real_tokens(mask.view());
    let tok64 = goldens.f64("reference.f64.token_logps")?;
    let band = bands.absolute("reference.token_logps", tok64.iter().copied())?;
    let tok64 = goldens.array::<_, Ix2>(tok64)?;
    let vals64 = goldens.array::<_, Ix3>(goldens.f64("reference.f64.topk_logps")?)?;
    let ids64 = goldens.array::<_, Ix3>(goldens.i64("reference.f64.topk_ids")?)?;
    let (n, t) = mask.dim();
    if real.is_empty()
        || tok64.dim() != (n, t)
        || vals64.dim().0 != n
        || vals64.dim().1 != t
        || ids64.dim() != vals64.dim()
    {
        return Err(GoldensError::Format {
            file: goldens.file.clone(),
            message: format!(
                "the reference goldens do not fit their batch [{n}, {t}] with {} real tokens; re-export the bundle",
                real.len()
            ),
        }
        .into());
    }
    let err = real
        .iter()
        .map(|&at| (f64::from(scored.token_logps[at]) - tok64[at]).abs())
        .fold(0.0, f64::max);
    report.within("reference token_logps (max abs)", err, band);

    let k = scored.topk_ids.dim().2;
    if k > vals64.dim().2 {
        return Err(goldens
            .missing(
                &format!("reference.f64.topk_logps with ≥ {k} ranks"),
                "float64",
            )
            .into());
    }
    let band = bands.absolute("reference.topk_logps", vals64.iter().copied())?;
    let (got_vals, got_ids) = (
        at_tokens(scored.topk_logps.view(), &real),
        at_tokens(scored.topk_ids.view(), &real),
    );
    let (vals64, ids64) = (
        at_tokens(vals64.view(), &real),
        at_tokens(ids64.view(), &real),
    );
    let first_k = vals64.slice(ndarray::s![.., .., ..k]).to_owned().into_dyn();
    let err = max_abs_diff(&got_vals.into_dyn(), &first_k);
    report.within("reference topk_logps (max abs)", err, band);
    let (differ, outside) =
        band::topk_ids_outside_band(got_ids.view(), ids64.view(), vals64.view(), band.allowed);
    report.push(
        "reference topk_ids (near-ties allowed)",
        outside == 0,
        format!(
            "{differ} differ from float64, {outside} of them outside the band {:.2e}",
            band.allowed
        ),
    );
    Ok(())
}

/// (row, position) of every real token (attention mask 1).
fn real_tokens(mask: ArrayView2<i64>) -> Vec<(usize, usize)> {
    mask.indexed_iter()
        .filter(|(_, &m)| m == 1)
        .map(|(at, _)| at)
        .collect()
}

/// The [rows, positions, K] array's lanes at `tokens`, as [tokens, 1, K].
fn at_tokens<T: Clone>(values: ArrayView3<T>, tokens: &[(usize, usize)]) -> Array3<T> {
    Array3::from_shape_fn((tokens.len(), 1, values.dim().2), |(i, _, j)| {
        let (row, t) = tokens[i];
        values[[row, t, j]].clone()
    })
}

/// Loss and log-probs within their bands; the steps equal float64's on every decided pair.
fn verify_train_outputs(
    out: &crate::graphs::TrainOutputs,
    goldens: &Goldens,
    bands: &Bands,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let mut allowed = BTreeMap::new();
    for (name, got) in [
        ("loss", ndarray::arr1(&[out.loss])),
        ("logps", out.logps.clone()),
        ("logps_plus", out.logps_plus.clone()),
        ("logps_minus", out.logps_minus.clone()),
    ] {
        let want = goldens.f64(&format!("train.f64.{name}"))?;
        let band = bands.absolute(&format!("train.{name}"), want.iter().copied())?;
        let got = got
            .into_shape_with_order(want.shape())
            .map_err(|e| GoldensError::Format {
                file: goldens.file.clone(),
                message: format!("`train.f64.{name}`: {e}"),
            })?;
        report.within(
            format!("train {name} (max abs)"),
            max_abs_diff(&got, want),
            band,
        );
        allowed.insert(name, band.allowed);
    }
    let step_band = band::step_band(
        allowed["logps"],
        allowed["logps_plus"],
        allowed["logps_minus"],
    );
    let want: Vec<i64> = goldens.i64("train.f64.steps")?.iter().copied().collect();
    let margin: Vec<f64> = goldens
        .f64("train.f64.step_margin")?
        .iter()
        .copied()
        .collect();
    let got = out.pair_steps.to_vec();
    let (agree, decided) = band::decided_steps_agree(&got, &want, &margin, step_band);
    report.push(
        "train steps (decided pairs identical)",
        agree,
        format!(
            "{got:?} vs float64 {want:?}; {decided} of {} pairs have a margin > {step_band:.2e}",
            want.len()
        ),
    );
    Ok(())
}

/// Every gradient's relative error (exact where stored in full, else from its projections)
/// within its band; failing tensors are listed one by one.
fn verify_gradients(
    params: &crate::params::ParamStore,
    grads: &[Vec<f32>],
    goldens: &Goldens,
    bands: &Bands,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let mut closest: Option<(f64, String, f64, Band)> = None;
    for (p, grad) in params.params.iter().zip(grads) {
        let norm = goldens
            .f64(&format!("train.grad.norm.{}", p.name))?
            .iter()
            .copied()
            .next()
            .unwrap_or(0.0);
        let err = match goldens.tensors.get(&format!("train.grad.full.{}", p.name)) {
            Some(Golden::F64(full)) => {
                band::rel_error_full(grad, full.as_slice().unwrap_or(&[]), norm)
            }
            _ => {
                let want = goldens.f64(&format!("train.grad.proj.{}", p.name))?;
                let got = signs::project(&p.name, grad, want.len());
                band::rel_error_projected(&got, &want.iter().copied().collect::<Vec<_>>(), norm)
            }
        };
        let band = bands.gradient(&p.name)?;
        if err > band.allowed {
            report.within(format!("grad {} (rel)", p.name), err, band);
        }
        let ratio = err / band.allowed;
        if closest.as_ref().is_none_or(|c| ratio > c.0) {
            closest = Some((ratio, p.name.clone(), err, band));
        }
    }
    let (ratio, name, err, band) = closest.unwrap_or((
        0.0,
        String::new(),
        0.0,
        Band {
            allowed: 0.0,
            torch_fp32: 0.0,
        },
    ));
    report.push_check(Check {
        label: format!("gradients, {} tensors (rel)", params.len()),
        ok: ratio <= 1.0,
        detail: format!(
            "closest to its band: {name}: ORT {err:.2e} vs band {:.2e} (torch fp32 {:.2e})",
            band.allowed, band.torch_fp32
        ),
        error: Some(err),
        band: Some(band.allowed),
        torch_fp32: Some(band.torch_fp32),
    });
    Ok(())
}

/// Joint graph on the golden batch: loss, log-probs, per-pair steps and every gradient.
fn verify_train(
    bundle: &Bundle,
    config: &SessionConfig,
    goldens: &Goldens,
    bands: &Bands,
    report: &mut VerifyReport,
) -> Result<(), crate::Error> {
    let mut train = TrainGraph::new(bundle, config)?;
    let params = goldens.trained_params(bundle.load_trainable()?)?;
    let batch = goldens.train_batch()?;
    let settings = LossSettings {
        beta: goldens.scalar("train.in.beta")?,
        epsilon: goldens.scalar("train.in.epsilon")?,
        label_smoothing: goldens.scalar("train.in.label_smoothing")?,
        step_tolerance: goldens.scalar("train.in.step_tolerance")?,
    };
    let mut grads: Vec<Vec<f32>> = params.zeros_like();
    let out = train.run(&params, &batch, &settings, &mut grads, 1.0)?;
    verify_train_outputs(&out, goldens, bands, report)?;
    verify_gradients(&params, &grads, goldens, bands, report)
}

/// Runs both graphs on the golden batch and compares with PyTorch's float64 outputs.
pub fn verify_bundle(
    bundle: &Bundle,
    config: &SessionConfig,
) -> Result<VerifyReport, crate::Error> {
    let goldens = Goldens::load(bundle)?;
    let spec = goldens_spec(bundle)?;
    let bands = Bands::new(spec);
    let mut report = VerifyReport {
        bundle: bundle.dir.clone(),
        bundle_sha256: bundle.bundle_sha256.clone(),
        architecture: bundle.manifest.architecture.clone(),
        num_parameters: bundle.manifest.num_parameters,
        vocab_size: bundle.manifest.vocab_size,
        factor: bands.factor(),
        floor: bands.floor(),
        ..VerifyReport::default()
    };
    verify_reference(bundle, config, &goldens, &bands, &mut report)?;
    verify_train(bundle, config, &goldens, &bands, &mut report)?;
    Ok(report)
}

/// `edpo verify`: opens the bundle folder `model` (manifest, every file hashed again) and
/// replays its goldens.
pub fn verify(model: &Path, config: &SessionConfig) -> Result<VerifyReport, crate::Error> {
    verify_bundle(&Bundle::open_rehashing(model)?, config)
}
