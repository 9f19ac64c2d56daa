//! LoRA bundles: the manifest's `lora` section, merging adapters into base weights
//! (W + scaling · B·A, as PEFT's `merge`), and a run's `final/` as a PEFT adapter folder (plus,
//! with `--merge`, the merged Hugging Face model).
//!
//! A LoRA bundle's joint graph takes the adapter matrices as its only parameter inputs; its
//! base weights are initializers read from `params.safetensors` by ONNX Runtime, so edpo holds
//! the adapters, their gradients and AdamW moments only. Adapters are named with PEFT's saved
//! keys (`base_model.model.<module>.lora_A.weight`) in the bundle's `adapter/` folder, in
//! checkpoints and in `final/adapter_model.safetensors`. Scoring a LoRA policy (eval, study-k,
//! a `--lora-init` reference) merges its adapters into the base weights of the adapted modules
//! and overrides those initializers of the reference graph by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, ParamSpec};
use crate::params::{Param, ParamStore};

/// The PEFT adapter files of a LoRA bundle's `adapter/` folder and of a run's `final/`.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The merged Hugging Face model of `edpo train --merge`, inside `final/`.
pub const MERGED_DIR: &str = "merged";

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("`{path}`: {message}; export the bundle again with `python -m edpo_export --lora`")]
    Spec { path: PathBuf, message: String },
    #[error("`--merge`: the bundle `{0}` trains every parameter (it is not a LoRA bundle), so its `final/` is already a full model; leave `--merge` out")]
    MergeWithoutLora(PathBuf),
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

/// One adapted module: its base weight and the two adapter matrices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraModule {
    /// The module's path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// The stored name of the base weight it adapts (params.safetensors).
    pub weight: String,
    /// PEFT's saved key of A [r, in] and of B [out, r].
    #[serde(rename = "lora_A")]
    pub lora_a: String,
    #[serde(rename = "lora_B")]
    pub lora_b: String,
    /// The base weight is stored [in, out] (GPT-2's Conv1D): the update is (B·A)ᵀ.
    pub fan_in_fan_out: bool,
    /// alpha / r (alpha / √r with rsLoRA).
    pub scaling: f64,
}

/// The manifest's `lora` section (written by `python/edpo_export/lora.py`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub dropout: f64,
    /// The target modules as PEFT names them.
    pub target_modules: Vec<String>,
    /// The initial adapter, a PEFT folder inside the bundle.
    pub adapter_dir: String,
    /// The `--lora-init` adapter the bundle started from (informational).
    pub init_from: Option<String>,
    /// The reference is base + the initial adapter (a `--lora-init` adapter with B ≠ 0);
    /// otherwise the reference is the base model.
    pub reference_includes_adapter: bool,
    pub num_parameters: u64,
    /// The trainable tensors (the adapters), in training order.
    pub params: Vec<ParamSpec>,
    pub modules: Vec<LoraModule>,
}

impl LoraSpec {
    /// The bundle files of the initial adapter (relative to the bundle).
    pub fn adapter_files(&self) -> [String; 2] {
        [
            format!("{}/{ADAPTER_CONFIG}", self.adapter_dir),
            format!("{}/{ADAPTER_WEIGHTS}", self.adapter_dir),
        ]
    }
}

/// W + scaling · B·A for one module, accumulated in f64 and rounded once. W is [out, in]
/// ([in, out] with `fan_in_fan_out`), A [r, in], B [out, r].
pub fn merge_weight(w: &Param, a: &Param, b: &Param, m: &LoraModule) -> Result<Param, String> {
    let (r, fan_in) = match a.shape.as_slice() {
        [r, i] => (*r, *i),
        other => return Err(format!("`{}` has shape {other:?}, not [r, in]", a.name)),
    };
    let out = match b.shape.as_slice() {
        [o, rb] if *rb == r => *o,
        other => return Err(format!("`{}` has shape {other:?}, not [out, {r}]", b.name)),
    };
    let want = if m.fan_in_fan_out {
        [fan_in, out]
    } else {
        [out, fan_in]
    };
    if w.shape != want {
        return Err(format!(
            "base weight `{}` has shape {:?}, the adapter needs {want:?}",
            w.name, w.shape
        ));
    }
    // delta[o, i] = Σ_j B[o, j] A[j, i], one output row at a time.
    let rows: Vec<Vec<f64>> = (0..out)
        .into_par_iter()
        .map(|o| {
            let mut acc = vec![0.0f64; fan_in];
            for j in 0..r {
                let coef = f64::from(b.data[o * r + j]) * m.scaling;
                for (x, &aji) in acc.iter_mut().zip(&a.data[j * fan_in..(j + 1) * fan_in]) {
                    *x += coef * f64::from(aji);
                }
            }
            acc
        })
        .collect();
    let mut data = w.data.clone();
    for (o, row) in rows.iter().enumerate() {
        for (i, d) in row.iter().enumerate() {
            let at = if m.fan_in_fan_out {
                i * out + o
            } else {
                o * fan_in + i
            };
            data[at] = (f64::from(data[at]) + d) as f32;
        }
    }
    Ok(Param {
        name: w.name.clone(),
        shape: w.shape.clone(),
        data,
    })
}

/// The adapted modules' base weights with `adapters` merged in (stored names): what the
/// scoring graph's initializers of those modules are overridden with.
pub fn merged_weights(
    bundle: &Bundle,
    spec: &LoraSpec,
    adapters: &ParamStore,
) -> Result<ParamStore, crate::Error> {
    let names: Vec<String> = spec.modules.iter().map(|m| m.weight.clone()).collect();
    let base = ParamStore::load_named(&bundle.path(&bundle.manifest.params_file), &names)?;
    merge_into(bundle, spec, base, adapters)
}

