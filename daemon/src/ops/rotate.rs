//! `hms-edge rotate-key`: a new master key for a stopped store, crash-safe at every step.
//!
//! What is encrypted under the master key: the SQLCipher database (key derived with HKDF) and,
//! through the data keys, the blob files and audit HMACs. Rotation re-keys the database and
//! re-wraps the data keys: they are recorded inside the database (`kv`, namespace `keys`, see
//! `store::data_keys`) before the database is re-keyed, so the blob files are never rewritten.
//!
//! The master key lives in a *key location* `P`: a 0600 key file (fully automatic), or a systemd
//! encrypted credential, read with `systemd-creds decrypt` and written with
//! `systemd-creds encrypt` (so the new key is sealed like the old, TPM2 when present). The
//! daemon must be stopped: the state-folder lock is held throughout.
//!
//! State machine (K = current key in `P`, N = new key):
//!
//! | step | on disk afterwards | a crash here leaves… | next `rotate-key` |
//! |---|---|---|---|
//! | 1 prepare | data keys in `kv` (under K), WAL checkpointed, rollback journal | store under K | rotates |
//! | 2 new key | `P.next` = N (fsynced) | store under K; daemon warns about `P.next` | removes `P.next`, rotates |
//! | 3 re-key copy | `index.db.rekey` = copy re-keyed to N | store under K | removes both, rotates |
//! | 4 verify | N opens the copy: integrity, same counts, every blob decrypts with the data key | store under K | removes both, rotates |
//! | 5 switch database | `rename(index.db.rekey, index.db)`: **commit point** | store under N, `P` = K, `P.next` = N; the daemon refuses to start and says the store is under `P.next` | finishes: 6–7 |
//! | 6 switch key | `link(P, P.old)`, `rename(P.next, P)` | store under N = `P` | destroys `P.old` |
//! | 7 destroy | `P.old` overwritten with zeros, fsynced, unlinked | done | — |
//!
//! "Which key opens the store" is decided by trying them (the wrong one fails on the first page,
//! before anything is written), never by trusting a state file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{LockError, StateLock, with_suffix};
use crate::keys::{self, Key, KeyPurpose};
use crate::store::{BLOB_DIR, BlobStore, DB_FILE, StoreError, db};

/// The re-keyed copy of the database before it replaces `index.db`.
pub const REKEY_FILE: &str = "index.db.rekey";
/// Name of the master key credential (systemd).
pub const CREDENTIAL_NAME: &str = keys::CREDENTIAL_NAME;

/// Errors of `rotate-key`.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("{0}")]
    Credential(String),
    #[error("the store in {dir} opens with neither the current key ({current}) nor {next}")]
    NoKeyOpens { dir: PathBuf, current: PathBuf, next: String },
    #[error(
        "verification of the re-keyed database failed ({0}); the store stays under the old key"
    )]
    Verify(String),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RotateError + '_ {
    move |source| RotateError::Io { path: path.to_owned(), source }
}

/// Where the master key lives and how it is read and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// A key file (32 raw bytes or 64 hex digits, mode 0600).
    File(PathBuf),
    /// A systemd encrypted credential file (`systemd-creds encrypt --name=master-key`).
    Credential(PathBuf),
}

impl KeyLocation {
    pub fn path(&self) -> &Path {
        match self {
            KeyLocation::File(p) | KeyLocation::Credential(p) => p,
        }
    }

