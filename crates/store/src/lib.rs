//! The encrypted store owned by `hms-edged`: a SQLCipher index, encrypted blob files, and the
//! change log (outbox) — behind one durability API.
//!
//! # The durability API
//! [`Store::write`] runs a closure inside a database transaction on the single writer thread and
//! resolves only after that transaction is committed **and fsynced**. Concurrent writers are
//! folded into one transaction and one fsync (group commit): while one batch is being synced, the
//! next batch queues up. Each write runs in its own savepoint, so one failing write rolls back
//! alone and never half-applies. This is how invariant 1 ("acknowledged means durable") is kept
//! without paying one fsync per write.
//!
//! Blobs are written and fsynced by the caller *before* the transaction that references them
//! ([`blob::BlobWriter::finish`]); a crash in between leaves an unreferenced blob file, which
//! [`Store::open_with_schema`] removes. So after any crash: every committed row has its blob, and no blob
//! lingers without a row.

pub mod blob;
pub mod db;
pub mod offline;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};

pub use blob::{BlobId, BlobMeta, BlobReader, BlobStore, BlobWriter};
use hms_edge_config::keys::{Key, KeyPurpose};

/// Database file name inside the state folder.
pub const DB_FILE: &str = "index.db";
/// Blob folder name inside the state folder.
pub const BLOB_DIR: &str = "blobs";

/// Errors of the store. Messages never contain key material or record content.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("wrong key or not an hms-edge store")]
    WrongKey,
    #[error("store schema version {found} is newer than this build supports ({supported})")]
    TooNew { found: usize, supported: usize },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("commit failed: {0}")]
    Commit(CommitError),
    #[error("the store is shutting down")]
    Closed,
    #[error("{0}")]
    Rejected(String),
    /// The write's (or read's) own code panicked; a write was rolled back alone, and the writer
    /// and reader threads go on.
    #[error("internal error in the store operation (a write was rolled back)")]
    Panicked,
    /// The writer thread is gone: nothing can be written until the daemon restarts.
    #[error("the store writer has stopped")]
    WriterDown,
}

impl StoreError {
    /// True when the failure is the disk being full (callers map it to "out of resources").
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Commit(c) => c.kind == CommitFailure::DiskFull,
            _ => false,
        }
    }

    /// True when the disk failed under the write (an I/O error, a failed commit or sync): a
    /// transient condition for the caller (HTTP 503, DIMSE A700), never a bug of the request.
    pub fn is_io_failure(&self) -> bool {
        match self {
            StoreError::Io(_) | StoreError::Commit(_) => true,
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::CannotOpen
            ),
            _ => false,
        }
    }

    /// True when SQL ran past its deadline ([`READ_DEADLINE`], [`WRITE_DEADLINE`]) and was
    /// interrupted: the caller answers "busy, try later" (HTTP 503, DIMSE A700).
    pub fn is_deadline(&self) -> bool {
        match self {
            StoreError::Db(e) => is_interrupted(e),
            StoreError::Commit(c) => c.kind == CommitFailure::Interrupted,
            _ => false,
        }
    }
}

/// Why a group commit failed, for every write of its round: the kind callers branch on (never
/// the message), and SQLite's message for the log and the error text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CommitError {
    pub kind: CommitFailure,
    pub message: String,
}

/// The kinds of [`CommitError`]: each maps to its own answer (507/A700 "disk full", 503 "busy",
/// 503 "the disk failed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFailure {
    /// SQLite found the file system full.
    DiskFull,
    /// A write ran past [`WRITE_DEADLINE`] and the round was rolled back.
    Interrupted,
    /// Any other failure of the transaction or its fsync.
    Io,
}

impl CommitError {
    fn of(e: &rusqlite::Error) -> Self {
        let kind = match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
                CommitFailure::DiskFull
            }
            e if is_interrupted(e) => CommitFailure::Interrupted,
            _ => CommitFailure::Io,
        };
        CommitError { kind, message: e.to_string() }
    }
}

/// True for SQLite's "interrupted" error, which a [`Deadline`] raises.
pub fn is_interrupted(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::OperationInterrupted)
}

