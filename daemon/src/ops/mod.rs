//! Operations on a store for site IT (`hms-edge backup`, `restore`, `rotate-key`) and the
//! state-folder lock that keeps them apart from a running `hms-edged`.
//!
//! `hms-edged` holds an exclusive `flock` on `<state_dir>/hms-edged.lock` for its whole life
//! (a second daemon on the same folder is refused at start). `restore` and `rotate-key` take the
//! same lock, so they refuse to run while the daemon runs and the daemon cannot start in the
//! middle of them. `backup` does not take it: it is online by design.
//!
//! Library code never prints: long operations report progress through a callback.

pub mod backup;
pub mod restore;
pub mod rotate;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Lock file inside the state folder.
pub const LOCK_FILE: &str = "hms-edged.lock";

/// Progress callback: (bytes done, bytes in total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Why the state folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the state folder {dir} is in use (hms-edged is running, or an hms-edge restore or \
         rotate-key is under way); stop it first (systemctl stop hms-edged)"
    )]
    Busy { dir: PathBuf },
    #[error("cannot lock the state folder {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// An exclusive lock on a state folder, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<File>,
}

impl StateLock {
    /// Takes the lock without waiting. The lock file's content is never written, so taking the
    /// lock (or failing to) leaves the state folder byte-identical.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let io_err = |source| LockError::Io { dir: state_dir.to_owned(), source };
        let path = state_dir.join(LOCK_FILE);
        let existed = path.exists();
        // flock works on a read-only descriptor: all the daemon's user gets on a lock file
        // that root's CLI created.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                File::open(&path).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        if !existed {
            match_owner(&path, state_dir).map_err(io_err)?;
        }
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(StateLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(LockError::Busy { dir: state_dir.to_owned() })
            }
            Err((_, e)) => Err(io_err(e.into())),
        }
    }
}

/// When running as root (site IT's CLI on a packaged box), gives `path` to the owner of
/// `like`, so that the daemon's service user can use what root created in its state folder.
pub(crate) fn match_owner(path: &Path, like: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let m = std::fs::metadata(like)?;
    std::os::unix::fs::lchown(path, Some(m.uid()), Some(m.gid()))
}

/// Appends an audit event for an administrative action (backup, restore, rotate-key, audit
/// export) to the store in `state_dir`, through a connection of its own: the daemon may be
/// running (backup) or stopped (restore, rotate-key). Actor: the operating-system user. SQLite
/// files this process created (`-wal`, `-shm` when the daemon is stopped) get the state folder's
/// owner, so the daemon can open them afterwards.
pub fn audit_admin(
    state_dir: &Path,
    master: &crate::keys::Key,
    action: &str,
    entity: &str,
    outcome: &str,
    detail: Option<String>,
) -> Result<i64, crate::store::StoreError> {
    let db_path = state_dir.join(crate::store::DB_FILE);
    let seq = {
        let (mut conn, keys) = crate::store::offline::open(state_dir, master, false)?;
        crate::audit::append_with(
            &mut conn,
            &keys.audit,
            &crate::audit::AuditRecord::local(action, entity, outcome, detail),
        )?
    };
    fix_sqlite_owners(&db_path, state_dir);
    Ok(seq)
}

/// Gives the database's side files the state folder's owner (see [`audit_admin`]).
pub(crate) fn fix_sqlite_owners(db_path: &Path, state_dir: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = db_path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if p.exists() {
            let _ = match_owner(&p, state_dir);
        }
    }
}

/// `match_owner` for a whole tree.
pub(crate) fn match_owner_tree(root: &Path, like: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    match_owner(root, like)?;
    if std::fs::symlink_metadata(root)?.is_dir() {
        for e in std::fs::read_dir(root)? {
            match_owner_tree(&e?.path(), like)?;
        }
    }
    Ok(())
}

/// Copies `src` to a new file `dst` (0600), fsyncs it, and returns (bytes, SHA-256 hex) of what
/// was copied. `on_bytes` is told about every block.
pub(crate) fn copy_hashed(
    src: &Path,
    dst: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> io::Result<(u64, String)> {
    let mut input = File::open(src)?;
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
        on_bytes(n as u64);
    }
    out.sync_all()?;
    Ok((total, hex::encode(hasher.finalize())))
}

/// Creates a private folder (0700) and its parents.
pub(crate) fn private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Overwrites a small secret file with zeros, fsyncs, removes it and fsyncs its folder.
/// (On a copy-on-write or flash file system the old blocks may survive the overwrite; the
/// guarantee that matters is that no name refers to the old key any more.)
pub(crate) fn destroy_file(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(mut f) => {
            let len = f.metadata()?.len();
            f.write_all(&vec![0u8; len as usize])?;
            f.sync_all()?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::remove_file(path)?;
    crate::store::fsync_parent(path)
}

/// `name` with a suffix appended (`master.key` → `master.key.next`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_leaves_the_folder_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        let before = std::fs::read(dir.path().join(LOCK_FILE)).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is in use") && err.contains("stop it first"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(LOCK_FILE)).unwrap(), before);
        drop(held);
        StateLock::acquire(dir.path()).unwrap();
    }
}