/// `base` (holding at least the adapted modules' weights) with `adapters` merged in.
fn merge_into(
    bundle: &Bundle,
    spec: &LoraSpec,
    mut base: ParamStore,
    adapters: &ParamStore,
) -> Result<ParamStore, crate::Error> {
    let manifest = bundle.path(crate::bundle::MANIFEST_FILE);
    let spec_err = |message: String| LoraError::Spec {
        path: manifest.clone(),
        message,
    };
    for m in &spec.modules {
        let find = |store: &ParamStore, name: &str| {
            store
                .position(name)
                .ok_or_else(|| spec_err(format!("`lora.modules` names `{name}`, which is missing")))
        };
        let (wi, ai, bi) = (
            find(&base, &m.weight)?,
            find(adapters, &m.lora_a)?,
            find(adapters, &m.lora_b)?,
        );
        let merged = merge_weight(
            &base.params[wi],
            &adapters.params[ai],
            &adapters.params[bi],
            m,
        )
        .map_err(spec_err)?;
        base.params[wi] = merged;
    }
    Ok(base)
}

/// The adapter file of `path`: the file itself, or in a folder its `adapter_model.safetensors`
/// (a run's `final/`) or `model.safetensors` (a checkpoint).
pub fn adapter_file(path: &Path) -> PathBuf {
    if !path.is_dir() {
        return path.to_path_buf();
    }
    let adapter = path.join(ADAPTER_WEIGHTS);
    if adapter.is_file() {
        adapter
    } else {
        path.join("model.safetensors")
    }
}

fn write_err(path: &Path, e: impl ToString) -> LoraError {
    LoraError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn pt_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Copies `files` that exist in the bundle into `dir`.
fn copy_bundle_files(bundle: &Bundle, files: &[&str], dir: &Path) -> Result<(), LoraError> {
    for f in files {
        let src = bundle.path(f);
        if src.exists() {
            let dst = dir.join(Path::new(f).file_name().unwrap_or_default());
            std::fs::copy(&src, &dst).map_err(|e| write_err(&dst, e))?;
        }
    }
    Ok(())
}

/// Writes `dir` as a PEFT adapter folder: the bundle's adapter_config.json, the adapters as
/// adapter_model.safetensors (PEFT's key names) and the tokenizer files;
/// `PeftModel.from_pretrained(base, dir)` loads it.
pub fn write_adapter_folder(
    dir: &Path,
    bundle: &Bundle,
    spec: &LoraSpec,
    adapters: &ParamStore,
) -> Result<(), crate::Error> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let [config, _] = spec.adapter_files();
    copy_bundle_files(
        bundle,
        &[&config, "tokenizer.json", "tokenizer_config.json"],
        dir,
    )?;
    adapters.save(&dir.join(ADAPTER_WEIGHTS), pt_metadata())?;
    Ok(())
}

/// Writes `dir` as a Hugging Face model folder of base + adapters merged (model.safetensors,
/// config.json, tokenizer files): `AutoModelForCausalLM.from_pretrained(dir)` loads it.
pub fn write_merged_model(
    dir: &Path,
    bundle: &Bundle,
    spec: &LoraSpec,
    adapters: &ParamStore,
) -> Result<(), crate::Error> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let merged = merge_into(bundle, spec, bundle.load_params()?, adapters)?;
    merged.save(&dir.join("model.safetensors"), pt_metadata())?;
    copy_bundle_files(
        bundle,
        &["config.json", "tokenizer.json", "tokenizer_config.json"],
        dir,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, shape: &[usize], data: Vec<f32>) -> Param {
        Param {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    fn module(fan_in_fan_out: bool) -> LoraModule {
        LoraModule {
            module: "m".into(),
            weight: "m.weight".into(),
            lora_a: "a".into(),
            lora_b: "b".into(),
            fan_in_fan_out,
            scaling: 0.5,
        }
    }

    #[test]
    fn merge_adds_scaling_times_b_a() {
        // out 2, in 3, r 1: B·A = [[1·1, 1·2, 1·3], [2·1, 2·2, 2·3]].
        let w = param("m.weight", &[2, 3], vec![0.0; 6]);
        let a = param("a", &[1, 3], vec![1.0, 2.0, 3.0]);
        let b = param("b", &[2, 1], vec![1.0, 2.0]);
        let merged = merge_weight(&w, &a, &b, &module(false)).unwrap();
        assert_eq!(merged.data, vec![0.5, 1.0, 1.5, 1.0, 2.0, 3.0]);
        // GPT-2's Conv1D stores W as [in, out]: the update is transposed.
        let w = param("m.weight", &[3, 2], vec![1.0; 6]);
        let merged = merge_weight(&w, &a, &b, &module(true)).unwrap();
        assert_eq!(merged.data, vec![1.5, 2.0, 2.0, 3.0, 2.5, 4.0]);
    }

    #[test]
    fn merge_refuses_mismatched_shapes() {
        let w = param("m.weight", &[2, 4], vec![0.0; 8]);
        let a = param("a", &[1, 3], vec![1.0, 2.0, 3.0]);
        let b = param("b", &[2, 1], vec![1.0, 2.0]);
        let err = merge_weight(&w, &a, &b, &module(false)).unwrap_err();
        assert!(err.contains("m.weight") && err.contains("[2, 3]"), "{err}");
    }
}