/// Longest the SQL of one read job may run before SQLite interrupts it. Reads that take longer
/// are a hostile or broken query: they fail with a clear "busy" error instead of holding one of
/// the few reader threads (and with it every chart and the health probe).
pub const READ_DEADLINE: Duration = Duration::from_secs(15);
/// Longest the SQL of one write closure may run (a conditional create's search, say) before it
/// is interrupted and that write alone fails; the writer thread serves everyone.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// How long the health probe (`/readyz`, watchdog) waits for its no-op write and its read.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite virtual-machine steps between deadline checks (a check is one clock read).
const DEADLINE_CHECK_OPS: i32 = 20_000;

/// A per-connection SQL deadline, checked by SQLite's progress handler.
#[derive(Clone)]
struct Deadline {
    base: Instant,
    /// Milliseconds after `base` at which running SQL is interrupted; 0 = no deadline.
    at_ms: Arc<AtomicU64>,
}

impl Deadline {
    fn install(conn: &mut Connection) -> Result<Deadline, StoreError> {
        let d = Deadline { base: Instant::now(), at_ms: Arc::new(AtomicU64::new(0)) };
        let check = d.clone();
        conn.progress_handler(
            DEADLINE_CHECK_OPS,
            Some(move || {
                let at = check.at_ms.load(Ordering::Relaxed);
                at != 0 && check.base.elapsed().as_millis() as u64 >= at
            }),
        )?;
        Ok(d)
    }

    fn arm(&self, within: Duration) {
        let at = (self.base.elapsed() + within).as_millis() as u64;
        self.at_ms.store(at.max(1), Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.at_ms.store(0, Ordering::Relaxed);
    }
}

/// One entry for the change log: what changed, for the sync agent to push upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Subsystem: `fhir`, `dicom`, …
    pub kind: String,
    /// What changed: `Patient/123`, a SOP Instance UID, …
    pub entity: String,
    /// `create`, `update`, `delete`, `store`, …
    pub op: String,
    /// Version of the entity after the change, when it has one.
    pub version: Option<String>,
    /// Small JSON detail for the consumer (never PHI beyond what the entity id already is).
    pub detail: Option<String>,
}

/// A change-log row as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: i64,
    pub created_at_ms: i64,
    pub change: Change,
    pub state: String,
}

/// The transaction handed to a write closure: plain SQL plus the store's shared tables.
pub struct WriteTx<'a> {
    tx: &'a Transaction<'a>,
    ledger_key: &'a Key,
}

impl<'a> WriteTx<'a> {
    /// Wraps a transaction opened outside the store's writer (the command-line tools).
    pub fn new(tx: &'a Transaction<'a>, ledger_key: &'a Key) -> Self {
        WriteTx { tx, ledger_key }
    }

