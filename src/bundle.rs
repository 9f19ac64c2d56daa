//! The exported model bundle: manifest, file integrity, parameter layout, graph I/O contract.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lora::{self, LoraSpec};
use crate::params::ParamStore;

pub const MANIFEST_FILE: &str = "edpo-model.json";
pub const FORMAT_VERSION: u32 = 1;
const REEXPORT: &str = "re-export it with `python -m edpo_export --model HF_DIR --out BUNDLE`";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("`{0}` is not an edpo model bundle (no `edpo-model.json`); make one with `python -m edpo_export --model HF_DIR --out BUNDLE`")]
    NoManifest(PathBuf),
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid bundle manifest: {message}; {REEXPORT}")]
    BadManifest { path: PathBuf, message: String },
    #[error("bundle format {got} in `{path}` is not supported (edpo reads format {FORMAT_VERSION}); {REEXPORT}")]
    Version { path: PathBuf, got: u32 },
    #[error("bundle file `{path}` is missing; {REEXPORT}")]
    MissingFile { path: PathBuf },
    #[error("bundle file `{path}` is corrupted or was changed: sha256 {got}, the manifest says {want}; {REEXPORT}")]
    HashMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("graph `{file}` does not match the bundle manifest: {problems}; {REEXPORT}")]
    Contract { file: PathBuf, problems: String },
}

/// One graph input or output as the manifest declares it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceGraphSpec {
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// graph initializer name → stored parameter name (tied weights map to one tensor).
    pub weights: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainGraphSpec {
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// graph parameter input name → stored parameter name.
    pub param_inputs: BTreeMap<String, String>,
    /// `grad.<graph input>` output name → graph parameter input name.
    pub grad_outputs: BTreeMap<String, String>,
    /// LoRA bundles: the frozen base weights, initializers of the graph whose data are
    /// references into `params.safetensors` (graph initializer name → stored name).
    #[serde(default)]
    pub base_weights: BTreeMap<String, String>,
    /// How the graph sums gradients into accumulators (bundles exported before it: none, the
    /// gradient outputs are plain gradients).
    #[serde(default)]
    pub grad_accumulation: Option<GradAccumulation>,
}

/// The joint graph's in-place gradient sum: every gradient output is `accumulator + ∂(grad_scale ·
/// loss)/∂θ`, so the trainer binds an output and its accumulator input to one buffer and adds
/// each micro-batch's weighted gradient without a second parameter-sized buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradAccumulation {
    /// Gradient output name → its accumulator input (same shape, float32).
    pub accumulators: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Graphs {
    pub reference: ReferenceGraphSpec,
    pub train: TrainGraphSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecialToken {
    pub token: Option<String>,
    pub id: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub eos: SpecialToken,
    pub bos: SpecialToken,
    pub pad: SpecialToken,
}

impl SpecialTokens {
    /// The id that pads sequences: the pad token, else EOS, else 0 (padding is masked out).
    pub fn pad_id(&self) -> u32 {
        self.pad.id.or(self.eos.id).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// The manifest's `goldens` section (layout: `python/edpo_export/goldens.py`, ARCHITECTURE.md).
/// Format 1 (fp32 outputs, fixed `tolerances`) is only recognised, to ask for a re-export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoldensSpec {
    pub file: String,
    #[serde(default = "goldens_format_1")]
    pub format: u32,
    /// An output passes when ONNX Runtime's error against float64 is at most
    /// `factor` × PyTorch fp32's error + `floor` × max(1, largest |float64 value|).
    #[serde(default)]
    pub factor: f64,
    #[serde(default)]
    pub floor: f64,
    /// Float64 top-K ranks stored beyond K.
    #[serde(default)]
    pub extra_ranks: usize,
    /// Seeded ±1 projections stored per gradient tensor.
    #[serde(default)]
    pub projections: usize,
    /// Parameters whose whole float64 gradient is stored.
    #[serde(default)]
    pub full_grads: Vec<String>,
    /// Output → max |PyTorch fp32 − float64| on the golden batch.
    #[serde(default)]
    pub torch_fp32_error: BTreeMap<String, f64>,
    /// Stored parameter name → PyTorch fp32's relative gradient error.
    #[serde(default)]
    pub torch_fp32_grad_error: BTreeMap<String, f64>,
}

fn goldens_format_1() -> u32 {
    1
}

/// `edpo-model.json`, written by `python -m edpo_export`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub architecture: String,
    pub model_type: String,
    pub vocab_size: usize,
    pub num_parameters: u64,
    pub dtype: String,
    pub topk_default: usize,
    pub special_tokens: SpecialTokens,
    pub has_chat_template: bool,
    pub params_file: String,
    pub params: Vec<ParamSpec>,
    pub tied: BTreeMap<String, String>,
    pub graphs: Graphs,
    pub goldens: Option<GoldensSpec>,
    pub files: BTreeMap<String, FileEntry>,
    #[serde(default)]
    pub tools: BTreeMap<String, String>,
    /// LoRA bundles (`python -m edpo_export --lora`): the adapters the joint graph trains.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// What the reference computes (see [`Bundle::reference_sha256`]); bundles exported before
    /// it was recorded have none, and edpo computes it from their file hashes.
    #[serde(default)]
    pub reference_sha256: Option<String>,
    /// The exporter's settings (only what edpo reads; older bundles have fewer).
    #[serde(default)]
    pub export: ExportSpec,
}

/// The manifest's `export` section, as far as edpo reads it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportSpec {
    /// The scoring graph's attention: `fused` is causal without the padding mask (ONNX
    /// Runtime's GroupQueryAttention), right-padded rows only; `eager` (or absent) is masked.
    #[serde(default)]
    pub scoring_attention: Option<String>,
    /// The joint graph's attention: causal in this many query blocks without the padding mask
    /// (more than 1), right-padded rows only; 1 (or absent) is transformers' masked attention.
    #[serde(default)]
    pub train_attention_blocks: Option<u32>,
}