    /// Reads the key stored at `path` (the location's own path or one of its siblings).
    pub fn read_at(&self, path: &Path) -> Result<Key, RotateError> {
        match self {
            KeyLocation::File(_) => Ok(keys::load_key_file(path)?),
            KeyLocation::Credential(_) => {
                let out = std::process::Command::new("systemd-creds")
                    .args(["decrypt", &format!("--name={CREDENTIAL_NAME}")])
                    .arg(path)
                    .arg("-")
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| {
                        RotateError::Credential(format!("cannot run systemd-creds: {e}"))
                    })?;
                let raw = zeroize::Zeroizing::new(out.stdout);
                if !out.status.success() {
                    return Err(RotateError::Credential(format!(
                        "systemd-creds decrypt {} failed ({})",
                        path.display(),
                        out.status
                    )));
                }
                keys::parse_key(&raw).ok_or_else(|| {
                    RotateError::Credential(format!(
                        "credential {} does not hold a 256-bit key",
                        path.display()
                    ))
                })
            }
        }
    }

    /// Writes `key` to the new file `path` (never overwriting), fsynced, owned like the location.
    pub fn write_new_at(&self, path: &Path, key: &Key) -> Result<(), RotateError> {
        match self {
            KeyLocation::File(_) => keys::write_new_key_file(path, key)?,
            KeyLocation::Credential(_) => {
                use std::io::Write;
                if path.exists() {
                    return Err(RotateError::Io {
                        path: path.to_owned(),
                        source: std::io::ErrorKind::AlreadyExists.into(),
                    });
                }
                let mut child = std::process::Command::new("systemd-creds")
                    .args(["encrypt", &format!("--name={CREDENTIAL_NAME}"), "-"])
                    .arg(path)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .map_err(|e| {
                        RotateError::Credential(format!("cannot run systemd-creds: {e}"))
                    })?;
                {
                    let hex = zeroize::Zeroizing::new(hex::encode(key.expose()));
                    let mut stdin = child.stdin.take().expect("piped");
                    stdin.write_all(hex.as_bytes()).map_err(io_at(path))?;
                }
                let status = child.wait().map_err(io_at(path))?;
                if !status.success() {
                    let _ = std::fs::remove_file(path);
                    return Err(RotateError::Credential(format!(
                        "systemd-creds encrypt {} failed ({status})",
                        path.display()
                    )));
                }
                std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_at(path))?;
                crate::store::fsync_parent(path).map_err(io_at(path))?;
            }
        }
        if self.path().exists() {
            super::match_owner(path, self.path()).map_err(io_at(path))?;
        }
        Ok(())
    }

    /// `P.next`: the new key while a rotation is under way.
    pub fn next_path(&self) -> PathBuf {
        with_suffix(self.path(), ".next")
    }

    /// `P.old`: the old key between the switch and its destruction.
    pub fn old_path(&self) -> PathBuf {
        with_suffix(self.path(), ".old")
    }
}

/// Steps of the rotation, for tests that stop after one (a crash simulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Prepared,
    NewKeyWritten,
    Rekeyed,
    Verified,
    DatabaseSwitched,
    KeySwitched,
}

/// What a rotation did.
#[derive(Debug, Clone, Default)]
pub struct RotateReport {
    /// Something left by an interrupted rotation that was finished or undone first.
    pub recovered: Option<String>,
    /// False when the run only finished an interrupted rotation (or stopped early in tests).
    pub rotated: bool,
    pub old_fingerprint: String,
    pub new_fingerprint: String,
    pub blobs_verified: u64,
    pub elapsed: Duration,
}

/// Whether `master` opens the store's database (read-only; a wrong key changes nothing).
pub fn opens(state_dir: &Path, master: &Key) -> Result<bool, StoreError> {
    match db::open(&state_dir.join(DB_FILE), &master.derive(KeyPurpose::Database), true, 1024) {
        Ok(_) => Ok(true),
        Err(StoreError::WrongKey) => Ok(false),
        Err(e) => Err(e),
    }
}

/// For `hms-edged` when the configured key file does not open the store: if an interrupted
/// rotation left the new key in `P.next` and that key opens it, says so.
pub fn interrupted_rotation_key(state_dir: &Path, key_file: &Path) -> Option<PathBuf> {
    let next = with_suffix(key_file, ".next");
    let key = keys::load_key_file(&next).ok()?;
    opens(state_dir, &key).ok()?.then_some(next)
}

