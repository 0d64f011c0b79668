//! SQLCipher connections and versioned migrations.
//!
//! The database key is a raw 256-bit key (`x'…'` form: no passphrase stretching, since the key is
//! already random), derived from the master key. A wrong key is detected by a read *before* any
//! pragma that could write (WAL switch, migrations), so a wrong key never modifies the file.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use zeroize::Zeroizing;

use super::StoreError;
use hms_edge_config::keys::Key;

/// Migration 1, the store's own tables: store identity, blobs, the change log (outbox), small
/// key/value state. Every domain appends its migrations after it (the daemon's
/// `store::MIGRATIONS`); `PRAGMA user_version` records how many have run.
pub const FOUNDATION: &str = r#"
    CREATE TABLE hms_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
    CREATE TABLE blobs (
        id         TEXT PRIMARY KEY,
        size       INTEGER NOT NULL,
        sha256     TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE outbox (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at  INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        entity      TEXT NOT NULL,
        op          TEXT NOT NULL,
        version     TEXT,
        detail      TEXT,
        state       TEXT NOT NULL DEFAULT 'pending',
        attempts    INTEGER NOT NULL DEFAULT 0,
        lease_until INTEGER,
        last_error  TEXT
    ) STRICT;
    CREATE INDEX outbox_by_state ON outbox (state, seq);
    CREATE TABLE kv (
        ns    TEXT NOT NULL,
        key   TEXT NOT NULL,
        value BLOB NOT NULL,
        blob  TEXT REFERENCES blobs (id),
        PRIMARY KEY (ns, key)
    ) STRICT;
    "#;

/// A later store migration (appended by the daemon after its domains' first ones): blobs whose
/// file was removed on purpose because a copy elsewhere holds it (an image the cloud PACS
/// confirmed). The row stays — rows that reference the blob keep their meaning and their size
/// and checksum stay known for a recall — with `offloaded_at` set. `blob_removals` lists files
/// whose removal was committed but not yet done: a crash in between is finished at the next open.
pub const BLOB_OFFLOAD: &str = r#"
    ALTER TABLE blobs ADD COLUMN offloaded_at INTEGER;
    CREATE TABLE blob_removals (id TEXT PRIMARY KEY REFERENCES blobs (id)) STRICT;
    "#;

/// Marker row proving a database is an hms-edge store.
pub const STORE_MARKER: (&str, &str) = ("format", "hms-edge-store-v1");

/// Runs SQLite's (and so SQLCipher's) one-time initialisation exactly once per process, before
/// the first connection is opened.
///
/// Why: SQLite marks itself initialised *before* it runs `SQLITE_EXTRA_INIT`, which is where
/// SQLCipher sets itself up. A second thread opening its first connection in that window skips
/// initialisation, and its `PRAGMA key` fails with SQLITE_ERROR ("An error occurred with PRAGMA
/// key or rekey") because SQLCipher is not ready yet. A `Once` makes every other thread wait until
/// the first initialisation, SQLCipher's part included, has finished.
///
/// Before it, memory statistics are switched off: with them on (SQLite's default) every
/// allocation and free of every connection takes one process-wide mutex, which profiles of the
/// FHIR search showed as lock contention between the reader threads. We never read the statistics.
#[allow(unsafe_code)] // the crate's only FFI calls: rusqlite has no safe wrapper for them
fn initialize_once() -> Result<(), StoreError> {
    static INIT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    let rc = *INIT.get_or_init(|| {
        // SAFETY: sqlite3_config is called before sqlite3_initialize, inside the Once, so no
        // other thread uses SQLite yet; MEMSTATUS takes one int argument. If something had
        // initialised SQLite already it returns SQLITE_MISUSE and changes nothing (ignored).
        unsafe {
            let _ = rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::os::raw::c_int,
            );
            // SAFETY: sqlite3_initialize takes no arguments and is safe to call from any thread.
            rusqlite::ffi::sqlite3_initialize()
        }
    });
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rc), None).into())
    }
}

/// Opens a connection at `path` (created if missing) and gives it `key`, without reading yet.
/// Every keyed connection of the store, its backups and key rotation goes through here.
pub fn open_keyed(path: &Path, key: &Key, flags: OpenFlags) -> Result<Connection, StoreError> {
    initialize_once()?;
    let conn = Connection::open_with_flags(path, flags)?;
    // SQLCipher logs decryption failures to stderr by default; we report them ourselves.
    let _ = conn.execute_batch("PRAGMA cipher_log_level = NONE;");
    let pragma = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex::encode(key.expose())));
    conn.execute_batch(&pragma)?;
    Ok(conn)
}

/// Opens one connection and checks the key. `read_only` connections never write.
pub fn open(
    path: &Path,
    key: &Key,
    read_only: bool,
    cache_kib: u32,
) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = open_keyed(path, key, flags)?;
    // Until the key is proven right, closing must not checkpoint a leftover WAL into the file.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    // The first read decrypts page 1: a wrong key or a foreign file fails here, before any write.
    let probe: Result<i64, _> =
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0));
    let tables = match probe {
        Ok(n) => n,
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Err(StoreError::WrongKey);
        }
        Err(e) => return Err(e.into()),
    };
    if tables > 0 {
        let marker: Option<String> = conn
            .query_row("SELECT value FROM hms_meta WHERE key = ?1", [STORE_MARKER.0], |r| r.get(0))
            .ok();
        if marker.as_deref() != Some(STORE_MARKER.1) {
            return Err(StoreError::WrongKey);
        }
    }
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    // Query planner stability: a plan never depends on bound values. Without it SQLite marks
    // some parameters "re-prepare when rebound", and the cached search statements were parsed
    // and planned again on every request (a quarter of the CPU of an Observation search).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // The FHIR write path alone uses ~20 distinct statements (history, current, five index
    // tables, ledger, outbox, searches): the default cache of 16 would re-prepare them.
    conn.set_prepared_statement_cache_capacity(128);
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = ON; PRAGMA cache_size = -{cache_kib}; PRAGMA temp_store = MEMORY;"
    ))?;
    if !read_only {
        // WAL + synchronous=FULL: a commit returns only after the WAL is fsynced.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA wal_autocheckpoint = 4000;",
        )?;
    }
    Ok(conn)
}

/// Runs the pending migrations of `schema` (which starts with [`FOUNDATION`]), each in its own
/// transaction. Never edit a released entry: append a new one. Returns the schema version.
pub fn migrate(conn: &mut Connection, schema: &[&str]) -> Result<usize, StoreError> {
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if current > schema.len() {
        return Err(StoreError::TooNew { found: current, supported: schema.len() });
    }
    for (i, sql) in schema.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if i == 0 {
            tx.execute(
                "INSERT INTO hms_meta (key, value) VALUES (?1, ?2)",
                [STORE_MARKER.0, STORE_MARKER.1],
            )?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(schema.len())
}