impl ExportSpec {
    /// Whether the scoring graph takes right-padded rows only (its attention ignores the mask).
    pub fn scoring_needs_right_padding(&self) -> bool {
        self.scoring_attention.as_deref() == Some("fused")
    }

    /// Whether the joint graph takes right-padded rows only (its attention ignores the mask).
    pub fn training_needs_right_padding(&self) -> bool {
        self.train_attention_blocks.is_some_and(|blocks| blocks > 1)
    }
}

/// An opened, integrity-checked bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// sha256 of `edpo-model.json`: identifies the bundle (it lists every file's hash).
    pub bundle_sha256: String,
    /// Identifies what the reference computes: the sha256 of the lines "<file> <sha256>\n",
    /// sorted by file name, of the reference graph, the weights file, `tokenizer.json`,
    /// `tokenizer_config.json` (its chat template) and, when the reference includes a LoRA
    /// adapter (`--lora-init`), the adapter's two files. Shards are keyed on it, so a full and
    /// a LoRA bundle of one base model accept each other's shards.
    pub reference_sha256: String,
}

impl Bundle {
    /// Reads the manifest and checks that every listed file exists and has its sha256 (read
    /// from the file, or remembered from an earlier open while the file is unchanged:
    /// `file_hashes`).
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        Self::open_checked(dir, true)
    }

    /// [`Bundle::open`], reading every file whatever was remembered (`edpo verify`).
    pub fn open_rehashing(dir: &Path) -> Result<Bundle, BundleError> {
        Self::open_checked(dir, false)
    }

    fn open_checked(dir: &Path, trust_remembered: bool) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(BundleError::NoManifest(dir.to_path_buf()));
        }
        let bytes = std::fs::read(&manifest_path).map_err(|source| BundleError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| BundleError::BadManifest {
                path: manifest_path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(BundleError::Version {
                path: manifest_path,
                got: manifest.format_version,
            });
        }
        let mut required: Vec<&str> = vec![
            manifest.graphs.reference.file.as_str(),
            manifest.graphs.train.file.as_str(),
            manifest.params_file.as_str(),
            "tokenizer.json",
        ];
        if let Some(g) = &manifest.goldens {
            required.push(g.file.as_str());
        }
        let adapter_files = manifest.lora.as_ref().map(LoraSpec::adapter_files);
        required.extend(adapter_files.iter().flatten().map(String::as_str));
        for name in required {
            if !manifest.files.contains_key(name) {
                return Err(BundleError::BadManifest {
                    path: manifest_path.clone(),
                    message: format!("`files` has no entry for `{name}`"),
                });
            }
        }
        let mut hashes = crate::file_hashes::FileHashes::load(dir);
        if !trust_remembered {
            hashes.forget();
        }
        for (name, entry) in &manifest.files {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(BundleError::MissingFile { path });
            }
            // A remembered hash is trusted when it is the manifest's; any other is read again.
            let got = match hashes.remembered(name, &path) {
                Some(sha256) if sha256 == entry.sha256 => continue,
                _ => hashes.read(name, &path)?,
            };
            if got != entry.sha256 {
                hashes.save();
                return Err(BundleError::HashMismatch {
                    path,
                    got,
                    want: entry.sha256.clone(),
                });
            }
        }
        hashes.save();
        let reference_sha256 = reference_identity(&manifest);
        if let Some(recorded) = &manifest.reference_sha256 {
            if *recorded != reference_sha256 {
                return Err(BundleError::BadManifest {
                    path: manifest_path,
                    message: format!(
                        "`reference_sha256` {recorded} does not match its files ({reference_sha256})"
                    ),
                });
            }
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            bundle_sha256: sha256_hex(&bytes),
            reference_sha256,
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// (name, shape) of every stored parameter, in manifest order.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.manifest
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    /// The initial parameters θ₀ (`params.safetensors`).
    pub fn load_params(&self) -> Result<ParamStore, crate::Error> {
        self.load_params_from(&self.path(&self.manifest.params_file))
    }

    /// Parameters from any safetensors file with this bundle's names and shapes.
    pub fn load_params_from(&self, path: &Path) -> Result<ParamStore, crate::Error> {
        Ok(ParamStore::load(path, &self.param_layout())?)
    }

    /// The LoRA section of a LoRA bundle.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.manifest.lora.as_ref()
    }

    /// (name, shape) of every tensor training updates: the adapters of a LoRA bundle, else
    /// every stored parameter.
    pub fn trainable_layout(&self) -> Vec<(String, Vec<usize>)> {
        match self.lora() {
            Some(spec) => spec
                .params
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect(),
            None => self.param_layout(),
        }
    }

    /// The tensors training starts from: the initial adapter (`adapter/`) or θ₀.
    pub fn load_trainable(&self) -> Result<ParamStore, crate::Error> {
        match self.lora() {
            Some(spec) => self.load_trainable_from(&self.path(&spec.adapter_files()[1])),
            None => self.load_params(),
        }
    }

    /// Trainable tensors from a safetensors file with this bundle's trainable names and shapes.
    pub fn load_trainable_from(&self, path: &Path) -> Result<ParamStore, crate::Error> {
        Ok(ParamStore::load(path, &self.trainable_layout())?)
    }

    /// The reference's weights where they differ from `params.safetensors`: a `--lora-init`
    /// adapter merged into the adapted modules' weights; None when the reference is the base.
    pub fn reference_weights(&self) -> Result<Option<ParamStore>, crate::Error> {
        match self.lora() {
            Some(spec) if spec.reference_includes_adapter => Ok(Some(lora::merged_weights(
                self,
                spec,
                &self.load_trainable()?,
            )?)),
            _ => Ok(None),
        }
    }

    /// The scoring weights of trained parameters at `path` (`--params` of eval and study-k):
    /// a full bundle's parameters, or a LoRA bundle's adapters (a safetensors file, a run's
    /// `final/` or a checkpoint folder) merged into the adapted modules' weights.
    pub fn policy_weights_from(&self, path: &Path) -> Result<ParamStore, crate::Error> {
        match self.lora() {
            Some(spec) => {
                let adapters = self.load_trainable_from(&lora::adapter_file(path))?;
                lora::merged_weights(self, spec, &adapters)
            }
            None => self.load_params_from(path),
        }
    }
}