    /// The underlying transaction, for module-specific tables.
    pub fn sql(&self) -> &Transaction<'a> {
        self.tx
    }

    /// The HMAC key of the integrity ledger's record commitments (the daemon's `ledger`).
    pub fn ledger_key(&self) -> &Key {
        self.ledger_key
    }

    /// Appends a change to the outbox in this transaction; returns its sequence number.
    /// Sequence numbers only grow (AUTOINCREMENT never reuses one, even after deletes).
    pub fn append_change(&self, change: &Change) -> Result<i64, StoreError> {
        self.tx.execute(
            "INSERT INTO outbox (created_at, kind, entity, op, version, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now_ms(), change.kind, change.entity, change.op, change.version, change.detail],
        )?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Records a finished (already fsynced) blob so rows may reference it.
    pub fn insert_blob(&self, meta: &BlobMeta) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO blobs (id, size, sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![meta.id.as_str(), meta.size as i64, meta.sha256, now_ms()],
        )?;
        Ok(())
    }

    /// Offloads a blob: its row stays (with its size and checksum) and is marked as not held
    /// here; its file is removed once this transaction is durable (by
    /// [`Store::finish_offloads`], or the next open after a crash). Returns whether it was held.
    pub fn offload_blob(&self, id: &BlobId) -> Result<bool, StoreError> {
        let n = self
            .tx
            .prepare_cached(
                "UPDATE blobs SET offloaded_at = ?2 WHERE id = ?1 AND offloaded_at IS NULL",
            )?
            .execute(params![id.as_str(), now_ms()])?;
        if n == 1 {
            self.tx
                .prepare_cached("INSERT OR IGNORE INTO blob_removals (id) VALUES (?1)")?
                .execute([id.as_str()])?;
        }
        Ok(n == 1)
    }

    /// Marks an offloaded blob held again: its file (same id, already written and fsynced) is
    /// back. Returns whether it was offloaded.
    pub fn restore_blob(&self, id: &BlobId) -> Result<bool, StoreError> {
        self.tx
            .prepare_cached("DELETE FROM blob_removals WHERE id = ?1")?
            .execute([id.as_str()])?;
        Ok(self
            .tx
            .prepare_cached(
                "UPDATE blobs SET offloaded_at = NULL WHERE id = ?1 AND offloaded_at IS NOT NULL",
            )?
            .execute([id.as_str()])?
            == 1)
    }

    /// Sets a small key/value record, optionally owning a blob.
    pub fn kv_put(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        blob: Option<&BlobId>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO kv (ns, key, value, blob) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, blob = excluded.blob",
            params![ns, key, value, blob.map(|b| b.as_str())],
        )?;
        Ok(())
    }
}

type Completion = Box<dyn FnOnce(Result<(), CommitError>) + Send>;

/// A queued write. `run` executes it in the batch transaction, says whether it succeeded and hands
/// back what to do once the commit outcome is known; `abort` fails it without running.
trait PendingWrite: Send {
    fn run(self: Box<Self>, tx: &WriteTx<'_>) -> (bool, Completion);
    fn abort(self: Box<Self>, reason: CommitError);
}

struct WriteJob<T, E, F> {
    f: F,
    done: oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> PendingWrite for WriteJob<T, E, F>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
    F: FnOnce(&WriteTx<'_>) -> Result<T, E> + Send + 'static,
{
    fn run(self: Box<Self>, tx: &WriteTx<'_>) -> (bool, Completion) {
        let WriteJob { f, done } = *self;
        // A panic in one write's code fails that write only (its savepoint is rolled back);
        // the writer thread keeps serving every other write of the batch and after it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tx)))
            .unwrap_or_else(|_| {
                tracing::error!("a write panicked; it was rolled back and refused");
                Err(E::from(StoreError::Panicked))
            });
        match result {
            Ok(v) => (
                true,
                Box::new(move |commit: Result<(), CommitError>| {
                    let _ =
                        done.send(commit.map(|()| v).map_err(|m| E::from(StoreError::Commit(m))));
                }),
            ),
            Err(e) => (
                false,
                Box::new(move |_| {
                    let _ = done.send(Err(e));
                }),
            ),
        }
    }

    fn abort(self: Box<Self>, reason: CommitError) {
        let _ = self.done.send(Err(E::from(StoreError::Commit(reason))));
    }
}

type Job = Box<dyn PendingWrite>;

/// A read to run on one of the reader threads' connections.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// One reader thread: runs read jobs on its own connection until the job channel closes.
///
/// Why threads of our own rather than `spawn_blocking`: tokio's blocking pool starts a thread
/// whenever none is idle at that instant, and under a steady read load it grew to ~40 threads,
/// each with its own allocator heap (RSS) and each connection hopping between them. A fixed
/// set of threads keeps one connection per thread and its memory in one place.
fn reader_loop(
    conn: Connection,
    deadline: Deadline,
    jobs: Arc<Mutex<std::sync::mpsc::Receiver<ReadJob>>>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panicking read fails that request (its result channel is dropped), not the thread.
        deadline.arm(READ_DEADLINE);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn)));
        deadline.disarm();
    }
}

/// Marks the writer as gone when its thread ends for any reason, a panic included.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!("the store writer thread died; writes fail until the daemon restarts");
        }
    }
}

