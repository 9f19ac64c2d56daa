//! Running the bundle's two ONNX graphs: the reference scoring graph and the joint training graph.
//!
//! Sessions are built once, their inputs/outputs are checked against the manifest, and outputs
//! are read by name.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array1, Array2, Array3, ArrayView2};
use ort::session::{OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use crate::bundle::{contract_problems, Bundle, BundleError, Port};
use crate::graph_cache::{self, CacheUse};
use crate::packing;
use crate::params::ParamStore;
use crate::runtime::{session_builder, Device, SessionConfig};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("ONNX Runtime could not load `{file}`: {message}")]
    Load { file: String, message: String },
    #[error("running `{file}` failed: {message}")]
    Run { file: String, message: String },
    #[error("`{file}` returned no output `{name}` of type {dtype}")]
    Output {
        file: String,
        name: String,
        dtype: &'static str,
    },
    #[error("batch for `{file}` is malformed: {message}")]
    Batch { file: String, message: String },
}

fn element_name(ty: TensorElementType) -> String {
    match ty {
        TensorElementType::Float32 => "float32".into(),
        TensorElementType::Int64 => "int64".into(),
        TensorElementType::Float16 => "float16".into(),
        TensorElementType::Bfloat16 => "bfloat16".into(),
        TensorElementType::Int32 => "int32".into(),
        TensorElementType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn ports(outlets: &[ort::value::Outlet]) -> Vec<Port> {
    outlets
        .iter()
        .map(|o| Port {
            name: o.name().to_string(),
            dtype: match o.dtype() {
                ValueType::Tensor { ty, .. } => element_name(*ty),
                other => format!("{other:?}"),
            },
        })
        .collect()
}

/// The first row of `mask` that is not ones followed by zeros (right padding), if any.
fn first_not_right_padded(mask: ArrayView2<i64>) -> Option<usize> {
    mask.outer_iter().position(|row| {
        row.iter()
            .zip(row.iter().skip(1))
            .any(|(a, b)| *a == 0 && *b != 0)
    })
}

fn check_contract(
    bundle: &Bundle,
    file: &str,
    session: &Session,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
) -> Result<(), BundleError> {
    let mut problems = Vec::new();
    problems.extend(contract_problems(
        "input",
        &inputs,
        &ports(session.inputs()),
    ));
    problems.extend(contract_problems(
        "output",
        &outputs,
        &ports(session.outputs()),
    ));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BundleError::Contract {
            file: bundle.path(file),
            problems: problems.join("; "),
        })
    }
}

fn spec_ports(specs: &[crate::bundle::TensorSpec]) -> Vec<Port> {
    specs
        .iter()
        .map(|s| Port {
            name: s.name.clone(),
            dtype: s.dtype.clone(),
        })
        .collect()
}

/// A session output by name as an owned array of element type `T` (`dtype` names it in errors).
fn output_array<T: ort::value::PrimitiveTensorElementType + Clone + 'static>(
    outputs: &ort::session::SessionOutputs<'_>,
    file: &str,
    name: &str,
    dtype: &'static str,
) -> Result<ndarray::ArrayD<T>, GraphError> {
    outputs
        .get(name)
        .and_then(|v| v.try_extract_array::<T>().ok())
        .map(|a| a.to_owned())
        .ok_or_else(|| GraphError::Output {
            file: file.to_string(),
            name: name.to_string(),
            dtype,
        })
}

/// What the scoring graph returns for a batch of sequences (`python/edpo_export/graphs.py`,
/// `ReferenceScorer`). Positions that were not asked for (position 0 always; with a label mask,
/// every position outside it, for a graph that takes `label_positions`) hold zeros.
#[derive(Debug, Clone)]
pub struct ScoreOutputs {
    /// [N, T]: log-prob of token t given tokens < t.
    pub token_logps: Array2<f32>,
    /// [N, T, K]: the K largest log-probs of the distribution predicting token t, descending.
    pub topk_logps: Array3<f32>,
    /// [N, T, K]: their token ids.
    pub topk_ids: Array3<i64>,
}

