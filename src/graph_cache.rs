//! ONNX Runtime's optimised joint graph, kept on disk between runs (`--graph-cache DIR`) so
//! that a training session after the first skips graph optimisation (SmolLM2's joint graph:
//! start-up ~34 s → ~3 s).
//!
//! The first session of a joint graph asks ONNX Runtime to write the graph it optimised
//! (`SessionOptions::optimized_model_filepath`); later sessions load that file with
//! optimisation off. The file is keyed by what decides its contents: the graph file's sha256
//! (from the bundle's manifest), the ONNX Runtime library (`ort::info()`: its build, branch
//! and commit; and the library file's path, size and modification time) and the CPU (its
//! model and instruction-set flags: the optimised graph may hold kernels chosen for this
//! CPU's vector width, which ONNX Runtime warns of when it writes the file). Nothing is
//! written in place: an entry appears under its name only once complete (a hard link from a
//! temporary name unique to the process), and never over another. A file that does not load
//! is removed and the graph optimised again. The cache is best effort: a folder that cannot
//! be written is found before the optimisation and costs nothing more; a write ONNX Runtime
//! refuses (a full disk) costs a second optimisation. Files of killed runs (`*.tmp*`) and
//! the data files of removed entries stay until the folder is deleted.
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

impl CacheUse {
    /// What the session did, in words (None without a cache): the train summary's line and
    /// the log's.
    pub fn describe(&self) -> Option<String> {
        match self {
            CacheUse::Off => None,
            CacheUse::Loaded(file) => Some(format!(
                "optimised joint graph loaded from {}",
                file.display()
            )),
            CacheUse::Written(file) => Some(format!(
                "optimised joint graph written to {}",
                file.display()
            )),
            CacheUse::NotWritten(reason) => {
                Some(format!("optimised joint graph not cached: {reason}"))
            }
        }
    }
}

/// The loaded ONNX Runtime library file: its path, size and modification time (a build string
/// without a commit does not tell two versions apart).
fn library_identity() -> String {
    let Ok(path) = crate::runtime::init() else {
        return String::new();
    };
    let meta = std::fs::metadata(&path).ok();
    let modified = meta.as_ref().and_then(|m| m.modified().ok());
    format!(
        "{} {:?} {modified:?}",
        path.display(),
        meta.map(|m| m.len())
    )
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
        "edpo graph cache {CACHE_FORMAT}\n{graph_sha256}\n{}\n{}\n{}\n",
        ort::info(),
        library_identity(),
        cpu_identity()
    );
    let key = crate::bundle::sha256_hex(identity.as_bytes());
    let stem = graph_file.trim_end_matches(".onnx");
    dir.join(format!("{stem}-{}.onnx", &key[..20]))
}

/// A session of `graph` through the cache file `cached` (None: no cache). `first` is edpo's
/// builder for this graph (`runtime::session_builder` and the graph's own settings); `again`
/// makes another, for a second try when ONNX Runtime could not write the optimised graph.
pub fn commit(
    first: SessionBuilder,
    again: impl Fn() -> Result<SessionBuilder, String>,
    config: &SessionConfig,
    graph: &Path,
    cached: Option<PathBuf>,
) -> Result<(Session, CacheUse), String> {
    let Some(file) = cached else {
        return commit_plain(first, graph).map(|s| (s, CacheUse::Off));
    };
    if file.exists() {
        let loading = session_builder(config)
            .map_err(|e| e.to_string())?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| e.to_string())?;
        match commit_plain(loading, &file) {
            Ok(session) => return Ok((session, CacheUse::Loaded(file))),
            Err(message) => {
                tracing::warn!(file = %file.display(), %message, "the cached optimised graph did not load; optimising the graph again (--graph-cache)");
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    let names = Scratch::beside(&file);
    if let Err(reason) = names.claim() {
        return commit_plain(first, graph).map(|s| (s, CacheUse::NotWritten(reason)));
    }
    match optimise_and_write(first, graph, &names) {
        Ok(session) => Ok((session, names.link_to(&file))),
        // Writing the optimised graph can itself fail (a full disk, a protobuf over 2 GB):
        // once more without it, so that the cache never stops a run.
        Err(message) => commit_plain(again()?, graph).map(|s| {
            let reason = format!("ONNX Runtime could not write it: {message}");
            (s, CacheUse::NotWritten(reason))
        }),
    }
}

fn commit_plain(mut builder: SessionBuilder, graph: &Path) -> Result<Session, String> {
    builder.commit_from_file(graph).map_err(|e| e.to_string())
}

/// The files one process writes before a cache entry exists: the graph under a temporary
/// name and its data file, both named by the process id and the time (unique among the
/// processes that share the folder, containers whose processes share an id included).
struct Scratch {
    graph: PathBuf,
    data: PathBuf,
}

impl Scratch {
    fn beside(file: &Path) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let unique = format!("{}-{nanos}", std::process::id());
        Scratch {
            graph: file.with_extension(format!("onnx.tmp{unique}")),
            data: file.with_extension(format!("onnx.{unique}.data")),
        }
    }

    /// Creates the folder and the temporary graph file, so that a folder that cannot be
    /// written is found before the graph is optimised, not after.
    fn claim(&self) -> Result<(), String> {
        let dir = self.graph.parent().unwrap_or(Path::new("."));
        let cannot = |e: std::io::Error| {
            format!(
                "cannot write in `{}`: {e}; give --graph-cache a writable folder",
                dir.display()
            )
        };
        std::fs::create_dir_all(dir).map_err(cannot)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.graph)
            .map(drop)
            .map_err(cannot)
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.graph);
        let _ = std::fs::remove_file(&self.data);
    }

    /// Links the written graph to `file` (never over an existing one) and drops the
    /// temporary name; where another process linked its own first, this one's files go.
    fn link_to(&self, file: &Path) -> CacheUse {
        match std::fs::hard_link(&self.graph, file) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.graph);
                CacheUse::Written(file.to_path_buf())
            }
            Err(e) => {
                self.remove();
                CacheUse::NotWritten(match e.kind() {
                    std::io::ErrorKind::AlreadyExists => "another process wrote it first".into(),
                    _ => format!("cannot write `{}`: {e}", file.display()),
                })
            }
        }
    }
}

/// Optimises `graph` in a session that writes the optimised graph to `names.graph`, its
/// initializers of 64 kB or more to `names.data` (which the graph names). ONNX Runtime warns
/// that such a file may hold optimisations for this CPU only: the key names the CPU.
fn optimise_and_write(
    builder: SessionBuilder,
    graph: &Path,
    names: &Scratch,
) -> Result<Session, String> {
    let data_name = names.data.file_name().unwrap_or_default().to_string_lossy();
    let text = |e: ort::Error<SessionBuilder>| e.to_string();
    let builder = builder
        .with_optimized_model_path(&names.graph)
        .map_err(text)?
        .with_config_entry(EXTERNAL_FILE, data_name.as_ref())
        .map_err(text)?
        .with_config_entry(EXTERNAL_MIN_BYTES, "65536")
        .map_err(text)?;
    commit_plain(builder, graph).inspect_err(|_| names.remove())
}