/// A key/value record: its value and the blob it owns, if any.
pub type KvRecord = (Vec<u8>, Option<BlobId>);

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Writes acknowledged (committed and synced).
    pub writes: AtomicU64,
    /// Writes rolled back (their closure failed).
    pub write_errors: AtomicU64,
    /// Commits (= fsync batches) performed.
    pub commits: AtomicU64,
}

/// The store: open once per process and share (`Arc`).
pub struct Store {
    root: PathBuf,
    blobs: BlobStore,
    writer: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// False once the writer thread has ended (closed, or died): `/readyz` and the watchdog
    /// read it so that a store that cannot write is never reported healthy.
    writer_alive: Arc<AtomicBool>,
    /// The health probe's own read connection, so a probe never queues behind slow requests.
    probe_reader: Arc<Mutex<Connection>>,
    /// Jobs for the reader threads (one read-only connection each).
    reader_jobs: Mutex<Option<std::sync::mpsc::Sender<ReadJob>>>,
    reader_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The connection of [`Store::read_blocking`] (CLI, tests, blocking helpers), whose
    /// closures borrow their caller's data and so cannot be sent to a reader thread.
    blocking_reader: Mutex<Option<Connection>>,
    stats: Arc<StoreStats>,
    audit_key: Key,
    ledger_signing_key: Key,
    /// Admission of writes against the free-space floors (see [`space`]).
    space: space::SpaceGate,
    /// Whether the schema has [`db::BLOB_OFFLOAD`] (the daemon's has; a bare test schema not).
    offload: bool,
    /// Serializes file removals of offloaded blobs with the return of a blob under its old id
    /// (see [`Store::lock_offloads`]).
    offload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Tuning for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub group_commit_max_batch: usize,
    pub db_cache_kib: u32,
    pub db_reader_cache_kib: u32,
    pub db_readers: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            group_commit_max_batch: hms_edge_config::DEFAULT_GROUP_COMMIT_MAX_BATCH as usize,
            db_cache_kib: hms_edge_config::DEFAULT_DB_CACHE_KIB,
            db_reader_cache_kib: hms_edge_config::DEFAULT_DB_READER_CACHE_KIB,
            db_readers: hms_edge_config::DEFAULT_DB_READERS as usize,
        }
    }
}

