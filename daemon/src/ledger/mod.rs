//! The integrity ledger: a tamper-evident, append-only RFC 6962 Merkle log of every audit event
//! and every stored record version (FHIR resource version, DICOM instance), with signed
//! checkpoints and inclusion proofs.
//!
//! # What a leaf is
//! A leaf is 34 bytes: format version `0x01`, the record kind (`1` audit event, `2` FHIR
//! version, `3` DICOM instance) and an HMAC-SHA256 *commitment* to the record's canonical encoding
//! (length-prefixed fields, row id included) under a key derived from the master key
//! (`KeyPurpose::AuditHmac`). A leaf therefore reveals nothing about the patient, and only this box
//! can recompute it from the record: that is how `audit check` and `$verify` notice a record changed
//! in the database.
//!
//! # Invariants
//! - A leaf is appended by the same store transaction as the record it commits to
//!   ([`append`] is called from `fhir::storage`, `dicom::index`): no record without its leaf.
//! - Leaf positions are dense (0, 1, 2, …) and never change; the database is the source of truth,
//!   the in-memory [`tree::Tree`] a cache rebuilt from it.
//! - Checkpoints are signed with an Ed25519 key derived from the master key (C2SP signed note) and
//!   made every `ledger.checkpoint_interval_secs` when the log grew, offline.

pub mod anchor;
pub mod check;
pub mod rpc;

pub use hms_edge_ledger::{LEAF_LEN, LEAF_VERSION, LeafKind, Record, note, proof, tree};

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::keys::Key;
use crate::store::{Store, StoreError, WriteTx, now_ms};
use note::{Checkpoint, NoteSigner, VKey};
use proof::ProofDoc;
use tree::{Hash, Tree};

/// Schema of the ledger (store migration 6).
pub const MIGRATION: &str = r#"
    CREATE TABLE ledger_leaves (
        idx   INTEGER PRIMARY KEY,
        kind  TEXT NOT NULL,
        ref   INTEGER NOT NULL,
        leaf  BLOB NOT NULL,
        UNIQUE (kind, ref)
    ) STRICT;
    CREATE TABLE ledger_checkpoints (
        size  INTEGER PRIMARY KEY,
        root  BLOB NOT NULL,
        at    INTEGER NOT NULL,
        note  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE ledger_anchors (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        size          INTEGER NOT NULL,
        root          BLOB NOT NULL,
        chain_id      INTEGER NOT NULL,
        contract      TEXT NOT NULL,
        nonce         INTEGER,
        tx_hash       TEXT,
        raw_tx        TEXT,
        block_number  INTEGER,
        state         TEXT NOT NULL DEFAULT 'sent',
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    ) STRICT;
"#;

/// Appends the leaf of `rec` in the caller's transaction; returns its position.
pub fn append(tx: &WriteTx<'_>, rec: &Record) -> Result<u64, StoreError> {
    let leaf = rec.leaf(tx.ledger_key().expose());
    let sql = tx.sql();
    let idx: i64 = sql
        .prepare_cached("SELECT coalesce(max(idx) + 1, 0) FROM ledger_leaves")?
        .query_row([], |r| r.get(0))?;
    sql.prepare_cached("INSERT INTO ledger_leaves (idx, kind, ref, leaf) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![idx, rec.kind().as_str(), rec.row_id(), &leaf[..]])?;
    metrics::counter!("hms_ledger_leaves_total").increment(1);
    Ok(idx as u64)
}

/// Loads the record a leaf refers to (None: the row is gone).
pub fn load_record(
    conn: &Connection,
    kind: LeafKind,
    row_id: i64,
) -> Result<Option<Record>, StoreError> {
    Ok(match kind {
        LeafKind::Audit => conn
            .prepare_cached(
                "SELECT seq, at, actor, source, action, entity, outcome, detail
                 FROM audit_events WHERE seq = ?1",
            )?
            .query_row([row_id], audit_row)
            .optional()?,
        LeafKind::Fhir => conn
            .prepare_cached(
                "SELECT seq, rtype, id, version, last_updated, method, json
                 FROM fhir_history WHERE seq = ?1",
            )?
            .query_row([row_id], fhir_row)
            .optional()?,
        LeafKind::Dicom => conn
            .prepare_cached(&format!("{DICOM_SELECT} WHERE pk = ?1"))?
            .query_row([row_id], dicom_row)
            .optional()?,
    })
}

const DICOM_SELECT: &str = "SELECT pk, sop_uid, version, series_uid, sop_class_uid,
    transfer_syntax, size, dataset_sha256, blob FROM dicom_instances";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    crate::audit::row(r).map(Record::from)
}

fn fhir_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record::Fhir {
        seq: r.get(0)?,
        rtype: r.get(1)?,
        id: r.get(2)?,
        version: r.get(3)?,
        last_updated: r.get(4)?,
        method: r.get(5)?,
        json: r.get(6)?,
    })
}

