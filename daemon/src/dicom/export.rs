//! Export of a stored instance as the Part 10 file we wrote on receipt: our File Meta
//! Information followed by the data set exactly as received. Used by
//! `hms-edge dicom export SOP_UID FILE` and, through the internal API, by the agent's forwarder.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use super::index::{self, StoredInstance};
use crate::keys::Key;
use crate::store::{BLOB_DIR, BlobStore, DB_FILE, Store, StoreError};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no stored instance with SOP Instance UID {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Looks up the newest (or the given) version of an instance.
pub fn lookup(
    store: &Store,
    sop_uid: &str,
    version: Option<i64>,
) -> Result<StoredInstance, ExportError> {
    store
        .read_blocking(|conn| index::find_instance(conn, sop_uid, version))?
        .ok_or_else(|| ExportError::NotFound(sop_uid.to_owned()))
}

/// Streams the Part 10 file of an instance into `out` (blocking; bounded memory). Every chunk is
/// authenticated before it is written: a tampered blob fails with an integrity error.
pub fn export_to_writer(
    store: &Store,
    sop_uid: &str,
    version: Option<i64>,
    out: &mut impl Write,
) -> Result<StoredInstance, ExportError> {
    let inst = lookup(store, sop_uid, version)?;
    let mut reader = store.blobs().open_reader(&inst.blob)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(inst)
}

/// Writes the instance to `dest` atomically (temp file, fsync, rename): a partial file never
/// appears under the final name.
pub fn export_to_file(
    store: &Store,
    sop_uid: &str,
    version: Option<i64>,
    dest: &Path,
) -> Result<StoredInstance, ExportError> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let mut tmp = tempfile_in(&dir)?;
    let inst = match export_to_writer(store, sop_uid, version, &mut tmp.1) {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp.0);
            return Err(e);
        }
    };
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, dest)?;
    Ok(inst)
}

fn tempfile_in(dir: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let mut rnd = [0u8; 8];
    rand::fill(&mut rnd);
    let path = dir.join(format!(".hms-export-{}.tmp", hex::encode(rnd)));
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, f))
}

/// Async wrapper: the whole Part 10 file in memory (for the internal API's small objects and
/// tests; large instances should use [`export_to_writer`] on a blocking thread).
pub async fn export_bytes(
    store: &Arc<Store>,
    sop_uid: &str,
    version: Option<i64>,
) -> Result<(StoredInstance, Vec<u8>), ExportError> {
    let store = store.clone();
    let sop = sop_uid.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let inst = export_to_writer(&store, &sop, version, &mut out)?;
        Ok((inst, out))
    })
    .await
    .map_err(|e| ExportError::Io(std::io::Error::other(e.to_string())))?
}

/// Export without opening the store (the `hms-edge dicom export` command, which may run while
/// hms-edged is serving): one database connection that only appends the audit event, the blob
/// folder, and in particular no orphan sweep — a blob the running daemon has written but not yet committed must
/// not be touched. Returns what was exported.
pub fn export_offline(
    state_dir: &Path,
    master: &Key,
    sop_uid: &str,
    version: Option<i64>,
    dest: &Path,
) -> Result<StoredInstance, ExportError> {
    let (mut conn, keys) = crate::store::offline::open(state_dir, master, false)?;
    let inst = index::find_instance(&conn, sop_uid, version)?
        .ok_or_else(|| ExportError::NotFound(sop_uid.to_owned()))?;
    let blobs = BlobStore::open(&state_dir.join(BLOB_DIR), keys.blobs)?;
    // Audited before the first byte is written: an export that fails half-way is still an
    // access attempt.
    crate::audit::append_with(
        &mut conn,
        &keys.audit,
        &crate::audit::AuditRecord::local(
            "dicom-export",
            &format!("dicom:{sop_uid}"),
            "success",
            Some(format!("version {} to {}", inst.version, dest.display())),
        ),
    )?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    drop(conn);
    crate::ops::fix_sqlite_owners(&state_dir.join(DB_FILE), state_dir);
    let (tmp_path, mut tmp) = tempfile_in(&dir)?;
    let result = (|| -> Result<(), ExportError> {
        let mut reader = blobs.open_reader(&inst.blob)?;
        std::io::copy(&mut reader, &mut tmp)?;
        tmp.sync_all()?;
        std::fs::rename(&tmp_path, dest)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result.map(|()| inst)
}
