//! Bundle files already hashed and found intact, remembered in the bundle folder by what the
//! file system says about them, so that opening a bundle again does not read every byte again
//! (SmolLM2-135M's 538 MB of weights: ~0.5 s at every command; gigabytes for larger models).
//!
//! `.edpo-hashed.json` holds, per file, the sha256 it was found to have and its size, inode,
//! device, modification and change times then. A file whose identity is unchanged is taken to
//! have that sha256. Every write to a file sets its change time (`ctime`, which no user call
//! sets back), so a file written since is hashed again. A file changed less than
//! [`SETTLE_SECONDS`] before it was hashed is not remembered: file-system timestamps are
//! coarse, and two writes within one tick can leave the same times. The record is best
//! effort: a folder that cannot be written is hashed on every open. A file whose remembered
//! hash is not the manifest's is read before it is called changed.
//!
//! This trusts the file system's change times: on file systems that only imitate them (FAT,
//! some FUSE mounts) or for files written through a shared memory map, run `edpo verify`,
//! which reads every file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::{sha256_file, BundleError};

/// The record's file name inside a bundle folder.
pub const RECORD_FILE: &str = ".edpo-hashed.json";

/// How long ago a file must have last changed for its hash to be remembered.
pub const SETTLE_SECONDS: i64 = 2;