impl Store {
    /// Opens (creating on first use) the store in `root` with the master key: checks the key,
    /// runs the pending migrations of `schema` ([`db::FOUNDATION`] first, then the domains'),
    /// removes blob files no row references, and starts the group-commit writer.
    pub fn open_with_schema(
        root: &Path,
        master: &Key,
        opts: &StoreOptions,
        schema: &[&str],
    ) -> Result<Arc<Store>, StoreError> {
        std::fs::create_dir_all(root)?;
        let db_key = master.derive(KeyPurpose::Database);
        let db_path = root.join(DB_FILE);
        let mut conn = db::open(&db_path, &db_key, false, opts.db_cache_kib)?;
        db::migrate(&mut conn, schema)?;
        let keys = data_keys(&conn, master)?;
        let blobs = BlobStore::open(&root.join(BLOB_DIR), keys.blobs)?;
        sweep_orphans(&conn, &blobs)?;
        let offload = has_column(&conn, "blobs", "offloaded_at")?;
        if offload {
            let pending = pending_removals(&conn)?;
            remove_files(&blobs, &pending)?;
            conn.execute("DELETE FROM blob_removals", [])?;
            if !pending.is_empty() {
                tracing::info!(
                    files = pending.len(),
                    "finished blob removals cut short by a crash"
                );
            }
        }
        let mut readers = Vec::with_capacity(opts.db_readers);
        for _ in 0..opts.db_readers.max(1) {
            let mut c = db::open(&db_path, &db_key, true, opts.db_reader_cache_kib)?;
            let d = Deadline::install(&mut c)?;
            readers.push((c, d));
        }
        let blocking_reader = db::open(&db_path, &db_key, true, opts.db_reader_cache_kib)?;
        let probe_reader = db::open(&db_path, &db_key, true, 64)?;
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<ReadJob>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut reader_threads = Vec::with_capacity(readers.len());
        for (i, (conn, deadline)) in readers.into_iter().enumerate() {
            let rx = jobs_rx.clone();
            reader_threads.push(
                std::thread::Builder::new()
                    .name(format!("store-reader-{i}"))
                    .spawn(move || reader_loop(conn, deadline, rx))?,
            );
        }
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let max_batch = opts.group_commit_max_batch.max(1);
        let thread_stats = stats.clone();
        let ledger_key = keys.audit.clone();
        let writer_deadline = Deadline::install(&mut conn)?;
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = WriterAlive(writer_alive.clone());
        let handle = std::thread::Builder::new().name("store-writer".into()).spawn(move || {
            let _alive = alive;
            writer_loop(conn, rx, max_batch, &thread_stats, &ledger_key, &writer_deadline)
        })?;
        Ok(Arc::new(Store {
            root: root.to_owned(),
            blobs,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            writer_alive,
            probe_reader: Arc::new(Mutex::new(probe_reader)),
            reader_jobs: Mutex::new(Some(jobs_tx)),
            reader_threads: Mutex::new(reader_threads),
            blocking_reader: Mutex::new(Some(blocking_reader)),
            stats,
            audit_key: keys.audit,
            ledger_signing_key: keys.ledger_signing,
            space: space::SpaceGate::new(root),
            offload,
            offload_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Admission of writes against the free-space floors.
    pub fn space(&self) -> &space::SpaceGate {
        &self.space
    }

    /// Removes the files of blobs offloaded by committed transactions
    /// ([`WriteTx::offload_blob`]), then forgets them. Safe to repeat; what a crash interrupts,
    /// the next open finishes. Returns how many files were removed.
    pub async fn finish_offloads(self: &Arc<Self>) -> Result<usize, StoreError> {
        let _guard = self.offload_lock.lock().await;
        self.finish_offloads_locked().await
    }

    /// Holds off [`Store::finish_offloads`] while a blob comes back under its old id: a removal
    /// listed before the return must not remove the returned file. Call
    /// [`Store::finish_offloads_locked`] first, under the guard.
    pub async fn lock_offloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.offload_lock.lock().await
    }

    /// [`Store::finish_offloads`] for a caller that holds [`Store::lock_offloads`].
    pub async fn finish_offloads_locked(self: &Arc<Self>) -> Result<usize, StoreError> {
        if !self.offload {
            return Ok(0);
        }
        let ids = self.read(pending_removals).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let me = self.clone();
        let list = ids.clone();
        tokio::task::spawn_blocking(move || remove_files(&me.blobs, &list))
            .await
            .map_err(|_| StoreError::Panicked)??;
        let n = ids.len();
        self.write(move |tx| {
            let mut del = tx.sql().prepare_cached("DELETE FROM blob_removals WHERE id = ?1")?;
            for id in &ids {
                del.execute([id.as_str()])?;
            }
            Ok(())
        })
        .await?;
        Ok(n)
    }

    /// The HMAC key for audit events and record commitments (ledger).
    pub fn audit_key(&self) -> &Key {
        &self.audit_key
    }

    /// The seed of the ledger's checkpoint-signing key (see [`DataKeys::ledger_signing`]).
    pub fn ledger_signing_key(&self) -> &Key {
        &self.ledger_signing_key
    }

    /// The durability API: runs `f` in a transaction and resolves once it is committed and
    /// fsynced (shared with concurrent writes). If `f` fails, its effects are rolled back and the
    /// error returned; other writes in the same batch are unaffected.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_as(f).await
    }

    /// [`Store::write`] for a closure that fails with its own layer's error `E` (a FHIR
    /// validation error, a sync conflict): the error comes back as it was, typed, with no boxing
    /// or downcast on the way; the store's own failures (commit, disk full, shutdown) reach the
    /// caller through `E: From<StoreError>`.
    pub async fn write_as<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&WriteTx<'_>) -> Result<T, E> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(WriteJob { f, done: done_tx });
        let sender = self.writer.lock().expect("writer lock").clone().ok_or(StoreError::Closed)?;
        sender.send(job).map_err(|_| self.gone())?;
        done_rx.await.map_err(|_| E::from(self.gone()))?
    }

    /// Why a write could not reach the writer: closed on purpose, or the thread died.
    fn gone(&self) -> StoreError {
        if self.writer.lock().map(|w| w.is_none()).unwrap_or(true) {
            StoreError::Closed
        } else {
            StoreError::WriterDown
        }
    }

    /// Whether the writer thread still runs.
    pub fn writer_alive(&self) -> bool {
        self.writer_alive.load(Ordering::SeqCst)
    }

    /// The health probe of `/readyz` and the systemd watchdog: the writer thread is alive, a
    /// no-op write goes through group commit, and a read answers on the probe's own connection
    /// (never queued behind requests). Each step is bounded by [`PROBE_TIMEOUT`]; the error
    /// says which step failed.
    pub async fn probe(self: &Arc<Self>) -> Result<(), String> {
        if !self.writer_alive() {
            return Err("store writer has stopped".into());
        }
        match tokio::time::timeout(PROBE_TIMEOUT, self.write(|_| Ok(()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("store write probe failed: {e}")),
            Err(_) => return Err("store write probe timed out".into()),
        }
        let conn = self.probe_reader.clone();
        let read = tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            c.query_row("SELECT count(*) FROM hms_meta", [], |r| r.get::<_, i64>(0))
        });
        match tokio::time::timeout(PROBE_TIMEOUT, read).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("store read probe failed: {e}")),
            Ok(Err(_)) => Err("store read probe failed".into()),
            Err(_) => Err("store read probe timed out".into()),
        }
    }

    /// Runs `f` on a read-only connection (a snapshot of committed data) off the async runtime.
    pub async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.read_as(f).await
    }

    /// [`Store::read`] for a closure that fails with its own layer's error (see
    /// [`Store::write_as`]).
    pub async fn read_as<T, E, F>(self: &Arc<Self>, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit_read(Box::new(move |conn| {
            let _ = tx.send(f(conn));
        }))?;
        // The job was dropped unanswered: its closure panicked on the reader thread.
        rx.await.map_err(|_| E::from(StoreError::Panicked))?
    }

    fn submit_read(&self, job: ReadJob) -> Result<(), StoreError> {
        let sender = self.reader_jobs.lock().expect("readers lock").clone();
        sender.ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)
    }

    /// Blocking variant of [`Store::read`] for non-async callers (CLI, tests).
    pub fn read_blocking<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.blocking_reader.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_ref().ok_or(StoreError::Closed)?;
        f(conn)
    }

    /// Reads a key/value record.
    pub fn kv_get(conn: &Connection, ns: &str, key: &str) -> Result<Option<KvRecord>, StoreError> {
        Ok(conn
            .query_row("SELECT value, blob FROM kv WHERE ns = ?1 AND key = ?2", [ns, key], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<String>>(1)?))
            })
            .optional()?
            .map(|(v, b)| (v, b.as_deref().and_then(BlobId::parse))))
    }

    /// Change-log entries after `after_seq`, oldest first.
    pub fn outbox_since(
        conn: &Connection,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, created_at, kind, entity, op, version, detail, state FROM outbox
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_seq, limit as i64], |r| {
            Ok(OutboxEntry {
                seq: r.get(0)?,
                created_at_ms: r.get(1)?,
                change: Change {
                    kind: r.get(2)?,
                    entity: r.get(3)?,
                    op: r.get(4)?,
                    version: r.get(5)?,
                    detail: r.get(6)?,
                },
                state: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sizes for `/metrics`: (database + WAL bytes, blob count, blob plaintext bytes).
    pub fn sizes(conn: &Connection, root: &Path) -> Result<(u64, u64, u64), StoreError> {
        let file_len =
            |name: &str| std::fs::metadata(root.join(name)).map(|m| m.len()).unwrap_or(0);
        let db_bytes = file_len(DB_FILE) + file_len(&format!("{DB_FILE}-wal"));
        let held = if has_column(conn, "blobs", "offloaded_at")? {
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs WHERE offloaded_at IS NULL"
        } else {
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
        };
        let (count, bytes): (i64, i64) =
            conn.query_row(held, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((db_bytes, count as u64, bytes as u64))
    }

    /// Stops accepting writes, lets the queued ones commit, and waits for the writer to finish.
    /// Writes submitted afterwards fail with [`StoreError::Closed`].
    pub fn close(&self) {
        // Readers go first so that the writer is the last connection: its close checkpoints the
        // WAL into the database file and removes it.
        self.reader_jobs.lock().expect("readers lock").take();
        for h in std::mem::take(&mut *self.reader_threads.lock().expect("readers lock")) {
            let _ = h.join();
        }
        self.blocking_reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.writer.lock().expect("writer lock").take();
        if let Some(h) = self.writer_thread.lock().expect("writer lock").take() {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// The group committer: take every queued write (up to `max_batch`), run each in a savepoint of
/// one transaction, commit once (one WAL fsync), then complete them all. If the transaction itself
/// fails (disk full, I/O error), the writes that ran in it get the error; queued writes that had
/// not run yet fail with it too.
fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
    stats: &StoreStats,
    ledger_key: &Key,
    deadline: &Deadline,
) {
    let mut queue: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.blocking_recv() {
                Some(job) => queue.push_back(job),
                None => {
                    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                        tracing::warn!(error = %e, "final WAL checkpoint failed");
                    }
                    return;
                }
            }
        }
        while queue.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut completions: Vec<Completion> = Vec::with_capacity(queue.len());
        let mut failed = 0usize;
        let outcome = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            while completions.len() < max_batch {
                let Some(job) = queue.pop_front() else { break };
                tx.execute_batch("SAVEPOINT w")?;
                deadline.arm(WRITE_DEADLINE);
                let (ok, completion) = job.run(&WriteTx { tx: &tx, ledger_key });
                deadline.disarm();
                completions.push(completion);
                if tx.is_autocommit() {
                    // SQLite rolled the whole transaction back (an interrupted INSERT/UPDATE
                    // does that): fail the round rather than go on outside a transaction.
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
                        Some("a write was interrupted and the batch rolled back".into()),
                    ));
                }
                if !ok {
                    // A failed write leaves no trace; the others in the batch go on.
                    failed += 1;
                    tx.execute_batch("ROLLBACK TO w")?;
                }
                tx.execute_batch("RELEASE w")?;
            }
            tx.commit()
        })();
        outcome_metrics(stats, &outcome, completions.len() - failed, failed, started);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, writes = completions.len(), "store commit failed");
            // Fail the whole round, including writes not yet run: never spin on a broken disk.
            for job in queue.drain(..) {
                job.abort(CommitError::of(e));
            }
        }
        let result = outcome.map_err(|e| CommitError::of(&e));
        for completion in completions.drain(..) {
            completion(result.clone());
        }
    }
}