/// Rotates the master key of the stopped store in `state_dir` (or finishes an interrupted
/// rotation). `stop_after` ends the run after a step, as a crash would (tests).
pub fn rotate(
    state_dir: &Path,
    loc: &KeyLocation,
    stop_after: Option<Step>,
) -> Result<RotateReport, RotateError> {
    let started = Instant::now();
    let _lock = StateLock::acquire(state_dir)?;
    let mut report = RotateReport::default();
    let current = loc.read_at(loc.path())?;
    let next_path = loc.next_path();
    let old_path = loc.old_path();
    let rekey_path = state_dir.join(REKEY_FILE);

    // Recovery: decide by trying the keys.
    if next_path.exists() {
        let next = loc.read_at(&next_path).ok();
        if opens(state_dir, &current)? {
            // Interrupted before the commit point: undo.
            let _ = std::fs::remove_file(&rekey_path);
            super::destroy_file(&next_path).map_err(io_at(&next_path))?;
            report.recovered = Some(format!(
                "an interrupted rotation had not switched the database; removed {}",
                next_path.display()
            ));
        } else if let Some(next) = next.filter(|k| opens(state_dir, k).unwrap_or(false)) {
            // After the commit point: finish.
            switch_key_file(loc, &next_path, &old_path)?;
            super::destroy_file(&old_path).map_err(io_at(&old_path))?;
            report.recovered = Some(format!(
                "finished an interrupted rotation: the store was already under the key in {}",
                next_path.display()
            ));
            report.old_fingerprint = current.fingerprint();
            report.new_fingerprint = next.fingerprint();
            report.elapsed = started.elapsed();
            return Ok(report);
        } else {
            return Err(RotateError::NoKeyOpens {
                dir: state_dir.to_owned(),
                current: loc.path().to_owned(),
                next: next_path.display().to_string(),
            });
        }
    }
    if old_path.exists() && opens(state_dir, &current)? {
        // Interrupted after the key switch: the rotation itself is done.
        super::destroy_file(&old_path).map_err(io_at(&old_path))?;
        report.recovered = Some(format!(
            "finished an interrupted rotation: destroyed the old key left in {}",
            old_path.display()
        ));
        report.new_fingerprint = current.fingerprint();
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    let _ = std::fs::remove_file(&rekey_path);
    if !opens(state_dir, &current)? {
        return Err(RotateError::Store(StoreError::WrongKey));
    }
    report.old_fingerprint = current.fingerprint();
    let stop = |s: Step| stop_after == Some(s);

    // 1. Prepare: data keys recorded under the current key; no WAL; counts for the check.
    let db_path = state_dir.join(DB_FILE);
    let expected = {
        let mut conn = db::open(&db_path, &current.derive(KeyPurpose::Database), false, 2048)?;
        // Run as root on a packaged box: a WAL or shared-memory file created just now must stay
        // usable by the daemon's user should we be interrupted before they are removed below.
        for side in ["index.db-wal", "index.db-shm"] {
            let p = state_dir.join(side);
            if p.exists() {
                super::match_owner(&p, &db_path).map_err(io_at(&p))?;
            }
        }
        db::migrate(&mut conn, crate::store::MIGRATIONS)?;
        let dk = crate::store::data_keys(&conn, &current)?;
        conn.execute(
            "INSERT OR IGNORE INTO kv (ns, key, value) \
             VALUES (?1, 'blob', ?2), (?1, 'audit', ?3), (?1, 'ledger-signing', ?4)",
            rusqlite::params![
                crate::store::KEYS_NS,
                &dk.blobs.expose()[..],
                &dk.audit.expose()[..],
                &dk.ledger_signing.expose()[..]
            ],
        )?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;")?;
        let c = super::backup::counts(&conn)?;
        conn.close().map_err(|(_, e)| e)?;
        c
    };
    if state_dir.join("index.db-wal").exists() {
        return Err(RotateError::Verify("the database still has a WAL; is a reader open?".into()));
    }
    let _ = std::fs::remove_file(state_dir.join("index.db-shm"));
    if stop(Step::Prepared) {
        return Ok(report);
    }

    // 2. The new key, next to the current one.
    let new = Key::random();
    loc.write_new_at(&next_path, &new)?;
    if stop(Step::NewKeyWritten) {
        return Ok(report);
    }

    // 3. A re-keyed copy (the live file is never re-keyed in place).
    let undo = |e: RotateError| {
        let _ = std::fs::remove_file(&rekey_path);
        let _ = super::destroy_file(&next_path);
        e
    };
    rekey_copy(&db_path, &rekey_path, &current, &new).map_err(undo)?;
    if stop(Step::Rekeyed) {
        return Ok(report);
    }

    // 4. Verify: the new key opens the copy and everything in it.
    report.blobs_verified = verify(state_dir, &rekey_path, &new, &expected).map_err(undo)?;
    if stop(Step::Verified) {
        return Ok(report);
    }

    // 5. Commit point: the database switches to the new key.
    super::match_owner(&rekey_path, &db_path).map_err(io_at(&rekey_path))?;
    std::fs::rename(&rekey_path, &db_path).map_err(io_at(&db_path))?;
    crate::store::fsync_dir(state_dir).map_err(io_at(state_dir))?;
    if stop(Step::DatabaseSwitched) {
        return Ok(report);
    }

    // 6. The key location switches; 7. the old key is destroyed.
    switch_key_file(loc, &next_path, &old_path)?;
    if stop(Step::KeySwitched) {
        return Ok(report);
    }
    super::destroy_file(&old_path).map_err(io_at(&old_path))?;

    // Final proof: the key now in P opens the store, the old one does not.
    let now = loc.read_at(loc.path())?;
    if !opens(state_dir, &now)? || opens(state_dir, &current)? {
        return Err(RotateError::Verify("the final check of the key location failed".into()));
    }
    report.rotated = true;
    report.new_fingerprint = new.fingerprint();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// `link(P, P.old)` then `rename(P.next, P)`: at every instant `P` holds a whole key.
fn switch_key_file(loc: &KeyLocation, next: &Path, old: &Path) -> Result<(), RotateError> {
    let p = loc.path();
    if !old.exists() {
        std::fs::hard_link(p, old).map_err(io_at(old))?;
    }
    std::fs::rename(next, p).map_err(io_at(p))?;
    crate::store::fsync_parent(p).map_err(io_at(p))
}

fn raw_open(path: &Path, key: &Key) -> Result<Connection, RotateError> {
    Ok(db::open_keyed(path, key, rusqlite::OpenFlags::default())?)
}

fn rekey_copy(db_path: &Path, copy: &Path, current: &Key, new: &Key) -> Result<(), RotateError> {
    std::fs::copy(db_path, copy).map_err(io_at(copy))?;
    let conn = raw_open(copy, &current.derive(KeyPurpose::Database))?;
    conn.execute_batch("PRAGMA journal_mode = DELETE;")?;
    let new_db = new.derive(KeyPurpose::Database);
    let pragma =
        zeroize::Zeroizing::new(format!("PRAGMA rekey = \"x'{}'\";", hex::encode(new_db.expose())));
    conn.execute_batch(&pragma)?;
    drop(pragma);
    conn.close().map_err(|(_, e)| e)?;
    std::fs::File::open(copy).and_then(|f| f.sync_all()).map_err(io_at(copy))?;
    Ok(())
}

fn verify(
    state_dir: &Path,
    copy: &Path,
    new: &Key,
    expected: &super::backup::Counts,
) -> Result<u64, RotateError> {
    let v = |m: String| RotateError::Verify(m);
    let conn = db::open(copy, &new.derive(KeyPurpose::Database), true, 2048)
        .map_err(|e| v(format!("the new key does not open the copy: {e}")))?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(v(format!("integrity_check: {check}")));
    }
    let got = super::backup::counts(&conn)?;
    if &got != expected {
        return Err(v(format!("counts differ: {got:?} vs {expected:?}")));
    }
    let dk = crate::store::data_keys(&conn, new)?;
    let has_stored: bool = conn.query_row(
        "SELECT count(*) = 3 FROM kv WHERE ns = ?1 AND key IN ('blob', 'audit', 'ledger-signing')",
        [crate::store::KEYS_NS],
        |r| r.get(0),
    )?;
    if !has_stored {
        return Err(v("the data keys were not recorded".into()));
    }
    let blobs = BlobStore::open(&state_dir.join(BLOB_DIR), dk.blobs).map_err(io_at(state_dir))?;
    let mut n = 0u64;
    let mut stmt = conn.prepare("SELECT id FROM blobs")?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    for id in ids {
        let id = id?;
        let bid = crate::store::BlobId::parse(&id).ok_or_else(|| v(format!("bad blob id {id}")))?;
        // The first chunk is authenticated with the blob's key: proof the data key is right.
        let mut one = [0u8; 1];
        let mut r = blobs.open_reader(&bid).map_err(|e| v(format!("blob {id}: {e}")))?;
        std::io::Read::read(&mut r, &mut one).map_err(|e| v(format!("blob {id}: {e}")))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};

    fn make_store(dir: &Path) -> (KeyLocation, Vec<(String, Vec<u8>)>) {
        let state = dir.join("state");
        let keyfile = dir.join("master.key");
        let key = Key::random();
        keys::write_new_key_file(&keyfile, &key).unwrap();
        let store = crate::store::open(&state, &key, &StoreOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut blobs = Vec::new();
        for i in 0..5 {
            let data = vec![i as u8; 70_000 + i];
            let meta = store.blobs().put(&data).unwrap();
            let name = format!("k{i}");
            let (n2, m2) = (name.clone(), meta.clone());
            rt.block_on(store.write(move |tx| {
                tx.insert_blob(&m2)?;
                tx.kv_put("test", &n2, b"v", Some(&m2.id))
            }))
            .unwrap();
            blobs.push((name, data));
        }
        store.close();
        (KeyLocation::File(keyfile), blobs)
    }

    fn check_all(dir: &Path, loc: &KeyLocation, blobs: &[(String, Vec<u8>)]) {
        let key = keys::load_key_file(loc.path()).unwrap();
        let store = crate::store::open(&dir.join("state"), &key, &StoreOptions::default()).unwrap();
        for (name, data) in blobs {
            let (_, id) = store.read_blocking(|c| Store::kv_get(c, "test", name)).unwrap().unwrap();
            assert_eq!(&store.blobs().get(&id.unwrap()).unwrap(), data);
        }
    }

    #[test]
    fn rotation_keeps_everything_and_the_old_key_stops_working() {
        let dir = tempfile::tempdir().unwrap();
        let (loc, blobs) = make_store(dir.path());
        let old = keys::load_key_file(loc.path()).unwrap();
        let r = rotate(&dir.path().join("state"), &loc, None).unwrap();
        assert!(r.rotated && r.blobs_verified == 5, "{r:?}");
        assert!(!opens(&dir.path().join("state"), &old).unwrap());
        assert!(!loc.next_path().exists() && !loc.old_path().exists());
        check_all(dir.path(), &loc, &blobs);
        // A second rotation (data keys already recorded) works the same.
        assert!(rotate(&dir.path().join("state"), &loc, None).unwrap().rotated);
        check_all(dir.path(), &loc, &blobs);
    }

    #[test]
    fn a_crash_after_any_step_leaves_a_store_one_key_opens_and_a_rerun_finishes() {
        for step in [
            Step::Prepared,
            Step::NewKeyWritten,
            Step::Rekeyed,
            Step::Verified,
            Step::DatabaseSwitched,
            Step::KeySwitched,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let (loc, blobs) = make_store(dir.path());
            let old = keys::load_key_file(loc.path()).unwrap();
            rotate(&state, &loc, Some(step)).unwrap();
            let in_p = keys::load_key_file(loc.path()).unwrap();
            let in_next = keys::load_key_file(&loc.next_path()).ok();
            let opens_p = opens(&state, &in_p).unwrap();
            let opens_next = in_next.as_ref().is_some_and(|k| opens(&state, k).unwrap());
            assert!(opens_p ^ opens_next, "{step:?}: exactly one of P, P.next opens the store");
            assert_eq!(
                interrupted_rotation_key(&state, loc.path()).is_some(),
                opens_next,
                "{step:?}: the daemon's diagnosis"
            );
            let r = rotate(&state, &loc, None).unwrap();
            assert!(r.recovered.is_some() || step == Step::Prepared, "{step:?}: {r:?}");
            let now = keys::load_key_file(loc.path()).unwrap();
            assert!(opens(&state, &now).unwrap(), "{step:?}");
            assert!(!opens(&state, &old).unwrap(), "{step:?}: the old key still opens");
            assert!(!loc.next_path().exists() && !loc.old_path().exists(), "{step:?}");
            assert!(!state.join(REKEY_FILE).exists(), "{step:?}");
            check_all(dir.path(), &loc, &blobs);
        }
    }
}
