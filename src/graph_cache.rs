//! ONNX Runtime's optimised joint graph, kept on disk between runs (`--graph-cache DIR`) so
//! that a training session after the first skips graph optimisation (SmolLM2's joint graph:
//! start-up ~34 s → ~3 s).
//!
//! The first session of a joint graph asks ONNX Runtime to write the graph it optimised
//! (`SessionOptions::optimized_model_filepath`); later sessions load that file with
//! optimisation off. The file is keyed by what decides its contents: the graph file's sha256
//! (from the bundle's manifest), the ONNX Runtime build (`ort::info()`: version and commit)
//! and the CPU (its model and instruction-set flags: the optimised graph may hold kernels
//! chosen for this CPU's vector width). Nothing is written in place: a new file appears
//! under its name only once complete (a hard link from a temporary name). A file that does
//! not load is removed and the graph optimised again. The cache is best effort: a folder
//! that cannot be written only costs the optimisation (`CacheUse::NotWritten`).
//!
//! Opt-in, because memory can differ: ONNX Runtime numbers the nodes of a loaded graph in the
//! file's order and derives the execution order from those numbers, so they run in another
//! order than in the session that optimised them. The outputs are the same bit for bit; the
//! memory arena's peak is not (SmolLM2: +12% at 256 tokens, +15% at 512, none at 2,048;
//! README "Start-up").
//!
//! Only the CPU joint graph of a full bundle is cached: a LoRA joint graph holds the frozen
//! base weights as initializers (the file would hold them too), the scoring graph gets its
//! weights at session creation (about a second of optimisation there), and the CUDA
//! provider's optimised graph was not checked.

use std::path::{Path, PathBuf};

use ort::logging::LogLevel;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use serde::Serialize;

use crate::runtime::{session_builder, SessionConfig};

/// Bumped when what a cached file means changes (edpo's session settings that shape it).
const CACHE_FORMAT: u32 = 2;

/// ONNX Runtime's session settings that write the optimised graph's large initializers to a
/// file beside it: loaded from there, they are mapped into memory rather than copied out of
/// the graph (SmolLM2's joint graph holds one of 113 MB, the zeros its embedding gradient is
/// scattered into; inline, loading it cost 2.1 s and 230 MB against 1.0 s and 119 MB).
const EXTERNAL_FILE: &str = "session.optimized_model_external_initializers_file_name";
const EXTERNAL_MIN_BYTES: &str = "session.optimized_model_external_initializers_min_size_in_bytes";

/// What a session did with the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "use", content = "detail")]
pub enum CacheUse {
    /// No cache (no `--graph-cache`, a LoRA bundle, or a CUDA device).
    Off,
    /// The optimised graph was loaded from this file.
    Loaded(PathBuf),
    /// The graph was optimised and written to this file.
    Written(PathBuf),
    /// The graph was optimised but could not be kept (the reason).
    NotWritten(String),
}