fn outcome_metrics(
    stats: &StoreStats,
    outcome: &Result<(), rusqlite::Error>,
    n: usize,
    failed: usize,
    started: Instant,
) -> Duration {
    let took = started.elapsed();
    stats.write_errors.fetch_add(failed as u64, Ordering::Relaxed);
    if outcome.is_ok() {
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("hms_store_commits_total").increment(1);
        metrics::counter!("hms_store_writes_total").increment(n as u64);
        metrics::histogram!("hms_store_commit_batch_size").record(n as f64);
        metrics::histogram!("hms_store_commit_seconds").record(took.as_secs_f64());
    } else {
        stats.write_errors.fetch_add(n as u64, Ordering::Relaxed);
    }
    took
}

/// `kv` namespace holding the store's data keys once a master-key rotation ran.
pub const KEYS_NS: &str = "keys";

/// The keys the store's content is encrypted or authenticated with, apart from the database key.
#[derive(Debug, Clone)]
pub struct DataKeys {
    /// Key-derivation key of the blob files.
    pub blobs: Key,
    /// HMAC key of audit events and record commitments.
    pub audit: Key,
    /// Seed of the Ed25519 key that signs the ledger's checkpoints: kept across master-key
    /// rotations so that checkpoints signed before a rotation still verify.
    pub ledger_signing: Key,
}

