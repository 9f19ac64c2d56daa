//! Parquet files and small files on disk: the one atomic writer (a temporary sibling, fsync,
//! rename) used for shards, run tables and per-pair outputs, reading a file's batches and
//! key-value metadata, and typed columns by name.
//!
//! Temporary names are unique to the writing process (`NAME.HOST.PIDNS.PID.tmp`), so that
//! processes writing the same file at once (prep workers with the same index) never write into
//! each other's temporary file; [`remove_stale_tmp`] deletes those left by killed processes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot write `{path}`: {message}; check that the folder is writable and has space")]
    Write { path: PathBuf, message: String },
    #[error("cannot read `{path}`: {message}")]
    Read { path: PathBuf, message: String },
    #[error("`{path}` has no {kind} column `{name}`")]
    Column {
        path: PathBuf,
        name: String,
        kind: &'static str,
    },
}

/// How a Parquet file is laid out: rows per row group (None: the writer's default) and
/// key-value metadata (written in key order).
#[derive(Debug, Clone, Default)]
pub struct ParquetLayout {
    pub row_group_rows: Option<usize>,
    pub metadata: BTreeMap<String, String>,
}

/// Writes `batches` to `path` atomically, zstd-compressed: this process's `.tmp` sibling
/// ([`tmp_path`]) is written and synced, then renamed over `path`, so readers see the old file
/// or the whole new one.
pub fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = Result<RecordBatch, arrow::error::ArrowError>>,
    layout: &ParquetLayout,
) -> Result<(), TableError> {
    let err = |message: String| TableError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = tmp_path(path);
    let mut props = WriterProperties::builder().set_compression(Compression::ZSTD(
        ZstdLevel::try_new(3).map_err(|e| err(e.to_string()))?,
    ));
    if let Some(rows) = layout.row_group_rows {
        props = props.set_max_row_group_row_count(Some(rows));
    }
    if !layout.metadata.is_empty() {
        let kv = layout
            .metadata
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        props = props.set_key_value_metadata(Some(kv));
    }
    let written = (|| {
        let file = File::create(&tmp).map_err(|e| err(e.to_string()))?;
        let mut writer = ArrowWriter::try_new(file, schema, Some(props.build()))
            .map_err(|e| err(e.to_string()))?;
        for batch in batches {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            writer.write(&batch).map_err(|e| err(e.to_string()))?;
        }
        let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
        file.sync_all().map_err(|e| err(e.to_string()))
    })();
    if written.is_err() {
        // A failed write (full disk) leaves no temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    crate::crash::point("table.tmp-written");
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

/// Writes a small file atomically (manifests, JSON).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TableError> {
    let tmp = write_synced_tmp(path, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| TableError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes a small file atomically unless `path` exists: true when this call created it, false
/// when another writer had (checked and created in one step, by a hard link).
pub fn write_file_new(path: &Path, bytes: &[u8]) -> Result<bool, TableError> {
    let tmp = write_synced_tmp(path, bytes)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: check, then rename (not one step, but the best
        // such a file system offers).
        Err(_) if path.exists() => Ok(false),
        Err(_) => write_file(path, bytes).map(|()| true),
    }
}

/// `bytes` in this process's synced temporary sibling of `path`.
fn write_synced_tmp(path: &Path, bytes: &[u8]) -> Result<PathBuf, TableError> {
    let err = |message: String| TableError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = tmp_path(path);
    let written = std::fs::write(&tmp, bytes).and_then(|()| File::open(&tmp)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    Ok(tmp)
}

/// Who this process is among the writers of a folder: host name, pid namespace and pid.
struct Writer {
    host: String,
    pid_ns: String,
    pid: u32,
}

impl Writer {
    fn token(&self) -> String {
        format!("{}.{}.{}", self.host, self.pid_ns, self.pid)
    }

    /// The writer of a temporary file named `NAME.HOST.PIDNS.PID.tmp`.
    fn of_tmp(name: &str) -> Option<Writer> {
        let mut parts = name.strip_suffix(".tmp")?.rsplitn(4, '.');
        let pid = parts.next()?.parse().ok()?;
        let pid_ns = parts.next()?.to_string();
        let host = parts.next()?.to_string();
        parts.next()?;
        Some(Writer { host, pid_ns, pid })
    }
}

fn this_writer() -> &'static Writer {
    static WRITER: OnceLock<Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let raw = if ok {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            String::new()
        };
        // File-name safe, and without dots (the fields of the name are dot-separated).
        let host: String = raw
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(64)
            .collect();
        // Containers on one host may share its name but not its pids: the namespace tells.
        let pid_ns: String = std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|l| {
                l.to_string_lossy()
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect()
            })
            .unwrap_or_default();
        Writer {
            host: if host.is_empty() { "host".into() } else { host },
            pid_ns: if pid_ns.is_empty() {
                "0".into()
            } else {
                pid_ns
            },
            pid: std::process::id(),
        }
    })
}