/// The sliced graphs' input: flat indices r·T + t of the label tokens to score.
const LABEL_POSITIONS: &str = "label_positions";

/// The joint graph's scalar input that weights its loss and gradients (the micro-batch's share
/// of the optimiser step; bundles exported before it have none).
const GRAD_SCALE: &str = "grad_scale";

/// The flat positions r·T + t (1 ≤ t < T) where `label_mask` is set (every one without a mask).
fn label_positions(n: usize, t: usize, label_mask: Option<ArrayView2<i64>>) -> Vec<i64> {
    (0..n)
        .flat_map(|r| (1..t).map(move |c| (r, c)))
        .filter(|&(r, c)| label_mask.is_none_or(|m| m[[r, c]] != 0))
        .map(|(r, c)| (r * t + c) as i64)
        .collect()
}

/// The reference scoring graph, with the reference weights or any checkpoint's.
pub struct ReferenceGraph {
    session: Session,
    file: String,
    /// Whether the graph takes `label_positions` (sliced output projection) and so computes the
    /// output projection only where asked; the dense graph scores every position.
    takes_positions: bool,
    /// Whether its attention ignores the padding mask (rows must be right-padded).
    right_padded_only: bool,
    /// Whether it takes rows i and ⌈N/2⌉ + i packed, their common prefix once (`packing`).
    takes_packed: bool,
    /// Wall seconds spent inside `Session::run` so far.
    run_seconds: f64,
}

impl ReferenceGraph {
    /// Builds the session. `params` replaces the bundle's weights of the stored names it holds
    /// (a full bundle's parameters, or a LoRA policy's merged weights of the adapted modules);
    /// None scores with the reference: `params.safetensors`, with a LoRA bundle's `--lora-init`
    /// adapter merged in (`Bundle::reference_weights`).
    pub fn new(
        bundle: &Bundle,
        params: Option<&ParamStore>,
        config: &SessionConfig,
    ) -> Result<Self, crate::Error> {
        let spec = &bundle.manifest.graphs.reference;
        let mut builder = session_builder(config)?;
        let reference = match params {
            Some(_) => None,
            None => bundle.reference_weights()?,
        };
        let load_err = |message: String| GraphError::Load {
            file: spec.file.clone(),
            message,
        };
        for (graph_name, stored) in &spec.weights {
            let Some(p) = params.or(reference.as_ref()).and_then(|s| s.get(stored)) else {
                continue;
            };
            let value: DynValue = Tensor::from_array((p.shape.clone(), p.data.clone()))
                .map_err(|e| load_err(e.to_string()))?
                .into_dyn();
            builder = builder
                .with_external_initializer(graph_name, Arc::new(value))
                .map_err(|e| load_err(e.to_string()))?;
        }
        let session = builder
            .commit_from_file(bundle.path(&spec.file))
            .map_err(|e| GraphError::Load {
                file: spec.file.clone(),
                message: e.to_string(),
            })?;
        check_contract(
            bundle,
            &spec.file,
            &session,
            spec_ports(&spec.inputs),
            spec_ports(&spec.outputs),
        )?;
        let right_padded_only = bundle.manifest.export.scoring_needs_right_padding();
        if right_padded_only && config.device != crate::runtime::Device::Cpu {
            tracing::warn!(
                "{}: the scoring attention is ONNX Runtime's GroupQueryAttention, whose CUDA kernel \
                 takes float16/bfloat16 only, so this float32 graph may run it on the CPU; export \
                 with `--scoring-attention eager` for CUDA",
                spec.file
            );
        }
        Ok(ReferenceGraph {
            session,
            file: spec.file.clone(),
            takes_positions: spec.inputs.iter().any(|i| i.name == LABEL_POSITIONS),
            right_padded_only,
            takes_packed: spec.inputs.iter().any(|i| i.name == packing::INPUTS[0]),
            run_seconds: 0.0,
        })
    }

    /// Whether the graph runs each pair's two rows as one packed row, their common prefix once
    /// (`edpo_export --scoring-shared-prefix on`): batches of whole pairs cost less than rows.
    pub fn shares_prefix(&self) -> bool {
        self.takes_packed
    }