/// The lines of `/proc/cpuinfo`'s first processor that name the CPU and its instruction sets
/// (the architecture's name where there is no such file).
fn cpu_identity() -> String {
    let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
        return std::env::consts::ARCH.to_string();
    };
    let wanted = [
        "vendor_id",
        "cpu family",
        "model",
        "model name",
        "flags",
        "Features",
        "CPU implementer",
        "CPU part",
    ];
    text.lines()
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| {
            line.split(':')
                .next()
                .is_some_and(|key| wanted.contains(&key.trim()))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cache file of a graph: `<graph stem>-<key>.onnx`, the key a hash of everything that
/// decides the optimised graph.
pub fn cache_file(dir: &Path, graph_file: &str, graph_sha256: &str) -> PathBuf {
    let identity = format!(
        "edpo graph cache {CACHE_FORMAT}\n{graph_sha256}\n{}\n{}\n",
        ort::info(),
        cpu_identity()
    );
    let key = crate::bundle::sha256_hex(identity.as_bytes());
    let stem = graph_file.trim_end_matches(".onnx");
    dir.join(format!("{stem}-{}.onnx", &key[..20]))
}

/// A session of `graph` through the cache file `cached` (None: no cache). `builder` makes
/// edpo's builder for this graph (`runtime::session_builder` and the graph's own settings),
/// used as it is when the graph is optimised here.
pub fn commit(
    builder: impl Fn() -> Result<SessionBuilder, String>,
    config: &SessionConfig,
    graph: &Path,
    cached: Option<PathBuf>,
) -> Result<(Session, CacheUse), String> {
    let Some(file) = cached else {
        return commit_plain(builder()?, graph).map(|s| (s, CacheUse::Off));
    };
    if file.exists() {
        match load_optimised(config, &file) {
            Ok(session) => return Ok((session, CacheUse::Loaded(file))),
            Err(message) => {
                tracing::warn!(file = %file.display(), %message, "the cached optimised graph did not load; optimising the graph again");
                remove_entry(&file);
            }
        }
    }
    match optimise_and_write(builder()?, graph, &file) {
        Ok(done) => Ok(done),
        // Writing the optimised graph can itself fail (a protobuf over 2 GB): once more
        // without it, so that the cache never stops a run.
        Err(message) => commit_plain(builder()?, graph).map(|s| {
            (
                s,
                CacheUse::NotWritten(format!("ONNX Runtime could not write it: {message}")),
            )
        }),
    }
}

fn commit_plain(mut builder: SessionBuilder, graph: &Path) -> Result<Session, String> {
    builder.commit_from_file(graph).map_err(|e| e.to_string())
}

/// A session of an already optimised graph: edpo's settings with optimisation off.
fn load_optimised(config: &SessionConfig, file: &Path) -> Result<Session, String> {
    let builder = session_builder(config)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(|e| e.to_string())?;
    commit_plain(builder, file)
}

/// Optimises `graph` in a session that writes the optimised graph into the cache folder:
/// the graph under a temporary name, its initializers of 64 kB or more beside it in a data
/// file of this process's own (`<file>.<pid>.data`, which the graph names), and the graph
/// linked to `file` once the session exists. Where another process linked it first, its
/// files are kept and this one's removed.
fn optimise_and_write(
    builder: SessionBuilder,
    graph: &Path,
    file: &Path,
) -> Result<(Session, CacheUse), String> {
    let dir = file.parent().unwrap_or(Path::new("."));
    if let Err(e) = std::fs::create_dir_all(dir) {
        let reason = format!("cannot create `{}`: {e}", dir.display());
        return commit_plain(builder, graph).map(|s| (s, CacheUse::NotWritten(reason)));
    }
    let pid = std::process::id();
    let temporary = file.with_extension(format!("onnx.tmp{pid}"));
    let data = file.with_extension(format!("onnx.{pid}.data"));
    let data_name = data.file_name().unwrap_or_default().to_string_lossy();
    let remove_both = || {
        let _ = std::fs::remove_file(&temporary);
        let _ = std::fs::remove_file(&data);
    };
    // ONNX Runtime warns that the file may hold optimisations for this CPU only: the key
    // names the CPU, so the warning is expected here and kept off the user's terminal.
    let text = |e: ort::Error<SessionBuilder>| e.to_string();
    let builder = builder
        .with_optimized_model_path(&temporary)
        .map_err(text)?
        .with_config_entry(EXTERNAL_FILE, data_name.as_ref())
        .map_err(text)?
        .with_config_entry(EXTERNAL_MIN_BYTES, "65536")
        .map_err(text)?
        .with_log_level(LogLevel::Error)
        .map_err(text)?;
    let session = commit_plain(builder, graph).inspect_err(|_| remove_both())?;
    let kept = match std::fs::hard_link(&temporary, file) {
        Ok(()) => {
            let _ = std::fs::remove_file(&temporary);
            CacheUse::Written(file.to_path_buf())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            remove_both();
            CacheUse::Written(file.to_path_buf())
        }
        Err(e) => {
            remove_both();
            CacheUse::NotWritten(format!("cannot write `{}`: {e}", file.display()))
        }
    };
    Ok((session, kept))
}

/// Removes a cache file that did not load, and the data files of its key.
fn remove_entry(file: &Path) {
    let _ = std::fs::remove_file(file);
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return;
    };
    let prefix = format!("{}.", name.to_string_lossy());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let other = entry.file_name().to_string_lossy().into_owned();
        if other.starts_with(&prefix) && other.ends_with(".data") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