/// The data keys of a store. A store that never had its master key rotated derives them from the
/// master key (HKDF). `hms-edge rotate-key` first records them in `kv` (namespace [`KEYS_NS`]),
/// inside the SQLCipher database, then re-keys the database: the data keys are thereby re-wrapped
/// under the new master key and the blob files never need re-encrypting.
pub fn data_keys(conn: &Connection, master: &Key) -> Result<DataKeys, StoreError> {
    let stored = |name: &str, purpose: KeyPurpose| -> Result<Key, StoreError> {
        match Store::kv_get(conn, KEYS_NS, name)? {
            Some((bytes, _)) => {
                let raw = zeroize::Zeroizing::new(bytes);
                let arr: [u8; hms_edge_config::keys::KEY_LEN] = raw[..]
                    .try_into()
                    .map_err(|_| StoreError::Rejected(format!("stored {name} key is malformed")))?;
                Ok(Key::from_bytes(arr))
            }
            None => Ok(master.derive(purpose)),
        }
    };
    Ok(DataKeys {
        blobs: stored("blob", KeyPurpose::Blobs)?,
        audit: stored("audit", KeyPurpose::AuditHmac)?,
        ledger_signing: stored("ledger-signing", KeyPurpose::LedgerSigning)?,
    })
}

/// Whether `table` has `column` (a schema that lacks a later migration).
pub fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    Ok(column_exists(conn, table, column)?)
}