    /// Scores right-padded sequences; `k` is the top-K size (1 ≤ k ≤ vocabulary).
    /// `label_mask` [N, T] (1 = score label token t, e.g. a batch's `loss_mask`) lets a graph
    /// that takes `label_positions` skip the output projection elsewhere; None scores every
    /// position t ≥ 1 (a graph that takes packed rows: every real one). A graph that shares
    /// each pair's prefix packs rows i and ⌈N/2⌉ + i (the batch layout's chosen and rejected
    /// rows of pair i): any rows are scored right, pairs' rows at the cost of one prefix.
    pub fn score(
        &mut self,
        input_ids: ArrayView2<i64>,
        attention_mask: ArrayView2<i64>,
        label_mask: Option<ArrayView2<i64>>,
        k: i64,
    ) -> Result<ScoreOutputs, GraphError> {
        let file = self.file.clone();
        let run_err = |e: ort::Error| GraphError::Run {
            file: file.clone(),
            message: e.to_string(),
        };
        for (name, other) in [
            ("attention_mask", Some(attention_mask)),
            ("label mask", label_mask),
        ] {
            if let Some(other) = other.filter(|o| o.dim() != input_ids.dim()) {
                return Err(GraphError::Batch {
                    file: self.file.clone(),
                    message: format!(
                        "input_ids {:?} and {name} {:?} differ in shape",
                        input_ids.dim(),
                        other.dim()
                    ),
                });
            }
        }
        if let Some(row) = first_not_right_padded(attention_mask)
            .filter(|_| self.right_padded_only || self.takes_packed)
        {
            return Err(GraphError::Batch {
                file: self.file.clone(),
                message: format!(
                    "row {row} of attention_mask has a 0 before a 1: this scoring graph's \
                     attention is causal without the padding mask, so rows must be padded on \
                     the right (or export the bundle with `--scoring-attention eager`)"
                ),
            });
        }
        let (n, t) = input_ids.dim();
        let mut positions = label_positions(n, t, label_mask);
        if self.takes_packed {
            // A padding position has no packed token (its value is not defined anyway).
            positions.retain(|&p| attention_mask[[p as usize / t, p as usize % t]] != 0);
        }
        if self.takes_positions && positions.is_empty() {
            return Ok(ScoreOutputs {
                token_logps: Array2::zeros((n, t)),
                topk_logps: Array3::zeros((n, t, k.max(0) as usize)),
                topk_ids: Array3::zeros((n, t, k.max(0) as usize)),
            });
        }
        let ids = TensorRef::from_array_view(input_ids).map_err(run_err)?;
        let mask = TensorRef::from_array_view(attention_mask).map_err(run_err)?;
        let k_value = Tensor::from_array(ndarray::arr0(k)).map_err(run_err)?;
        let started = Instant::now();
        let mut inputs = ort::inputs![
            "input_ids" => ids,
            "attention_mask" => mask,
            "k" => k_value,
        ];
        if self.takes_packed {
            let packed = packing::pack_pairs(input_ids, attention_mask, &positions);
            for (name, value) in packed.into_named() {
                let value = Tensor::from_array(value).map_err(run_err)?;
                inputs.push((name.into(), value.into()));
            }
        }
        if self.takes_positions {
            let value = Tensor::from_array(ndarray::Array1::from(positions)).map_err(run_err)?;
            inputs.push((LABEL_POSITIONS.into(), value.into()));
        }
        let outputs = self.session.run(inputs).map_err(run_err)?;
        self.run_seconds += started.elapsed().as_secs_f64();
        let token_logps = output_array::<f32>(&outputs, &file, "token_logps", "float32")?;
        let topk_logps = output_array::<f32>(&outputs, &file, "topk_logps", "float32")?;
        let topk_ids = output_array::<i64>(&outputs, &file, "topk_ids", "int64")?;
        let shape_err = |e: ndarray::ShapeError| GraphError::Run {
            file: file.clone(),
            message: format!("unexpected output rank: {e}"),
        };
        Ok(ScoreOutputs {
            token_logps: token_logps.into_dimensionality().map_err(shape_err)?,
            topk_logps: topk_logps.into_dimensionality().map_err(shape_err)?,
            topk_ids: topk_ids.into_dimensionality().map_err(shape_err)?,
        })
    }