/// The temporary sibling that this process writes `path` to before renaming it into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", this_writer().token()));
    path.with_file_name(name)
}

/// Whether process `pid` (of this host and pid namespace) still runs.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: kill with signal 0 only checks that the process exists; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Deletes the temporary files in `dir` left by processes that no longer run (same host and
/// pid namespace, pid gone); files of other hosts or of live processes are kept. Returns how
/// many were deleted.
pub fn remove_stale_tmp(dir: &Path) -> usize {
    let me = this_writer();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(w) = Writer::of_tmp(&name) else {
            continue;
        };
        let stale = w.host == me.host && w.pid_ns == me.pid_ns && w.pid != me.pid && !alive(w.pid);
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn read_err(path: &Path) -> impl Fn(String) -> TableError + '_ {
    move |message| TableError::Read {
        path: path.to_path_buf(),
        message,
    }
}

/// A reader builder over a Parquet file (for projections and metadata).
pub fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, TableError> {
    let err = read_err(path);
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))
}

/// Every record batch of a Parquet file, in order.
pub fn read_parquet(path: &Path) -> Result<ParquetRecordBatchReader, TableError> {
    open_parquet(path)?
        .build()
        .map_err(|e| read_err(path)(e.to_string()))
}

/// One batch from a reader, with the file named in its error.
pub fn next_batch(
    path: &Path,
    batch: Result<RecordBatch, arrow::error::ArrowError>,
) -> Result<RecordBatch, TableError> {
    batch.map_err(|e| read_err(path)(e.to_string()))
}

/// The key-value metadata of a Parquet file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, TableError> {
    Ok(open_parquet(path)?
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default())
}

/// Column `name` of `batch` as the concrete Arrow array type `A` (None when absent or of
/// another type).
pub fn typed_column<A: Array + Clone + 'static>(batch: &RecordBatch, name: &str) -> Option<A> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>().cloned())
}

/// Column `name` of a batch read from `path` as `A`, or an error naming the file, the column
/// and the type `kind` it should have.
pub fn column<A: Array + Clone + 'static>(
    path: &Path,
    batch: &RecordBatch,
    name: &str,
    kind: &'static str,
) -> Result<A, TableError> {
    typed_column(batch, name).ok_or_else(|| TableError::Column {
        path: path.to_path_buf(),
        name: name.to_string(),
        kind,
    })
}

/// Named numeric columns of a Parquet file as f64 (nulls as NaN), read by name.
pub fn read_f64_columns(
    path: &Path,
    names: &[&str],
) -> Result<BTreeMap<String, Vec<f64>>, TableError> {
    let err = read_err(path);
    let mut out: BTreeMap<String, Vec<f64>> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    for batch in read_parquet(path)? {
        let batch = next_batch(path, batch)?;
        for name in names {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| TableError::Column {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    kind: "numeric",
                })?;
            let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Float64)
                .map_err(|e| err(e.to_string()))?;
            let col = col
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .ok_or_else(|| err(format!("`{name}` is not numeric")))?;
            let values = out.get_mut(*name).expect("inserted above");
            values.extend((0..col.len()).map(|j| {
                if col.is_null(j) {
                    f64::NAN
                } else {
                    col.value(j)
                }
            }));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_this_process_s_and_read_back() {
        let tmp = tmp_path(Path::new("/x/part-00001.parquet"));
        let name = tmp.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("part-00001.parquet.") && name.ends_with(".tmp"));
        let w = Writer::of_tmp(&name).expect("parses");
        let me = this_writer();
        assert_eq!((w.host.as_str(), w.pid), (me.host.as_str(), me.pid));
        assert!(
            Writer::of_tmp("part-00001.parquet.tmp").is_none(),
            "old-style name"
        );
    }

    #[test]
    fn only_temporary_files_of_dead_local_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let me = this_writer();
        // A child that has exited: its pid is free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let name = |host: &str, pid: u32| format!("m.json.{host}.{}.{pid}.tmp", me.pid_ns);
        let files = [
            name(&me.host, dead),
            name(&me.host, me.pid),
            name("other-host", dead),
            "manifest.tmp".to_string(),
        ];
        for f in &files {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        assert_eq!(remove_stale_tmp(dir.path()), 1);
        assert!(
            !dir.path().join(&files[0]).exists(),
            "dead local writer's file removed"
        );
        for f in &files[1..] {
            assert!(dir.path().join(f).exists(), "{f} kept");
        }
    }

    #[test]
    fn a_new_file_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        assert!(write_file_new(&path, b"first").unwrap());
        assert!(!write_file_new(&path, b"second").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }
}
