//! `hms-edge restore SRC`: replaces the store of a stopped daemon by a backup, atomically.
//!
//! Checks, in this order, before anything in the state folder changes:
//! 1. `manifest.json` parses, is an hms-edge backup of a known format version, and its paths are
//!    only `index.db` and `blobs/xx/<id>`;
//! 2. its key fingerprint equals the configured master key's (else: refused, nothing changed);
//! 3. the state folder lock is free (`hms-edged` is not running; it cannot start meanwhile).
//!
//! Then every file is copied into a staging folder inside the state folder while its SHA-256 is
//! computed; a size or checksum mismatch stops the restore naming the file. The staged database
//! must open with the configured key, pass `PRAGMA integrity_check`, be of a schema this build
//! knows, and every blob it references must be staged. Only then is the restore committed:
//!
//! ```text
//! staging complete ─► write marker `restore.commit` (fsync) ─► swap: current index.db(-wal,-shm)
//! and blobs/ move to `.restore-old/`, staged ones move in ─► remove marker ─► remove old
//! ```
//!
//! A crash before the marker leaves the old store untouched (the staging folder is removed at the
//! next restore or daemon start). A crash after it is rolled forward by [`recover`], which
//! `hms-edged` runs at start under its lock, and which every step of the swap tolerates running
//! again. The staged data was fully verified before the marker, so rolling forward is always safe.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::backup::{FORMAT, FORMAT_VERSION, MANIFEST_FILE, Manifest};
use super::{LockError, Progress, StateLock};
use crate::keys::{Key, KeyPurpose};
use crate::store::{BLOB_DIR, BlobId, DB_FILE, StoreError, db};

/// Staging folder inside the state folder.
pub const STAGING_DIR: &str = ".restore-staging";
/// Where the replaced store goes during the swap.
pub const OLD_DIR: &str = ".restore-old";
/// Commit marker: present = the staged store is verified and must replace the current one.
pub const COMMIT_MARKER: &str = "restore.commit";

/// Errors of `restore`. Each says whether anything changed (nothing does before the commit).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path} is not a readable hms-edge backup ({reason}); nothing was restored")]
    NotABackup { path: PathBuf, reason: String },
    #[error(
        "the backup was made under another master key (its key fingerprint is {backup}, the \
         configured key's is {configured}); nothing was restored. Restore it with the master \
         key of that time"
    )]
    KeyMismatch { backup: String, configured: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("backup file {file} is missing; nothing was restored")]
    MissingFile { file: String },
    #[error(
        "backup file {file} does not match its manifest ({what}): the backup is corrupt or was \
         altered; nothing was restored"
    )]
    Checksum { file: String, what: String },
    #[error("the backed-up database failed its check ({0}); nothing was restored")]
    BadDatabase(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io { path: path.to_owned(), source }
}

/// What a finished restore reports.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub manifest: Manifest,
    pub elapsed: Duration,
}

impl RestoreReport {
    /// Throughput over all bytes restored, MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.manifest.total_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Reads and checks a backup's manifest (format, version, paths).
pub fn read_manifest(src: &Path) -> Result<Manifest, RestoreError> {
    let path = src.join(MANIFEST_FILE);
    let bad = |reason: String| RestoreError::NotABackup { path: src.to_owned(), reason };
    let text = std::fs::read(&path).map_err(|e| bad(format!("{MANIFEST_FILE}: {e}")))?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("{MANIFEST_FILE}: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!("format {:?}", m.format)));
    }
    if m.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            m.format_version
        )));
    }
    let mut seen = BTreeSet::new();
    for f in &m.files {
        if !valid_rel_path(&f.path) || !seen.insert(f.path.as_str()) {
            return Err(bad(format!("unexpected file entry {:?}", f.path)));
        }
    }
    if !seen.contains(DB_FILE) {
        return Err(bad(format!("no {DB_FILE} in the manifest")));
    }
    Ok(m)
}