    /// Wall seconds spent running the graph (inside ONNX Runtime) since the session was built.
    pub fn run_seconds(&self) -> f64 {
        self.run_seconds
    }
}

/// One micro-batch for the joint graph: rows 0..B chosen, B..2B rejected (see objective.md).
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub input_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub loss_mask: Array2<i64>,
    pub ref_logps: Array1<f32>,
    pub ref_token_logps: Array2<f32>,
    pub ref_topk_ids: Array3<i64>,
    pub ref_topk_logps: Array3<f32>,
}

/// The scalar settings of the ε-DPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    pub beta: f32,
    pub epsilon: f32,
    pub label_smoothing: f32,
    pub step_tolerance: f32,
}

/// What one run of the joint graph returns.
#[derive(Debug, Clone)]
pub struct TrainOutputs {
    pub loss: f32,
    pub logps: Array1<f32>,
    pub logps_plus: Array1<f32>,
    pub logps_minus: Array1<f32>,
    /// The per-pair step k of each pair (objective.md §3; the graph output `steps`).
    pub pair_steps: Array1<i64>,
}

/// Session settings for a joint graph whose frozen base weights are initializers (a LoRA
/// bundle): no constant folding and no pre-packing, so ONNX Runtime keeps the one copy it
/// reads from `params.safetensors` instead of adding a folded transpose and a pre-packed copy
/// of every weight (SmolLM2 session: 1,618 MB → 166 MB resident after creation).
fn frozen_base_settings(
    builder: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder, String> {
    builder
        .with_prepacking(false)
        .map_err(|e| e.to_string())?
        .with_config_entry(
            "optimization.disable_specified_optimizers",
            "ConstantFolding",
        )
        .map_err(|e| e.to_string())
}

/// The joint forward+backward ε-DPO graph.
pub struct TrainGraph {
    session: Session,
    file: String,
    /// (graph input name, stored parameter name) for every parameter input.
    param_inputs: Vec<(String, String)>,
    /// (output name, stored parameter name) for every gradient output.
    grad_outputs: Vec<(String, String)>,
    /// Whether the graph takes `label_positions` (sliced output projection, computed at the
    /// loss mask's positions only).
    takes_positions: bool,
    /// Whether the graph takes `grad_scale`, the weight of its loss (and so of its gradients)
    /// in the step; older graphs return the unweighted loss and gradients.
    takes_scale: bool,
    /// Whether the graph runs each pair's two rows as one packed row, their common prefix once
    /// (`packing`: it takes `packed_ids` and the rest).
    takes_packed: bool,
    /// The in-graph gradient sum (bundles exported with it): per entry of `grad_outputs`, its
    /// accumulator input.
    accumulators: Option<Vec<String>>,
    /// Whether the graph's attention ignores the padding mask (block-causal), so that rows
    /// must be padded on the right.
    right_padded_only: bool,
    /// Whether the optimised graph came from the cache, was written to it, or neither.
    cache_use: CacheUse,
    /// Wall seconds spent inside `Session::run` so far.
    run_seconds: f64,
}

/// The cache file of a bundle's joint graph, where it is cached: a full bundle's (a LoRA
/// joint graph holds the frozen base weights), on CPU (`graph_cache`).
fn cache_file(bundle: &Bundle, config: &SessionConfig) -> Option<std::path::PathBuf> {
    let dir = config.graph_cache.as_deref()?;
    let file = &bundle.manifest.graphs.train.file;
    let sha256 = &bundle.manifest.files.get(file)?.sha256;
    (bundle.manifest.lora.is_none() && config.device == Device::Cpu)
        .then(|| graph_cache::cache_file(dir, file, sha256))
}

impl TrainGraph {
    pub fn new(bundle: &Bundle, config: &SessionConfig) -> Result<Self, crate::Error> {
        let spec = &bundle.manifest.graphs.train;
        let lora = bundle.manifest.lora.is_some();
        let settings = |builder| {
            if lora {
                frozen_base_settings(builder)
            } else {
                Ok(builder)
            }
        };
        let load_err = |message: String| GraphError::Load {
            file: spec.file.clone(),
            message,
        };
        // The first builder's errors (device, options) keep their own type and exit code.
        let first = settings(session_builder(config)?).map_err(load_err)?;
        let again = || settings(session_builder(config).map_err(|e| e.to_string())?);
        let path = bundle.path(&spec.file);
        let (session, cache_use) =
            graph_cache::commit(first, again, config, &path, cache_file(bundle, config))
                .map_err(load_err)?;
        match (&cache_use, cache_use.describe()) {
            (CacheUse::NotWritten(_), Some(what)) => tracing::warn!("{what}"),
            (_, Some(what)) => tracing::info!("{what}"),
            _ => {}
        }
        let mut inputs = spec_ports(&spec.inputs);
        inputs.extend(spec.param_inputs.keys().map(|n| Port {
            name: n.clone(),
            dtype: "float32".into(),
        }));
        let mut outputs = spec_ports(&spec.outputs);
        outputs.extend(spec.grad_outputs.keys().map(|n| Port {
            name: n.clone(),
            dtype: "float32".into(),
        }));
        let accumulators = accumulator_inputs(bundle, spec)?;
        inputs.extend(accumulators.iter().flatten().map(|n| Port {
            name: n.clone(),
            dtype: "float32".into(),
        }));
        check_contract(bundle, &spec.file, &session, inputs, outputs)?;
        let param_inputs = spec
            .param_inputs
            .iter()
            .map(|(g, s)| (g.clone(), s.clone()))
            .collect();
        let grad_outputs = spec
            .grad_outputs
            .iter()
            .map(|(out, graph_input)| {
                let stored = spec
                    .param_inputs
                    .get(graph_input)
                    .cloned()
                    .unwrap_or_else(|| graph_input.clone());
                (out.clone(), stored)
            })
            .collect();
        Ok(TrainGraph {
            session,
            file: spec.file.clone(),
            param_inputs,
            grad_outputs,
            takes_positions: spec.inputs.iter().any(|i| i.name == LABEL_POSITIONS),
            takes_scale: spec.inputs.iter().any(|i| i.name == GRAD_SCALE),
            takes_packed: spec.inputs.iter().any(|i| i.name == packing::INPUTS[0]),
            right_padded_only: bundle.manifest.export.training_needs_right_padding(),
            accumulators,
            cache_use,
            run_seconds: 0.0,
        })
    }

    /// What this session did with the optimised-graph cache.
    pub fn cache_use(&self) -> &CacheUse {
        &self.cache_use
    }

    /// Checks a micro-batch's shapes against each other (2·B rows, one T, one top-K size).
    fn check_batch(&self, batch: &TrainBatch) -> Result<(), GraphError> {
        let batch_err = |message: String| GraphError::Batch {
            file: self.file.clone(),
            message,
        };
        let (n, t) = batch.input_ids.dim();
        if n == 0 || n % 2 != 0 {
            return Err(batch_err(format!(
                "{n} rows; the joint graph needs 2·B rows (chosen, then rejected)"
            )));
        }
        let topk = batch.ref_topk_ids.dim().2;
        let checks: [(&str, &[usize], Vec<usize>); 6] = [
            ("attention_mask", batch.attention_mask.shape(), vec![n, t]),
            ("loss_mask", batch.loss_mask.shape(), vec![n, t]),
            ("ref_logps", batch.ref_logps.shape(), vec![n]),
            ("ref_token_logps", batch.ref_token_logps.shape(), vec![n, t]),
            ("ref_topk_ids", batch.ref_topk_ids.shape(), vec![n, t, topk]),
            (
                "ref_topk_logps",
                batch.ref_topk_logps.shape(),
                vec![n, t, topk],
            ),
        ];
        for (name, got, want) in checks {
            if got != want.as_slice() {
                return Err(batch_err(format!(
                    "`{name}` has shape {got:?}, expected {want:?}"
                )));
            }
        }
        if let Some(row) =
            first_not_right_padded(batch.attention_mask.view()).filter(|_| self.right_padded_only)
        {
            return Err(batch_err(format!(
                "row {row} of attention_mask has a 0 before a 1: this joint graph's attention is \
                 causal without the padding mask, so rows must be padded on the right (or export \
                 the bundle with `--train-attention-blocks 1`)"
            )));
        }
        Ok(())
    }

    /// The graph's inputs: the batch tensors, the loss settings, the micro-batch's `weight`
    /// (graphs that take `grad_scale`) and every parameter (views, no copies).
    fn inputs<'a>(
        &self,
        params: &'a ParamStore,
        batch: &'a TrainBatch,
        settings: &LossSettings,
        weight: f32,
    ) -> Result<Vec<(Cow<'a, str>, SessionInputValue<'a>)>, GraphError> {
        let run_err = |e: ort::Error| GraphError::Run {
            file: self.file.clone(),
            message: e.to_string(),
        };
        let mut inputs: Vec<(Cow<'a, str>, SessionInputValue<'a>)> =
            Vec::with_capacity(12 + self.param_inputs.len());
        macro_rules! push_view {
            ($name:expr, $arr:expr) => {
                inputs.push((
                    $name.into(),
                    TensorRef::from_array_view($arr.view())
                        .map_err(run_err)?
                        .into(),
                ))
            };
        }
        push_view!("input_ids", batch.input_ids);
        push_view!("attention_mask", batch.attention_mask);
        push_view!("loss_mask", batch.loss_mask);
        push_view!("ref_logps", batch.ref_logps);
        push_view!("ref_token_logps", batch.ref_token_logps);
        push_view!("ref_topk_ids", batch.ref_topk_ids);
        push_view!("ref_topk_logps", batch.ref_topk_logps);
        if self.takes_positions {
            let (n, t) = batch.loss_mask.dim();
            let positions = label_positions(n, t, Some(batch.loss_mask.view()));
            if positions.is_empty() {
                return Err(GraphError::Batch {
                    file: self.file.clone(),
                    message: "no response token in the micro-batch (loss_mask is 0 at every \
                              position t ≥ 1)"
                        .into(),
                });
            }
            if self.takes_packed {
                let rows = (batch.input_ids.view(), batch.attention_mask.view());
                for (name, value) in packing::pack_pairs(rows.0, rows.1, &positions).into_named() {
                    let value = Tensor::from_array(value).map_err(run_err)?;
                    inputs.push((name.into(), value.into()));
                }
            }
            let value = Tensor::from_array(Array1::from(positions)).map_err(run_err)?;
            inputs.push((LABEL_POSITIONS.into(), value.into()));
        }
        for (name, value) in [
            ("beta", settings.beta),
            ("epsilon", settings.epsilon),
            ("label_smoothing", settings.label_smoothing),
            ("step_tolerance", settings.step_tolerance),
        ] {
            let scalar = Tensor::from_array(ndarray::arr0(value)).map_err(run_err)?;
            inputs.push((name.into(), scalar.into()));
        }
        if self.takes_scale {
            let scalar = Tensor::from_array(ndarray::arr0(weight)).map_err(run_err)?;
            inputs.push((GRAD_SCALE.into(), scalar.into()));
        }
        for (graph_name, stored) in &self.param_inputs {
            let p = params.get(stored).ok_or_else(|| GraphError::Batch {
                file: self.file.clone(),
                message: format!("parameter `{stored}` is not in the parameter set"),
            })?;
            let view = TensorRef::from_array_view((p.shape.clone(), p.data.as_slice()))
                .map_err(run_err)?;
            inputs.push((graph_name.clone().into(), view.into()));
        }
        Ok(inputs)
    }

    /// Wall seconds spent running the graph (inside ONNX Runtime) since the session was built.
    pub fn run_seconds(&self) -> f64 {
        self.run_seconds
    }

    /// Runs the joint graph on one micro-batch and adds `weight` · d loss / d θ to `grad_acc`
    /// (one buffer per stored parameter, in `ParamStore` order; tied weights get both
    /// gradients). A graph with the in-graph sum adds into the buffers themselves; an older
    /// one returns the gradient, which is added here.
    pub fn run(
        &mut self,
        params: &ParamStore,
        batch: &TrainBatch,
        settings: &LossSettings,
        grad_acc: &mut [Vec<f32>],
        weight: f32,
    ) -> Result<TrainOutputs, GraphError> {
        self.check_batch(batch)?;
        if grad_acc.len() != params.params.len() {
            return Err(self.batch_error(format!(
                "{} gradient buffers for {} parameters",
                grad_acc.len(),
                params.params.len()
            )));
        }
        let slots = self.grad_slots(params)?;
        let inputs = self.inputs(params, batch, settings, weight)?;
        // A graph that takes the weight applies it to the loss and gradients it returns.
        let (add_weight, loss_weight) = if self.takes_scale {
            (1.0, weight)
        } else {
            (weight, 1.0)
        };
        let mut out = if self.accumulators.is_some() {
            self.run_in_place(inputs, &slots, params, grad_acc)?
        } else {
            self.run_and_add(inputs, &slots, grad_acc, add_weight)?
        };
        out.loss /= loss_weight;
        Ok(out)
    }

    fn batch_error(&self, message: String) -> GraphError {
        GraphError::Batch {
            file: self.file.clone(),
            message,
        }
    }

    fn run_error(&self, message: String) -> GraphError {
        GraphError::Run {
            file: self.file.clone(),
            message,
        }
    }

    /// The `ParamStore` position of each gradient output's parameter.
    fn grad_slots(&self, params: &ParamStore) -> Result<Vec<usize>, GraphError> {
        self.grad_outputs
            .iter()
            .map(|(_, stored)| {
                params.position(stored).ok_or_else(|| {
                    self.batch_error(format!("parameter `{stored}` is not in the parameter set"))
                })
            })
            .collect()
    }

    /// A graph that returns plain gradients: run it, then add `weight` · each to its buffer.
    fn run_and_add(
        &mut self,
        inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
        slots: &[usize],
        grad_acc: &mut [Vec<f32>],
        weight: f32,
    ) -> Result<TrainOutputs, GraphError> {
        let file = self.file.clone();
        let started = Instant::now();
        let outputs = self.session.run(inputs).map_err(|e| GraphError::Run {
            file: file.clone(),
            message: e.to_string(),
        })?;
        self.run_seconds += started.elapsed().as_secs_f64();
        for ((out_name, _), &slot) in self.grad_outputs.iter().zip(slots) {
            let value = outputs
                .get(out_name.as_str())
                .and_then(|v| v.try_extract_tensor::<f32>().ok())
                .ok_or_else(|| GraphError::Output {
                    file: file.clone(),
                    name: out_name.clone(),
                    dtype: "float32",
                })?;
            crate::train::optim::add_scaled(&mut grad_acc[slot], value.1, weight);
        }
        train_outputs(&outputs, &file)
    }

    /// A graph with the in-graph sum: each buffer is both its accumulator input and its
    /// gradient output, so ONNX Runtime writes `buffer + weight · gradient` over it.
    fn run_in_place<'a>(
        &mut self,
        mut inputs: Vec<(Cow<'a, str>, SessionInputValue<'a>)>,
        slots: &[usize],
        params: &ParamStore,
        grad_acc: &'a mut [Vec<f32>],
    ) -> Result<TrainOutputs, GraphError> {
        let mut selector = OutputSelector::default();
        let mut buffers: Vec<Option<&'a mut Vec<f32>>> = grad_acc.iter_mut().map(Some).collect();
        let accumulators = self.accumulators.iter().flatten();
        for (((out_name, _), acc_name), &slot) in
            self.grad_outputs.iter().zip(accumulators).zip(slots)
        {
            let buffer = buffers[slot].take().ok_or_else(|| {
                self.batch_error(format!(
                    "two gradient outputs sum into parameter `{}`",
                    params.params[slot].name
                ))
            })?;
            let shape: Vec<i64> = params.params[slot]
                .shape
                .iter()
                .map(|&d| d as i64)
                .collect();
            // SAFETY: the output value goes to the selector, which is dropped (with the run's
            // outputs) at the end of this function, before the buffer is used again.
            let pair = unsafe { crate::in_place::in_place(buffer, &shape) }
                .map_err(|message| self.run_error(message))?;
            inputs.push((acc_name.clone().into(), pair.input.into()));
            selector = selector.preallocate(out_name.clone(), pair.output);
        }
        let options = RunOptions::new()
            .map_err(|e| self.run_error(e.to_string()))?
            .with_outputs(selector);
        let file = self.file.clone();
        let started = Instant::now();
        let outputs = self
            .session
            .run_with_options(inputs, &options)
            .map_err(|e| GraphError::Run {
                file: file.clone(),
                message: e.to_string(),
            })?;
        self.run_seconds += started.elapsed().as_secs_f64();
        train_outputs(&outputs, &file)
    }
}