fn dicom_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record::Dicom {
        pk: r.get(0)?,
        sop_uid: r.get(1)?,
        version: r.get(2)?,
        series_uid: r.get(3)?,
        sop_class_uid: r.get(4)?,
        transfer_syntax: r.get(5)?,
        size: r.get(6)?,
        dataset_sha256: r.get(7)?,
        blob: r.get(8)?,
    })
}

/// Why a proof could not be given.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    NotFound(String),
    /// The record or the log no longer matches what the ledger committed to.
    #[error("integrity check failed: {0}")]
    Tampered(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Store(e.into())
    }
}

/// What a proof is asked for.
#[derive(Debug, Clone)]
pub enum Subject {
    Fhir {
        rtype: String,
        id: String,
        version: i64,
    },
    /// Newest version unless given.
    Dicom {
        sop_uid: String,
        version: Option<i64>,
    },
}

/// A stored signed checkpoint.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: Hash,
    pub at_ms: i64,
    pub note: String,
}

/// The ledger as the daemon runs it: the signer and the tree cache.
pub struct Ledger {
    origin: String,
    signer: NoteSigner,
    tree: Mutex<Tree>,
    /// Serializes checkpoint making (one signer at a time).
    checkpointing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Ledger {
    /// `signing_seed`: [`crate::store::Store::ledger_signing_key`].
    pub fn new(signing_seed: &Key, origin: &str) -> Arc<Ledger> {
        Arc::new(Ledger {
            origin: origin.to_owned(),
            signer: NoteSigner::from_seed(signing_seed.expose(), origin),
            tree: Mutex::new(Tree::pruned()),
            checkpointing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The checkpoint verifier key (public).
    pub fn vkey(&self) -> String {
        self.signer.vkey()
    }

    /// Brings the tree cache up to the committed log; returns its size.
    fn sync_tree(&self, conn: &Connection) -> Result<u64, StoreError> {
        let mut tree = self.tree.lock().expect("tree lock");
        sync_tree_from(&mut tree, conn)
    }

    /// On first start after the upgrade that added the ledger: commits every record stored before
    /// it (in table order), so that nothing stays outside the log.
    pub async fn adopt_existing(&self, store: &Store) -> Result<u64, StoreError> {
        store
            .write(|tx| {
                let sql = tx.sql();
                let n: i64 =
                    sql.query_row("SELECT EXISTS (SELECT 1 FROM ledger_leaves)", [], |r| r.get(0))?;
                if n > 0 {
                    return Ok(0);
                }
                let mut recs = Vec::new();
                let dicom_q = format!("{DICOM_SELECT} ORDER BY pk");
                type RowFn = fn(&rusqlite::Row<'_>) -> rusqlite::Result<Record>;
                let sources: [(&str, RowFn); 3] = [
                    (
                        "SELECT seq, rtype, id, version, last_updated, method, json
                         FROM fhir_history ORDER BY seq",
                        fhir_row,
                    ),
                    (&dicom_q, dicom_row),
                    (
                        "SELECT seq, at, actor, source, action, entity, outcome, detail
                         FROM audit_events ORDER BY seq",
                        audit_row,
                    ),
                ];
                for (q, f) in sources {
                    let mut stmt = sql.prepare(q)?;
                    for r in stmt.query_map([], f)? {
                        recs.push(r?);
                    }
                }
                for r in &recs {
                    append(tx, r)?;
                }
                Ok(recs.len() as u64)
            })
            .await
    }

    /// The newest stored checkpoint.
    pub fn latest_checkpoint(conn: &Connection) -> Result<Option<StoredCheckpoint>, StoreError> {
        Ok(conn
            .query_row(
                "SELECT size, root, at, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                checkpoint_row,
            )
            .optional()?)
    }

    /// The smallest stored checkpoint that includes leaf `idx`.
    pub fn first_checkpoint_covering(
        conn: &Connection,
        idx: u64,
    ) -> Result<Option<StoredCheckpoint>, StoreError> {
        Ok(conn
            .query_row(
                "SELECT size, root, at, note FROM ledger_checkpoints WHERE size > ?1
                 ORDER BY size LIMIT 1",
                [idx as i64],
                checkpoint_row,
            )
            .optional()?)
    }

    /// Makes and stores a signed checkpoint of the current log unless the newest one already
    /// covers it; returns the newest checkpoint (None: the log is empty).
    pub async fn checkpoint(
        self: &Arc<Self>,
        store: &Arc<Store>,
    ) -> Result<Option<StoredCheckpoint>, StoreError> {
        let _one = self.checkpointing.lock().await;
        let this = self.clone();
        let (size, root, latest) = store
            .read(move |c| {
                let size = this.sync_tree(c)?;
                let load = |s, e| load_leaf_hashes(c, s, e);
                let root = this.tree.lock().expect("tree lock").root_with(size, &load)?;
                Ok((size, root, Ledger::latest_checkpoint(c)?))
            })
            .await?;
        if size == 0 || latest.as_ref().is_some_and(|l| l.size >= size) {
            return Ok(latest);
        }
        let note = self.signer.sign(&Checkpoint { origin: self.origin.clone(), size, root });
        let cp = StoredCheckpoint { size, root, at_ms: now_ms(), note };
        let row = cp.clone();
        store
            .write(move |tx| {
                tx.sql().execute(
                    "INSERT OR IGNORE INTO ledger_checkpoints (size, root, at, note)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![row.size as i64, &row.root[..], row.at_ms, row.note],
                )?;
                Ok(())
            })
            .await?;
        metrics::gauge!("hms_ledger_checkpoint_size").set(size as f64);
        tracing::info!(size, "ledger checkpoint signed");
        Ok(Some(cp))
    }

    /// A proof document for a stored record version: checks the record still matches its leaf
    /// and the log its checkpoint, then proves inclusion in the first checkpoint covering the leaf
    /// (made now when none does yet) and, when a confirmed chain anchor covers that checkpoint,
    /// consistency from it to the newest such anchor.
    pub async fn prove(
        self: &Arc<Self>,
        store: &Arc<Store>,
        subject: Subject,
    ) -> Result<ProofDoc, LedgerError> {
        let key = store.audit_key().clone();
        let this = self.clone();
        let (rec, idx, leaf) = store
            .read_as(move |c| -> Result<_, LedgerError> {
                let found = find_subject(c, &subject)?;
                this.sync_tree(c).map_err(tampered_if_rejected)?;
                Ok(found)
            })
            .await?
            .ok_or_else(|| LedgerError::NotFound("no such record".into()))
            .and_then(|(rec, leaf)| match leaf {
                None => Err(LedgerError::NotFound(format!("{} has no ledger leaf", rec.name()))),
                Some((idx, leaf)) => Ok((rec, idx, leaf)),
            })?;
        if rec.leaf(key.expose())[..] != leaf[..] {
            return Err(LedgerError::Tampered(format!(
                "{} does not match its ledger leaf #{idx}: the stored record was changed",
                rec.name()
            )));
        }
        // The first checkpoint that covers the leaf (the same one every time: a record's proof
        // is stable), made now when none does yet.
        let first = store.read(move |c| Ledger::first_checkpoint_covering(c, idx)).await?;
        let cp = match first {
            Some(cp) => cp,
            None => self.checkpoint(store).await?.filter(|c| c.size > idx).ok_or_else(|| {
                LedgerError::Tampered(format!("no checkpoint can cover leaf #{idx}"))
            })?,
        };
        let this = self.clone();
        let (cp_size, want) = (cp.size, tree::leaf_hash(&leaf));
        let (path, root) = store
            .read(move |c| {
                let load = |s, e| load_leaf_hashes(c, s, e);
                let tree = this.tree.lock().expect("tree lock");
                if tree.len() < cp_size {
                    return Ok(Err(format!(
                        "the log has {} leaves but its checkpoint says {cp_size}",
                        tree.len()
                    )));
                }
                if tree.leaf_with(idx, &load)? != Some(want) {
                    return Ok(Err(format!("ledger leaf #{idx} changed")));
                }
                let path = tree.inclusion_proof_with(idx, cp_size, &load)?;
                Ok(Ok((path, tree.root_with(cp_size, &load)?)))
            })
            .await
            .map_err(tampered_if_rejected)?
            .map_err(LedgerError::Tampered)?;
        if root != cp.root {
            return Err(LedgerError::Tampered(format!(
                "the log no longer matches its signed checkpoint at size {}",
                cp.size
            )));
        }
        let mut doc = ProofDoc::new(rec.name(), &leaf, idx, cp.size, &path, &cp.note, &self.vkey());
        // The newest confirmed chain anchor covering the checkpoint, with the consistency proof
        // from the checkpoint to the anchored tree.
        let min = cp.size;
        let anchored = store.read(move |c| anchor::newest_confirmed(c, min)).await?;
        if let Some(a) = anchored {
            let this = self.clone();
            let (a_size, a_root) = (a.size, a.root.clone());
            let consistency = store
                .read(move |c| {
                    let load = |s, e| load_leaf_hashes(c, s, e);
                    let tree = this.tree.lock().expect("tree lock");
                    if a_size > tree.len() || hex::encode(tree.root_with(a_size, &load)?) != a_root
                    {
                        return Ok(None);
                    }
                    Ok(Some(if a_size > cp_size {
                        tree.consistency_proof_with(cp_size, a_size, &load)?
                    } else {
                        Vec::new()
                    }))
                })
                .await
                .map_err(tampered_if_rejected)?
                .ok_or_else(|| {
                    LedgerError::Tampered(format!(
                        "the log no longer matches its chain anchor at size {}",
                        a.size
                    ))
                })?;
            let consistency: Vec<String> = consistency.iter().map(hex::encode).collect();
            doc.anchor = serde_json::json!({
                "chain_id": a.chain_id,
                "contract": a.contract,
                "tx_hash": a.tx_hash,
                "block_number": a.block_number,
                "log_id": hex::encode(anchor::log_id(&self.origin)),
                "size": a.size,
                "root": a.root,
                "consistency": consistency,
            });
        }
        doc.verify(None).map_err(LedgerError::Tampered)?;
        Ok(doc)
    }

    /// Makes a checkpoint if the log grew and describes the newest one (for the agent).
    pub async fn checkpoint_info(
        self: &Arc<Self>,
        store: &Arc<Store>,
    ) -> Result<anchor::CheckpointInfo, StoreError> {
        let cp = self.checkpoint(store).await?;
        Ok(anchor::CheckpointInfo {
            origin: self.origin.clone(),
            log_id: hex::encode(anchor::log_id(&self.origin)),
            size: cp.as_ref().map_or(0, |c| c.size),
            root: cp.map_or_else(String::new, |c| hex::encode(c.root)),
        })
    }

    /// Makes checkpoints every `interval` until cancelled (and one at shutdown).
    pub async fn checkpointer(
        self: Arc<Self>,
        store: Arc<Store>,
        interval: std::time::Duration,
        token: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = token.cancelled() => break,
            }
            if let Err(e) = self.checkpoint(&store).await {
                tracing::warn!(error = %e, "ledger checkpoint failed");
            }
        }
        // The last leaves before a shutdown get their checkpoint too.
        if let Err(e) = self.checkpoint(&store).await {
            tracing::warn!(error = %e, "final ledger checkpoint failed");
        }
    }

    /// Verifier key parsed (for checks in this process).
    pub fn vkey_parsed(&self) -> VKey {
        VKey::parse(&self.vkey()).expect("own key parses")
    }
}

fn sync_tree_from(tree: &mut Tree, conn: &Connection) -> Result<u64, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT idx, leaf FROM ledger_leaves WHERE idx >= ?1 ORDER BY idx")?;
    let mut rows = stmt.query([tree.len() as i64])?;
    while let Some(r) = rows.next()? {
        let idx: i64 = r.get(0)?;
        let leaf: Vec<u8> = r.get(1)?;
        if idx as u64 != tree.len() {
            return Err(StoreError::Rejected(format!(
                "ledger leaf #{} is missing (next stored is #{idx})",
                tree.len()
            )));
        }
        tree.push_leaf(&leaf);
    }
    Ok(tree.len())
}

/// A read of the log refuses (`Rejected`) only for a hole in it: tampering.
fn tampered_if_rejected(e: StoreError) -> LedgerError {
    match e {
        StoreError::Rejected(m) => LedgerError::Tampered(m),
        e => e.into(),
    }
}

/// The leaf hashes `[start, end)` read back from the log (for the pruned tree's proofs).
fn load_leaf_hashes(conn: &Connection, start: u64, end: u64) -> Result<Vec<Hash>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, leaf FROM ledger_leaves WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query([start as i64, end as i64])?;
    let mut out = Vec::with_capacity((end - start) as usize);
    while let Some(r) = rows.next()? {
        let idx: i64 = r.get(0)?;
        let leaf: Vec<u8> = r.get(1)?;
        if idx as u64 != start + out.len() as u64 {
            break;
        }
        out.push(tree::leaf_hash(&leaf));
    }
    if out.len() as u64 != end - start {
        return Err(StoreError::Rejected(format!(
            "ledger leaf #{} is missing",
            start + out.len() as u64
        )));
    }
    Ok(out)
}

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
    let root: Vec<u8> = r.get(1)?;
    Ok(StoredCheckpoint {
        size: r.get::<_, i64>(0)? as u64,
        root: root.try_into().unwrap_or([0; 32]),
        at_ms: r.get(2)?,
        note: r.get(3)?,
    })
}

type Found = Option<(Record, Option<(u64, Vec<u8>)>)>;

fn find_subject(conn: &Connection, s: &Subject) -> Result<Found, LedgerError> {
    let rec = match s {
        Subject::Fhir { rtype, id, version } => conn
            .prepare_cached(
                "SELECT seq, rtype, id, version, last_updated, method, json
                 FROM fhir_history WHERE rtype = ?1 AND id = ?2 AND version = ?3",
            )?
            .query_row(params![rtype, id, version], fhir_row)
            .optional()?,
        Subject::Dicom { sop_uid, version } => conn
            .prepare_cached(&format!(
                "{DICOM_SELECT} WHERE sop_uid = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY version DESC LIMIT 1"
            ))?
            .query_row(params![sop_uid, version], dicom_row)
            .optional()?,
    };
    let Some(rec) = rec else { return Ok(None) };
    let leaf = conn
        .prepare_cached("SELECT idx, leaf FROM ledger_leaves WHERE kind = ?1 AND ref = ?2")?
        .query_row(params![rec.kind().as_str(), rec.row_id()], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    Ok(Some((rec, leaf)))
}
