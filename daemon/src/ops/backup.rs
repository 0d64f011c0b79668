//! `hms-edge backup DEST`: an online, consistent copy of a store while `hms-edged` runs.
//!
//! 1. **Database snapshot.** A read-only connection keyed like the daemon's runs the SQLite
//!    online backup API in a single step (`step(-1)`), i.e. inside one read transaction: a
//!    consistent snapshot of every committed transaction, taken without blocking the daemon's
//!    writer (WAL). SQLCipher copies the pages as they are, so the copy stays encrypted under the
//!    same database key; it never exists in clear.
//! 2. **Blob files.** Exactly the blobs the *copy* references are copied, as their encrypted
//!    files (immutable once renamed into place), each with its SHA-256.
//! 3. **Manifest** (`manifest.json`, written last): format version, creation time, the master
//!    key's fingerprint (an HKDF derivation, never the key), schema version, counts, and every
//!    file with its size and SHA-256.
//!
//! The backup is built in a hidden sibling folder and renamed to `DEST` only when complete, so a
//! folder named `DEST` is always a whole backup.
//!
//! **A blob removed during the backup.** Rows only reference fsynced blobs, and a blob file is
//! only removed after a committed transaction says it is no longer held here: its row was
//! dropped (never-referenced blobs: duplicates, refused or failed writes) or marked offloaded (an
//! evicted image the cloud PACS holds; the backup has its row, not its file). So a blob the
//! snapshot references can only vanish if a later transaction did one of those. When a file is
//! missing, the live database is asked: if the blob is no longer held, the snapshot is simply
//! taken again (files already copied are kept: blob files never change) — up to
//! [`MAX_ATTEMPTS`] times; if it is still held, the store itself is damaged and the backup fails
//! naming the blob.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::Progress;
use crate::keys::{Key, KeyPurpose};
use crate::store::{BLOB_DIR, BlobId, DB_FILE, StoreError, db};

/// Manifest file name inside a backup folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// `format` of a backup manifest.
pub const FORMAT: &str = "hms-edge-backup";
/// Version of the backup layout and manifest.
pub const FORMAT_VERSION: u32 = 1;
/// Snapshots taken at most when blobs vanish between the snapshot and their copy.
pub const MAX_ATTEMPTS: usize = 3;

/// Errors of `backup`. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} already exists; choose a new folder for the backup")]
    DestExists(PathBuf),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("database backup failed: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob {0} is referenced by the database but its file is missing: the store is damaged")]
    MissingBlob(String),
    #[error("blobs kept vanishing during {0} snapshots (heavy deletes?); try again")]
    Unstable(usize),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path inside the backup folder: `index.db` or `blobs/xx/<id>`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// What the backup holds, for the admin and for `restore`'s checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub blobs: u64,
    pub dicom_instances: u64,
    pub fhir_resources: u64,
    pub outbox: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_at_ms: i64,
    /// Fingerprint of the master key the store was under (see `Key::fingerprint`).
    pub key_fingerprint: String,
    /// `PRAGMA user_version` of the database (number of migrations).
    pub schema_version: i64,
    pub counts: Counts,
    /// Sum of the file sizes, bytes.
    pub total_bytes: u64,
    pub files: Vec<FileEntry>,
}

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub dest: PathBuf,
    pub manifest: Manifest,
    pub elapsed: Duration,
    /// Database snapshots taken (1 unless blobs vanished meanwhile).
    pub attempts: usize,
}

impl BackupReport {
    /// Throughput over all bytes written, MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.manifest.total_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Relative path of a blob file inside a store or backup folder.
pub fn blob_rel_path(id: &BlobId) -> String {
    format!("{BLOB_DIR}/{}/{}", &id.as_str()[..2], id.as_str())
}

/// Reads the counts shown in the manifest from a database.
pub fn counts(conn: &Connection) -> Result<Counts, rusqlite::Error> {
    let n = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|v| v as u64);
    Ok(Counts {
        blobs: crate::store::held_blob_ids(conn)?.len() as u64,
        dicom_instances: n("SELECT count(*) FROM dicom_instances")?,
        fhir_resources: n("SELECT count(*) FROM fhir_current")?,
        outbox: n("SELECT count(*) FROM outbox")?,
    })
}

/// Backs up the store in `state_dir` (the daemon may be running) into the new folder `dest`.
pub fn backup(
    state_dir: &Path,
    master: &Key,
    dest: &Path,
    progress: Progress<'_>,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if dest.exists() {
        return Err(BackupError::DestExists(dest.to_owned()));
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    remove_abandoned_partials(&parent, &name);
    let work = parent.join(format!(".{name}.partial-{}", std::process::id()));
    super::private_dir(&work).map_err(io_at(&work))?;
    let result = build(state_dir, master, &work, progress);
    let (manifest, attempts) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    std::fs::rename(&work, dest).map_err(io_at(dest))?;
    crate::store::fsync_parent(dest).map_err(io_at(dest))?;
    Ok(BackupReport { dest: dest.to_owned(), manifest, elapsed: started.elapsed(), attempts })
}