/// What the file system says about a file; equal identities mean an unchanged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    bytes: u64,
    inode: u64,
    device: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Identity {
            bytes: m.size(),
            inode: m.ino(),
            device: m.dev(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_path: &Path) -> Option<Identity> {
        None
    }

    /// Whether the file last changed at least [`SETTLE_SECONDS`] ago.
    fn settled(&self) -> bool {
        let nanos = |(secs, nsec): (i64, i64)| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let changed = nanos(self.ctime).max(nanos(self.mtime));
        changed + i128::from(SETTLE_SECONDS) * 1_000_000_000 <= now
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    sha256: String,
    identity: Identity,
}

/// The hashes of one bundle folder's files: those remembered, plus those hashed now.
pub struct FileHashes {
    record: PathBuf,
    seen: BTreeMap<String, Seen>,
    changed: bool,
}

impl FileHashes {
    /// The record of `dir` (empty when it is missing or unreadable).
    pub fn load(dir: &Path) -> FileHashes {
        let record = dir.join(RECORD_FILE);
        let seen = std::fs::read(&record)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        FileHashes {
            record,
            seen,
            changed: false,
        }
    }

    /// Drops what was remembered: every file is read (the record is rewritten from this
    /// reading).
    pub fn forget(&mut self) {
        self.changed |= !self.seen.is_empty();
        self.seen.clear();
    }

    /// The remembered sha256 of `name`, if the file at `path` is unchanged since.
    pub fn remembered(&self, name: &str, path: &Path) -> Option<String> {
        let seen = self.seen.get(name)?;
        (Identity::of(path)? == seen.identity).then(|| seen.sha256.clone())
    }

    /// Reads the file `name` at `path` and hashes it; remembers the hash if the file did not
    /// change meanwhile and has settled, else forgets what was remembered of it.
    pub fn read(&mut self, name: &str, path: &Path) -> Result<String, BundleError> {
        let before = Identity::of(path);
        let sha256 = sha256_file(path)?;
        match (before, Identity::of(path)) {
            (Some(before), Some(after)) if before == after && after.settled() => {
                let seen = Seen {
                    sha256: sha256.clone(),
                    identity: after,
                };
                self.seen.insert(name.to_string(), seen);
                self.changed = true;
            }
            _ => self.changed |= self.seen.remove(name).is_some(),
        }
        Ok(sha256)
    }

    /// Writes the record if it changed (atomically; failures only logged).
    pub fn save(&self) {
        if !self.changed {
            return;
        }
        let written = serde_json::to_vec_pretty(&self.seen)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                crate::table::write_file(&self.record, &bytes).map_err(|e| e.to_string())
            });
        if let Err(message) = written {
            tracing::debug!(record = %self.record.display(), %message, "file hashes not remembered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_hash_is_trusted_while_the_file_is_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.bin");
        std::fs::write(&path, b"weights").unwrap();
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(an_hour_ago).unwrap();
        // A wrong hash remembered under the file's identity: trusting the record returns it,
        // which shows the file was not read.
        let mut hashes = FileHashes::load(tmp.path());
        let identity = Identity::of(&path).unwrap();
        let (identity_bytes, identity_mtime) = (identity.bytes, identity.mtime);
        let seen = Seen {
            sha256: "remembered".into(),
            identity,
        };
        hashes.seen.insert("w.bin".into(), seen);
        hashes.changed = true;
        hashes.save();
        let reopened = FileHashes::load(tmp.path());
        let remembered = reopened.remembered("w.bin", &path);
        assert_eq!(remembered.as_deref(), Some("remembered"));

        // A write of the same size, its modification time set back to what it was: only the
        // change time differs, and the file is read again.
        std::fs::write(&path, b"weightz").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(an_hour_ago).unwrap();
        let now = Identity::of(&path).unwrap();
        assert_eq!((now.bytes, now.mtime), (identity_bytes, identity_mtime));
        let mut reopened = FileHashes::load(tmp.path());
        assert_eq!(reopened.remembered("w.bin", &path), None);
        let got = reopened.read("w.bin", &path).unwrap();
        assert_eq!(got, sha256_file(&path).unwrap());
        assert!(
            !reopened.seen.contains_key("w.bin"),
            "just written: not remembered"
        );
    }

    /// A copy of the sample bundle whose `params.safetensors` differs from the manifest, with a
    /// record that remembers the manifest's hash under the changed file's identity.
    fn bundle_with_a_wrong_record() -> (tempfile::TempDir, PathBuf) {
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data-samples/bundle");
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&sample).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != RECORD_FILE {
                std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
            }
        }
        let params = tmp.path().join("params.safetensors");
        let mut bytes = std::fs::read(&params).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&params, bytes).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("edpo-model.json")).unwrap())
                .unwrap();
        let mut hashes = FileHashes::load(tmp.path());
        let seen = Seen {
            sha256: manifest["files"]["params.safetensors"]["sha256"]
                .as_str()
                .unwrap()
                .to_string(),
            identity: Identity::of(&params).unwrap(),
        };
        hashes.seen.insert("params.safetensors".into(), seen);
        hashes.changed = true;
        hashes.save();
        let path = tmp.path().to_path_buf();
        (tmp, path)
    }

    #[test]
    fn opening_a_bundle_trusts_the_record_and_verify_reads_every_file() {
        use crate::bundle::Bundle;
        let (_tmp, dir) = bundle_with_a_wrong_record();
        // The record is trusted for an unchanged identity (here, deliberately, a wrong one)…
        assert!(Bundle::open(&dir).is_ok());
        // …and `edpo verify`'s open reads the file.
        match Bundle::open_rehashing(&dir) {
            Err(BundleError::HashMismatch { path, .. }) => {
                assert!(path.ends_with("params.safetensors"))
            }
            other => panic!("expected a hash mismatch, got {:?}", other.err()),
        }
        // The rehashing open dropped the record: a plain open now reads the file too.
        assert!(matches!(
            Bundle::open(&dir),
            Err(BundleError::HashMismatch { .. })
        ));
    }

    #[test]
    fn a_file_is_remembered_once_it_has_settled() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.bin");
        std::fs::write(&path, b"weights").unwrap();
        let mut hashes = FileHashes::load(tmp.path());
        hashes.read("w.bin", &path).unwrap();
        hashes.save();
        assert!(!tmp.path().join(RECORD_FILE).exists(), "changed just now");

        std::thread::sleep(std::time::Duration::from_millis(
            1000 * SETTLE_SECONDS as u64 + 1100,
        ));
        let mut hashes = FileHashes::load(tmp.path());
        let sha256 = hashes.read("w.bin", &path).unwrap();
        hashes.save();
        let reopened = FileHashes::load(tmp.path());
        assert_eq!(reopened.seen["w.bin"].sha256, sha256);
        assert_eq!(sha256, sha256_file(&path).unwrap());
    }

    #[test]
    fn an_unwritable_or_garbled_record_is_only_a_missed_shortcut() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.bin");
        std::fs::write(&path, b"weights").unwrap();
        std::fs::write(tmp.path().join(RECORD_FILE), b"{not json").unwrap();
        let mut hashes = FileHashes::load(tmp.path());
        assert_eq!(hashes.remembered("w.bin", &path), None);
        let got = hashes.read("w.bin", &path).unwrap();
        assert_eq!(got, sha256_file(&path).unwrap());
        let mut missing = FileHashes::load(&tmp.path().join("no-such-folder"));
        missing.changed = true;
        missing.save();
    }
}
