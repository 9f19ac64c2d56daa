//! Finding and loading libonnxruntime, and building ONNX Runtime sessions (CPU or CUDA).
//!
//! The library is searched in the order of `architecture.md`: `ORT_DYLIB_PATH`; the
//! `onnxruntime` (or `onnxruntime-gpu`) package of the project's virtual environment
//! (`EDPO_VENV`, `$HOME/.cache/edpo/venv`, `./.venv`) or of `python3`; standard library paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

/// The onnxruntime version the project pins (python/requirements.txt).
pub const ORT_PINNED_VERSION: &str = "1.31.1";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime (libonnxruntime.so) was not found; searched: {searched}.\n\
         Fix: run `make setup` (creates the project venv with the pinned wheel), or \
         `python3 -m pip install onnxruntime=={ORT_PINNED_VERSION}`, or set \
         `ORT_DYLIB_PATH=/path/to/libonnxruntime.so`"
    )]
    NotFound { searched: String },
    #[error("`ORT_DYLIB_PATH` points to `{0}`, which does not exist")]
    DylibPathMissing(PathBuf),
    #[error("loading ONNX Runtime from `{path}` failed: {message}")]
    Load { path: PathBuf, message: String },
    #[error("`--device {0}` is not a device; use `cpu`, `cuda` or `cuda:N`")]
    BadDevice(String),
    #[error(
        "the CUDA execution provider could not be registered for `--device {device}`: {message}.\n\
         Fix: install the GPU build (`pip install onnxruntime-gpu=={ORT_PINNED_VERSION}`) and \
         point `ORT_DYLIB_PATH` at its libonnxruntime.so, or use `--device cpu`"
    )]
    Cuda { device: String, message: String },
    #[error("ONNX Runtime session options: {0}")]
    Options(String),
}

/// Where a graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| RuntimeError::BadDevice(s.to_string())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Session settings shared by every graph edpo runs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub device: Device,
    /// Intra-op threads; 0 lets ONNX Runtime choose (one per core).
    pub threads: usize,
    /// Where ONNX Runtime's optimised joint graphs are kept between runs (`graph_cache`);
    /// None: optimised at every session.
    pub graph_cache: Option<PathBuf>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            device: Device::Cpu,
            threads: 0,
            graph_cache: None,
        }
    }
}

static LOADED: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// The first libonnxruntime found in the search order of the module doc (after
/// `ORT_DYLIB_PATH`): the virtual environments, then python3's onnxruntime package (a
/// subprocess, ~0.5 s, asked only when no environment has the library), then standard paths.
fn first_candidate() -> Option<PathBuf> {
    let mut venvs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("EDPO_VENV") {
        venvs.push(PathBuf::from(v));
    }
    if let Some(home) = std::env::var_os("HOME") {
        venvs.push(PathBuf::from(home).join(".cache/edpo/venv"));
    }
    venvs.push(PathBuf::from(".venv"));
    let in_venvs = venvs.into_iter().flat_map(|venv| {
        ["lib", "lib64"].into_iter().flat_map(move |lib| {
            std::fs::read_dir(venv.join(lib))
                .into_iter()
                .flat_map(|entries| entries.flatten())
                .flat_map(|entry| {
                    libraries_in(&entry.path().join("site-packages/onnxruntime/capi"))
                })
        })
    });
    let from_python = std::iter::once_with(python_onnxruntime_dir)
        .flatten()
        .flat_map(|dir| libraries_in(&dir.join("capi")));
    let system = [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ]
    .into_iter()
    .flat_map(|dir| libraries_in(Path::new(dir)));
    in_venvs.chain(from_python).chain(system).next()
}

fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn python_onnxruntime_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(text.trim()))
}

/// Finds libonnxruntime without loading it.
pub fn find_onnxruntime() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(RuntimeError::DylibPathMissing(p))
        };
    }
    first_candidate().ok_or_else(|| RuntimeError::NotFound {
        searched: "ORT_DYLIB_PATH (unset), $EDPO_VENV, $HOME/.cache/edpo/venv, ./.venv, \
                       python3's onnxruntime package, /usr/local/lib, /usr/lib"
            .to_string(),
    })
}

/// Loads ONNX Runtime once per process; later calls return the same library path.
pub fn init() -> Result<PathBuf, RuntimeError> {
    let loaded = LOADED.get_or_init(|| {
        let path = find_onnxruntime().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| format!("{e}"))?;
        let env = builder
            .with_name("edpo")
            .build()
            .map_err(|e| format!("{e}"))?;
        tracing::debug!(path = %path.display(), "loaded ONNX Runtime");
        Ok((path, env))
    });
    match loaded {
        Ok((p, _)) => Ok(p.clone()),
        Err(message) => match find_onnxruntime() {
            Err(e) => Err(e),
            Ok(path) => Err(RuntimeError::Load {
                path,
                message: message.clone(),
            }),
        },
    }
}

/// Environment variable: a path prefix that turns ONNX Runtime's profiler on for every session.
pub const PROFILE_ENV: &str = "EDPO_ORT_PROFILE";

/// A session builder with edpo's settings applied: threads, optimisation, execution provider.
pub fn session_builder(config: &SessionConfig) -> Result<SessionBuilder, RuntimeError> {
    init()?;
    let env = match LOADED.get() {
        Some(Ok((_, env))) => env,
        _ => {
            return Err(RuntimeError::Options(
                "ONNX Runtime is not initialised".into(),
            ))
        }
    };
    let opt = |e: ort::Error<SessionBuilder>| RuntimeError::Options(e.to_string());
    let mut builder = ort::session::Session::builder(env)
        .map_err(|e| RuntimeError::Options(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(opt)?;
    if config.threads > 0 {
        builder = builder
            .with_intra_threads(config.threads)
            .map_err(opt)?
            .with_inter_threads(1)
            .map_err(opt)?;
    }
    if let Some(prefix) = std::env::var_os(PROFILE_ENV).filter(|v| !v.is_empty()) {
        // ONNX Runtime's profiler: one Chrome-trace JSON per session, PREFIX_<time>.json,
        // written when the session ends (python -m edpo_bench.profile sums it by operator).
        builder = builder.with_profiling(prefix).map_err(opt)?;
    }
    if config.device == Device::Cpu {
        // Batch shapes change from run to run; memory patterns would keep a plan (and its
        // buffers) per shape. Measured on the bench model: 4.2 → 4.0 GB peak, same speed.
        builder = builder.with_memory_pattern(false).map_err(opt)?;
    }
    if let Device::Cuda(id) = config.device {
        builder =
            crate::runtime_cuda::register(builder, id).map_err(|message| RuntimeError::Cuda {
                device: config.device.to_string(),
                message,
            })?;
    }
    Ok(builder)
}
