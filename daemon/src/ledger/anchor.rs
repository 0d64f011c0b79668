//! Chain anchors of ledger checkpoints, as the daemon records them for the agent.
//!
//! The agent (which holds the chain key, never the store key) asks for the newest checkpoint,
//! signs an `anchor(root, treeSize, logId)` transaction, and records it here **before**
//! broadcasting it (nonce, transaction hash, raw transaction), then marks it `confirmed` (with its
//! block) or `dropped`. After a restart it finds its `sent` anchors here and reconciles them with
//! the chain. The daemon refuses an anchor whose root is not the root of one of its own signed
//! checkpoints, so a compromised agent cannot make the box vouch for another log.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{StoreError, WriteTx, now_ms};

pub use hms_edge_wire::anchor::*;

const COLS: &str = "id, size, root, chain_id, contract, nonce, tx_hash, raw_tx, block_number, \
                    state, created_at, updated_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AnchorRow> {
    let root: Vec<u8> = r.get(2)?;
    Ok(AnchorRow {
        id: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        root: hex::encode(root),
        chain_id: r.get::<_, i64>(3)? as u64,
        contract: r.get(4)?,
        nonce: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
        tx_hash: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
        raw_tx: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
        block_number: r.get::<_, Option<i64>>(8)?.map(|b| b as u64),
        state: r.get(9)?,
        created_at_ms: r.get(10)?,
        updated_at_ms: r.get(11)?,
    })
}

/// Records an anchor before it is broadcast. Its root must be one of our signed checkpoints.
pub fn record(tx: &WriteTx<'_>, a: &NewAnchor) -> Result<AnchorRow, StoreError> {
    let sql = tx.sql();
    let root = hex::decode(&a.root).map_err(|_| StoreError::Rejected("root is not hex".into()))?;
    let known: Option<Vec<u8>> = sql
        .query_row("SELECT root FROM ledger_checkpoints WHERE size = ?1", [a.size as i64], |r| {
            r.get(0)
        })
        .optional()?;
    if known.as_deref() != Some(&root[..]) {
        return Err(StoreError::Rejected(format!(
            "no signed checkpoint of size {} with that root",
            a.size
        )));
    }
    let now = now_ms();
    sql.execute(
        "INSERT INTO ledger_anchors (size, root, chain_id, contract, nonce, tx_hash, raw_tx,
             state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'sent', ?8, ?8)",
        params![
            a.size as i64,
            root,
            a.chain_id as i64,
            a.contract.to_ascii_lowercase(),
            a.nonce as i64,
            a.tx_hash.to_ascii_lowercase(),
            a.raw_tx,
            now
        ],
    )?;
    let id = sql.last_insert_rowid();
    Ok(sql.query_row(&format!("SELECT {COLS} FROM ledger_anchors WHERE id = ?1"), [id], row)?)
}

/// Marks an anchor confirmed (with its block) or dropped.
pub fn update(tx: &WriteTx<'_>, id: i64, u: &AnchorUpdate) -> Result<AnchorRow, StoreError> {
    if !matches!(u.state.as_str(), "confirmed" | "dropped") {
        return Err(StoreError::Rejected(format!("state {:?} is not confirmed/dropped", u.state)));
    }
    if u.state == "confirmed" && u.block_number.is_none() {
        return Err(StoreError::Rejected("a confirmed anchor needs its block number".into()));
    }
    let sql = tx.sql();
    let n = sql.execute(
        "UPDATE ledger_anchors SET state = ?2, block_number = ?3, updated_at = ?4 WHERE id = ?1",
        params![id, u.state, u.block_number.map(|b| b as i64), now_ms()],
    )?;
    if n == 0 {
        return Err(StoreError::Rejected(format!("no anchor {id}")));
    }
    Ok(sql.query_row(&format!("SELECT {COLS} FROM ledger_anchors WHERE id = ?1"), [id], row)?)
}

/// Open and newest confirmed anchors.
pub fn view(conn: &Connection) -> Result<AnchorsView, StoreError> {
    let mut stmt = conn
        .prepare(&format!("SELECT {COLS} FROM ledger_anchors WHERE state = 'sent' ORDER BY id"))?;
    let open = stmt.query_map([], row)?.collect::<Result<_, _>>()?;
    Ok(AnchorsView { open, last_confirmed: newest_confirmed(conn, 0)? })
}

/// The newest confirmed anchor of at least `min_size` leaves.
pub fn newest_confirmed(conn: &Connection, min_size: u64) -> Result<Option<AnchorRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {COLS} FROM ledger_anchors WHERE state = 'confirmed' AND size >= ?1
                 ORDER BY size DESC, id DESC LIMIT 1"
            ),
            [min_size as i64],
            row,
        )
        .optional()?)
}

/// Every confirmed anchor (for `audit check`).
pub fn confirmed(conn: &Connection) -> Result<Vec<AnchorRow>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLS} FROM ledger_anchors WHERE state = 'confirmed' ORDER BY size"
    ))?;
    Ok(stmt.query_map([], row)?.collect::<Result<_, _>>()?)
}