/// The reference identity of a manifest (see [`Bundle::reference_sha256`]); the Python twin
/// is `reference_sha256` in `python/edpo_export/common.py`.
fn reference_identity(manifest: &Manifest) -> String {
    let mut names: Vec<String> = vec![
        manifest.graphs.reference.file.clone(),
        manifest.params_file.clone(),
        "tokenizer.json".into(),
        "tokenizer_config.json".into(),
    ];
    if let Some(spec) = manifest
        .lora
        .as_ref()
        .filter(|l| l.reference_includes_adapter)
    {
        names.extend(spec.adapter_files());
    }
    names.sort();
    let text: String = names
        .iter()
        .map(|n| {
            let hash = manifest.files.get(n).map_or("-", |f| f.sha256.as_str());
            format!("{n} {hash}\n")
        })
        .collect();
    sha256_hex(text.as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An input or output a session actually has: (name, element type as manifest spells it).
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: String,
    pub dtype: String,
}

/// Compares a graph's real inputs/outputs with what the manifest declares.
/// Returns a message naming every missing, unexpected or mistyped tensor.
pub fn contract_problems(kind: &str, expected: &[Port], actual: &[Port]) -> Option<String> {
    let mut problems = Vec::new();
    for want in expected {
        match actual.iter().find(|p| p.name == want.name) {
            None => problems.push(format!("missing {kind} `{}`", want.name)),
            Some(got) if got.dtype != want.dtype => problems.push(format!(
                "{kind} `{}` is {} in the graph but {} in the manifest",
                want.name, got.dtype, want.dtype
            )),
            Some(_) => {}
        }
    }
    for got in actual {
        if !expected.iter().any(|w| w.name == got.name) {
            problems.push(format!("unexpected {kind} `{}`", got.name));
        }
    }
    if problems.is_empty() {
        None
    } else {
        Some(problems.join("; "))
    }
}