/// The ids of the blobs whose file is held here (not offloaded), in id order: what a backup
/// copies and a restore needs.
pub fn held_blob_ids(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let sql = if column_exists(conn, "blobs", "offloaded_at")? {
        "SELECT id FROM blobs WHERE offloaded_at IS NULL ORDER BY id"
    } else {
        "SELECT id FROM blobs ORDER BY id"
    };
    conn.prepare(sql)?.query_map([], |r| r.get(0))?.collect()
}

/// Whether a row references the blob `id` and its file should be here.
pub fn blob_is_held(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    let sql = if column_exists(conn, "blobs", "offloaded_at")? {
        "SELECT 1 FROM blobs WHERE id = ?1 AND offloaded_at IS NULL"
    } else {
        "SELECT 1 FROM blobs WHERE id = ?1"
    };
    conn.prepare_cached(sql)?.exists([id])
}

fn column_exists(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists([table, column])
}

/// Blob files whose removal is committed but maybe not done.
fn pending_removals(conn: &Connection) -> Result<Vec<BlobId>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id FROM blob_removals")?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for id in ids {
        out.extend(BlobId::parse(&id?));
    }
    Ok(out)
}

/// Removes blob files (already gone is fine) and makes the removals durable.
fn remove_files(blobs: &BlobStore, ids: &[BlobId]) -> Result<(), StoreError> {
    let mut dirs = std::collections::BTreeSet::new();
    for id in ids {
        blobs.remove(id)?;
        if let Some(d) = blobs.path_of(id).parent() {
            dirs.insert(d.to_owned());
        }
    }
    for d in dirs {
        fsync_dir(&d)?;
    }
    Ok(())
}

/// Removes blob files that no `blobs` row references (written before a crash, never committed).
fn sweep_orphans(conn: &Connection, blobs: &BlobStore) -> Result<usize, StoreError> {
    let mut removed = 0;
    let mut stmt = conn.prepare("SELECT 1 FROM blobs WHERE id = ?1")?;
    for id in blobs.list_and_clean_tmp()? {
        if !stmt.exists([id.as_str()])? {
            blobs.remove(&id)?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed blob files left by an interrupted write");
    }
    Ok(removed)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub use hms_edge_config::fsync::{fsync_dir, fsync_parent};