fn build(
    state_dir: &Path,
    master: &Key,
    work: &Path,
    progress: Progress<'_>,
) -> Result<(Manifest, usize), BackupError> {
    let db_key = master.derive(KeyPurpose::Database);
    let src_db = state_dir.join(DB_FILE);
    if !src_db.exists() {
        return Err(BackupError::Io {
            path: src_db,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no store here"),
        });
    }
    let src = db::open(&src_db, &db_key, true, 2048)?;
    let dst_db = work.join(DB_FILE);
    // Blob files copied so far (they never change, so they stay valid across snapshots).
    let mut copied: BTreeMap<String, FileEntry> = BTreeMap::new();
    let mut done_bytes = 0u64;
    for attempt in 1..=MAX_ATTEMPTS {
        let _ = std::fs::remove_file(&dst_db);
        let created_at_ms = crate::store::now_ms();
        let referenced = snapshot(&src, &dst_db, &db_key)?;
        // Sizes first, for an honest progress total.
        let mut todo = Vec::new();
        let mut total = done_bytes;
        for id in &referenced {
            let rel = blob_rel_path(id);
            if copied.contains_key(&rel) {
                continue;
            }
            let size = std::fs::metadata(state_dir.join(&rel)).map(|m| m.len()).unwrap_or(0);
            total += size;
            todo.push(rel);
        }
        let db_size = std::fs::metadata(&dst_db).map_err(io_at(&dst_db))?.len();
        total += db_size;
        let mut missing = Vec::new();
        for rel in todo {
            let from = state_dir.join(&rel);
            let to = work.join(&rel);
            if let Some(dir) = to.parent() {
                super::private_dir(dir).map_err(io_at(dir))?;
            }
            let mut tick = |n: u64| {
                done_bytes += n;
                progress(done_bytes, total);
            };
            match super::copy_hashed(&from, &to, &mut tick) {
                Ok((size, sha256)) => {
                    copied.insert(rel.clone(), FileEntry { path: rel, size, sha256 });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let _ = std::fs::remove_file(&to);
                    missing.push(rel);
                }
                Err(e) => return Err(BackupError::Io { path: from, source: e }),
            }
        }
        if !missing.is_empty() {
            // Legitimately removed after the snapshot (no longer held), or a damaged store?
            for rel in &missing {
                let id = rel.rsplit('/').next().unwrap_or_default();
                if crate::store::blob_is_held(&src, id)? {
                    return Err(BackupError::MissingBlob(id.to_owned()));
                }
            }
            tracing::info!(attempt, vanished = missing.len(), "blobs removed during the backup");
            continue;
        }
        // Copies from an earlier snapshot that this one no longer references are dropped.
        let wanted: BTreeSet<String> = referenced.iter().map(blob_rel_path).collect();
        let stale: Vec<String> = copied.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        for rel in stale {
            copied.remove(&rel);
            let _ = std::fs::remove_file(work.join(&rel));
        }
        let mut tick = |n: u64| {
            done_bytes += n;
            progress(done_bytes, total);
        };
        let (db_size, db_sha) = hash_file(&dst_db, &mut tick)?;
        let conn = db::open(&dst_db, &db_key, true, 2048)?;
        let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let counts = counts(&conn)?;
        drop(conn);
        let mut files = vec![FileEntry { path: DB_FILE.into(), size: db_size, sha256: db_sha }];
        files.extend(copied.into_values());
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            created_at: crate::fhir::date::format_instant(created_at_ms),
            created_at_ms,
            key_fingerprint: master.fingerprint(),
            schema_version,
            counts,
            total_bytes: files.iter().map(|f| f.size).sum(),
            files,
        };
        write_manifest(work, &manifest)?;
        sync_tree(work)?;
        return Ok((manifest, attempt));
    }
    Err(BackupError::Unstable(MAX_ATTEMPTS))
}

/// Copies the database into `dst` in one step of the online backup API and returns the blob ids
/// the copy references.
fn snapshot(src: &Connection, dst: &Path, db_key: &Key) -> Result<Vec<BlobId>, BackupError> {
    let mut out = db::open_keyed(dst, db_key, rusqlite::OpenFlags::default())?;
    {
        let b = rusqlite::backup::Backup::new(src, &mut out)?;
        loop {
            // -1: every page in one step, i.e. in one read transaction of the source: a
            // consistent snapshot that writes by the daemon cannot restart.
            match b.step(-1)? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => continue,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    // Offloaded blobs (images the cloud PACS holds) have a row but no file here.
    let ids: Vec<String> = crate::store::held_blob_ids(&out)?;
    out.close().map_err(|(_, e)| e)?;
    std::fs::File::open(dst).and_then(|f| f.sync_all()).map_err(io_at(dst))?;
    ids.iter()
        .map(|s| {
            BlobId::parse(s)
                .ok_or_else(|| BackupError::Store(StoreError::Rejected(format!("bad blob id {s}"))))
        })
        .collect()
}

fn hash_file(path: &Path, on_bytes: &mut dyn FnMut(u64)) -> Result<(u64, String), BackupError> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_at(path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        on_bytes(n as u64);
    }
    Ok((total, hex::encode(h.finalize())))
}

fn write_manifest(work: &Path, m: &Manifest) -> Result<(), BackupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = work.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(m).expect("manifest serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_at(&path))?;
    f.write_all(&text).and_then(|()| f.sync_all()).map_err(io_at(&path))
}

/// fsyncs every folder of a tree (files were fsynced when written).
fn sync_tree(root: &Path) -> Result<(), BackupError> {
    for e in std::fs::read_dir(root).map_err(io_at(root))? {
        let p = e.map_err(io_at(root))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        }
    }
    crate::store::fsync_dir(root).map_err(io_at(root))
}

/// Removes the hidden folders of earlier backups to the same destination whose process is gone
/// (killed in the middle of its copy): they never became a backup, and nothing else cleans them.
fn remove_abandoned_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone {
            tracing::info!(path = %e.path().display(), "removing an abandoned partial backup");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
