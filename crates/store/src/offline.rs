//! The store's database opened without the daemon, by the command-line tools (`hms-edge audit`,
//! `dicom export`, the audit events of backup/restore/rotate-key): one way to do it, so every
//! tool checks the key the same way and finds the data keys where a rotation recorded them.

use std::path::Path;

use hms_edge_config::keys::{Key, KeyPurpose};
use rusqlite::Connection;

use crate::{DB_FILE, DataKeys, StoreError, data_keys, db};

/// Page cache of a tool's connection, in KiB.
pub const CACHE_KIB: u32 = 8192;

/// Opens the database of the store in `root` (read-only or not) with the master key, and
/// returns it with the store's data keys.
pub fn open(
    root: &Path,
    master: &Key,
    read_only: bool,
) -> Result<(Connection, DataKeys), StoreError> {
    let conn =
        db::open(&root.join(DB_FILE), &master.derive(KeyPurpose::Database), read_only, CACHE_KIB)?;
    let keys = data_keys(&conn, master)?;
    Ok((conn, keys))
}