/// `index.db` or `blobs/xx/<id>` with `xx` the id's first two digits: nothing else, no `..`.
fn valid_rel_path(p: &str) -> bool {
    if p == DB_FILE {
        return true;
    }
    let parts: Vec<&str> = p.split('/').collect();
    matches!(parts.as_slice(), [b, xx, id]
        if *b == BLOB_DIR && BlobId::parse(id).is_some() && id.starts_with(xx) && xx.len() == 2)
}

/// Restores the backup in `src` into `state_dir` for the master key `master`.
pub fn restore(
    state_dir: &Path,
    master: &Key,
    src: &Path,
    progress: Progress<'_>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let manifest = read_manifest(src)?;
    let configured = master.fingerprint();
    if manifest.key_fingerprint != configured {
        return Err(RestoreError::KeyMismatch {
            backup: manifest.key_fingerprint.clone(),
            configured,
        });
    }
    super::private_dir(state_dir).map_err(io_at(state_dir))?;
    let _lock = StateLock::acquire(state_dir)?;
    // Finish (or discard) an earlier interrupted restore before starting a new one.
    recover(state_dir).map_err(io_at(state_dir))?;
    let staging = state_dir.join(STAGING_DIR);
    let result = stage(state_dir, master, src, &manifest, &staging, progress);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // Commit point.
    let marker = state_dir.join(COMMIT_MARKER);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&marker).map_err(io_at(&marker))?;
        f.write_all(manifest.created_at.as_bytes()).map_err(io_at(&marker))?;
        f.sync_all().map_err(io_at(&marker))?;
    }
    crate::store::fsync_dir(state_dir).map_err(io_at(state_dir))?;
    recover(state_dir).map_err(io_at(state_dir))?;
    Ok(RestoreReport { manifest, elapsed: started.elapsed() })
}