/// The accumulator input of each gradient output (in `grad_outputs` order) of a joint graph
/// that sums in place; None for one that returns plain gradients.
fn accumulator_inputs(
    bundle: &Bundle,
    spec: &crate::bundle::TrainGraphSpec,
) -> Result<Option<Vec<String>>, BundleError> {
    let Some(acc) = &spec.grad_accumulation else {
        return Ok(None);
    };
    let contract = |problems: String| BundleError::Contract {
        file: bundle.path(&spec.file),
        problems,
    };
    if !spec.inputs.iter().any(|i| i.name == GRAD_SCALE) {
        return Err(contract(format!(
            "a graph that sums gradients in place must take `{GRAD_SCALE}` (an export of an \
             earlier edpo_export); re-export the bundle"
        )));
    }
    spec.grad_outputs
        .keys()
        .map(|out| {
            acc.accumulators.get(out).cloned().ok_or_else(|| {
                contract(format!(
                    "gradient output `{out}` has no accumulator in `grad_accumulation`"
                ))
            })
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The per-batch outputs of a joint-graph run (everything but the gradients).
fn train_outputs(
    outputs: &ort::session::SessionOutputs<'_>,
    file: &str,
) -> Result<TrainOutputs, GraphError> {
    let vec1 = |name: &str| -> Result<Array1<f32>, GraphError> {
        Ok(Array1::from_iter(
            output_array::<f32>(outputs, file, name, "float32")?
                .iter()
                .copied(),
        ))
    };
    let loss = output_array::<f32>(outputs, file, "loss", "float32")?
        .iter()
        .copied()
        .next()
        .unwrap_or(f32::NAN);
    let steps = Array1::from_iter(
        output_array::<i64>(outputs, file, "steps", "int64")?
            .iter()
            .copied(),
    );
    Ok(TrainOutputs {
        loss,
        logps: vec1("logps")?,
        logps_plus: vec1("logps_plus")?,
        logps_minus: vec1("logps_minus")?,
        pair_steps: steps,
    })
}

#[cfg(test)]
mod tests {
    use super::first_not_right_padded;
    use ndarray::{arr2, Array2};

    #[test]
    fn right_padding_is_ones_then_zeros_in_every_row() {
        assert_eq!(
            first_not_right_padded(arr2(&[[1, 1, 0], [1, 0, 0]]).view()),
            None
        );
        assert_eq!(
            first_not_right_padded(arr2(&[[0, 0, 0], [1, 1, 1]]).view()),
            None
        );
        assert_eq!(
            first_not_right_padded(arr2(&[[1, 1, 1], [0, 1, 1]]).view()),
            Some(1)
        );
        assert_eq!(first_not_right_padded(arr2(&[[1, 0, 1]]).view()), Some(0));
        assert_eq!(
            first_not_right_padded(Array2::<i64>::zeros((0, 4)).view()),
            None
        );
        assert_eq!(
            first_not_right_padded(Array2::<i64>::ones((2, 1)).view()),
            None
        );
    }
}