fn stage(
    state_dir: &Path,
    master: &Key,
    src: &Path,
    manifest: &Manifest,
    staging: &Path,
    progress: Progress<'_>,
) -> Result<(), RestoreError> {
    let _ = std::fs::remove_dir_all(staging);
    super::private_dir(&staging.join(BLOB_DIR).join("tmp")).map_err(io_at(staging))?;
    for i in 0..=255u8 {
        let d = staging.join(BLOB_DIR).join(format!("{i:02x}"));
        super::private_dir(&d).map_err(io_at(&d))?;
    }
    // Everything present with the right size before the long copy.
    for f in &manifest.files {
        match std::fs::metadata(src.join(&f.path)) {
            Ok(m) if m.len() == f.size => {}
            Ok(m) => {
                return Err(RestoreError::Checksum {
                    file: f.path.clone(),
                    what: format!("size {} instead of {}", m.len(), f.size),
                });
            }
            Err(_) => return Err(RestoreError::MissingFile { file: f.path.clone() }),
        }
    }
    let total = manifest.total_bytes;
    let mut done = 0u64;
    for f in &manifest.files {
        let from = src.join(&f.path);
        let to = staging.join(&f.path);
        let mut tick = |n: u64| {
            done += n;
            progress(done, total);
        };
        let (size, sha256) = super::copy_hashed(&from, &to, &mut tick)
            .map_err(|e| RestoreError::Io { path: from.clone(), source: e })?;
        if sha256 != f.sha256 || size != f.size {
            return Err(RestoreError::Checksum {
                file: f.path.clone(),
                what: "SHA-256 differs".into(),
            });
        }
    }
    // The staged database: our key, intact, a schema we know, every blob present.
    let db_path = staging.join(DB_FILE);
    let bad = |e: StoreError| match e {
        StoreError::WrongKey => {
            RestoreError::BadDatabase("it does not open with the configured master key".into())
        }
        e => RestoreError::BadDatabase(e.to_string()),
    };
    {
        let conn =
            db::open(&db_path, &master.derive(KeyPurpose::Database), true, 2048).map_err(bad)?;
        let sql = |e: rusqlite::Error| RestoreError::BadDatabase(e.to_string());
        let check: String =
            conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(sql)?;
        if check != "ok" {
            return Err(RestoreError::BadDatabase(format!("integrity_check: {check}")));
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        if version as usize > crate::store::MIGRATIONS.len() {
            return Err(RestoreError::BadDatabase(format!(
                "schema version {version} is newer than this build ({})",
                crate::store::MIGRATIONS.len()
            )));
        }
        let listed: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        for id in crate::store::held_blob_ids(&conn).map_err(sql)? {
            let rel = BlobId::parse(&id)
                .map(|b| super::backup::blob_rel_path(&b))
                .ok_or_else(|| RestoreError::BadDatabase(format!("bad blob id {id}")))?;
            if !listed.contains(rel.as_str()) {
                return Err(RestoreError::MissingFile { file: rel });
            }
        }
    }
    for leftover in ["index.db-wal", "index.db-shm"] {
        let _ = std::fs::remove_file(staging.join(leftover));
    }
    super::match_owner_tree(staging, state_dir).map_err(io_at(staging))?;
    sync_dirs(staging)?;
    Ok(())
}

fn sync_dirs(root: &Path) -> Result<(), RestoreError> {
    for e in std::fs::read_dir(root).map_err(io_at(root))? {
        let p = e.map_err(io_at(root))?.path();
        if p.is_dir() {
            sync_dirs(&p)?;
        }
    }
    crate::store::fsync_dir(root).map_err(io_at(root))
}

/// Completes an interrupted restore (commit marker present: roll forward) or discards an
/// uncommitted staging folder. Idempotent; call with the state folder locked. Returns true when
/// a committed restore was completed now.
pub fn recover(state_dir: &Path) -> std::io::Result<bool> {
    let marker = state_dir.join(COMMIT_MARKER);
    let staging = state_dir.join(STAGING_DIR);
    let old = state_dir.join(OLD_DIR);
    if !marker.exists() {
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        return Ok(false);
    }
    super::private_dir(&old)?;
    // The staged database replaces the current one together with its WAL: the old WAL must
    // never be applied to the new file.
    if staging.join(DB_FILE).exists() {
        for side in ["index.db-wal", "index.db-shm"] {
            rename_if_exists(&state_dir.join(side), &old.join(side))?;
        }
    }
    for name in [DB_FILE, BLOB_DIR] {
        let staged = staging.join(name);
        if staged.exists() {
            rename_if_exists(&state_dir.join(name), &old.join(name))?;
            std::fs::rename(&staged, state_dir.join(name))?;
        }
    }
    crate::store::fsync_dir(state_dir)?;
    std::fs::remove_file(&marker)?;
    crate::store::fsync_dir(state_dir)?;
    std::fs::remove_dir_all(&old)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(true)
}

fn rename_if_exists(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state folder with a "current" store and a staged one, as `restore` leaves them just
    /// before or after its commit marker.
    fn layout(dir: &Path, committed: bool) {
        std::fs::write(dir.join(DB_FILE), b"old-db").unwrap();
        std::fs::write(dir.join("index.db-wal"), b"old-wal").unwrap();
        std::fs::create_dir_all(dir.join("blobs/aa")).unwrap();
        std::fs::write(dir.join("blobs/aa/old"), b"old-blob").unwrap();
        let st = dir.join(STAGING_DIR);
        std::fs::create_dir_all(st.join("blobs/bb")).unwrap();
        std::fs::write(st.join(DB_FILE), b"new-db").unwrap();
        std::fs::write(st.join("blobs/bb/new"), b"new-blob").unwrap();
        if committed {
            std::fs::write(dir.join(COMMIT_MARKER), b"t").unwrap();
        }
    }

    fn assert_new(dir: &Path) {
        assert_eq!(std::fs::read(dir.join(DB_FILE)).unwrap(), b"new-db");
        assert!(!dir.join("index.db-wal").exists(), "the old WAL must not meet the new database");
        assert_eq!(std::fs::read(dir.join("blobs/bb/new")).unwrap(), b"new-blob");
        assert!(!dir.join("blobs/aa/old").exists());
        for gone in [STAGING_DIR, OLD_DIR, COMMIT_MARKER] {
            assert!(!dir.join(gone).exists(), "{gone} left behind");
        }
    }

    #[test]
    fn without_the_marker_the_old_store_stays_and_staging_goes() {
        let d = tempfile::tempdir().unwrap();
        layout(d.path(), false);
        assert!(!recover(d.path()).unwrap());
        assert_eq!(std::fs::read(d.path().join(DB_FILE)).unwrap(), b"old-db");
        assert_eq!(std::fs::read(d.path().join("index.db-wal")).unwrap(), b"old-wal");
        assert_eq!(std::fs::read(d.path().join("blobs/aa/old")).unwrap(), b"old-blob");
        assert!(!d.path().join(STAGING_DIR).exists());
    }

    #[test]
    fn with_the_marker_every_partial_swap_rolls_forward() {
        // Crash points inside the swap: nothing moved yet; WAL moved; database swapped; the
        // blobs moved out but not in; everything swapped but the marker still there.
        type Partial = fn(&Path);
        let partials: [Partial; 5] = [
            |_| {},
            |d| {
                std::fs::rename(d.join("index.db-wal"), d.join(OLD_DIR).join("index.db-wal"))
                    .unwrap()
            },
            |d| {
                std::fs::remove_file(d.join("index.db-wal")).unwrap();
                std::fs::rename(d.join(DB_FILE), d.join(OLD_DIR).join(DB_FILE)).unwrap();
                std::fs::rename(d.join(STAGING_DIR).join(DB_FILE), d.join(DB_FILE)).unwrap();
            },
            |d| {
                std::fs::remove_file(d.join("index.db-wal")).unwrap();
                std::fs::remove_file(d.join(DB_FILE)).unwrap();
                std::fs::rename(d.join(STAGING_DIR).join(DB_FILE), d.join(DB_FILE)).unwrap();
                std::fs::rename(d.join(BLOB_DIR), d.join(OLD_DIR).join(BLOB_DIR)).unwrap();
            },
            |d| {
                std::fs::remove_file(d.join("index.db-wal")).unwrap();
                std::fs::remove_file(d.join(DB_FILE)).unwrap();
                std::fs::remove_dir_all(d.join(BLOB_DIR)).unwrap();
                std::fs::rename(d.join(STAGING_DIR).join(DB_FILE), d.join(DB_FILE)).unwrap();
                std::fs::rename(d.join(STAGING_DIR).join(BLOB_DIR), d.join(BLOB_DIR)).unwrap();
            },
        ];
        for (i, partial) in partials.iter().enumerate() {
            let d = tempfile::tempdir().unwrap();
            layout(d.path(), true);
            std::fs::create_dir_all(d.path().join(OLD_DIR)).unwrap();
            partial(d.path());
            assert!(recover(d.path()).unwrap(), "crash point {i}");
            assert_new(d.path());
            // Running it again is harmless.
            assert!(!recover(d.path()).unwrap());
            assert_new(d.path());
        }
    }

    #[test]
    fn manifest_paths_cannot_escape_the_backup() {
        assert!(valid_rel_path("index.db"));
        assert!(valid_rel_path("blobs/0a/0a1b2c3d4e5f60718293a4b5c6d7e8f9"));
        for bad in [
            "../index.db",
            "blobs/0b/0a1b2c3d4e5f60718293a4b5c6d7e8f9",
            "blobs/0a/../../etc/passwd",
            "/etc/passwd",
            "blobs/tmp/x",
            "master.key",
        ] {
            assert!(!valid_rel_path(bad), "{bad}");
        }
    }
}
