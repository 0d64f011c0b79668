//! `hms-edge audit check`: recomputes the whole log from the stored records and compares it with
//! the stored leaves and the signed checkpoints. Reports every record that was modified, deleted,
//! moved or added behind the ledger's back, by name and log position.

use rusqlite::Connection;

use super::note::VKey;
use super::tree::Tree;
use super::{LEAF_LEN, LeafKind, load_record};
use crate::keys::Key;
use crate::store::StoreError;

/// The outcome of a check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Leaves in the log.
    pub leaves: u64,
    /// Signed checkpoints checked.
    pub checkpoints: u64,
    /// Confirmed chain anchors checked.
    pub anchors: u64,
    /// Size of the newest valid checkpoint.
    pub checked_size: u64,
    /// One line per problem; empty means the store matches the log and its checkpoints.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Runs the check on a (read-only) connection with the ledger HMAC key and the verifier key, in
/// one read transaction: a consistent snapshot even while hms-edged keeps writing.
pub fn run(conn: &Connection, key: &Key, vkey: &VKey) -> Result<Report, StoreError> {
    conn.execute_batch("BEGIN")?;
    let out = run_in_snapshot(conn, key, vkey);
    let _ = conn.execute_batch("COMMIT");
    out
}

fn run_in_snapshot(conn: &Connection, key: &Key, vkey: &VKey) -> Result<Report, StoreError> {
    let mut report = Report::default();
    // The log as recomputed from the records; where a record is gone, its stored leaf stands in.
    // The roots to compare, taken while the leaves stream in: the tree keeps only its upper
    // levels (a full tree would hold 64 bytes a leaf), and the root at its current size is all
    // a pruned tree can give without reading leaves back.
    let mut stmt = conn.prepare("SELECT size, note FROM ledger_checkpoints ORDER BY size")?;
    let cps: Vec<(i64, String)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    drop(stmt);
    let anchors = super::anchor::confirmed(conn)?;
    let wanted: std::collections::BTreeSet<u64> =
        cps.iter().map(|(s, _)| *s as u64).chain(anchors.iter().map(|a| a.size)).collect();
    let mut roots = std::collections::HashMap::new();
    let mut recomputed = Tree::pruned();
    // Appends one recomputed leaf, noting the root when a checkpoint or anchor has this size.
    let mut push = |tree: &mut Tree, leaf: &[u8]| {
        tree.push_leaf(leaf);
        if wanted.contains(&tree.len()) {
            roots.insert(tree.len(), tree.current_root());
        }
    };
    let mut stmt = conn.prepare("SELECT idx, kind, ref, leaf FROM ledger_leaves ORDER BY idx")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let idx = r.get::<_, i64>(0)? as u64;
        let kind_s: String = r.get(1)?;
        let row_id: i64 = r.get(2)?;
        let leaf: Vec<u8> = r.get(3)?;
        while recomputed.len() < idx {
            report.problems.push(format!("leaf #{}: missing from the log", recomputed.len()));
            push(&mut recomputed, &[]);
        }
        let Some(kind) = LeafKind::parse(&kind_s) else {
            report.problems.push(format!("leaf #{idx}: unknown kind {kind_s:?}"));
            push(&mut recomputed, &leaf);
            continue;
        };
        match load_record(conn, kind, row_id)? {
            None => {
                report.problems.push(format!(
                    "leaf #{idx}: {} row {row_id} was deleted",
                    match kind {
                        LeafKind::Audit => "audit event",
                        LeafKind::Fhir => "FHIR version",
                        LeafKind::Dicom => "DICOM instance",
                    }
                ));
                push(&mut recomputed, &leaf);
            }
            Some(rec) => {
                let fresh = rec.leaf(key.expose());
                if leaf.len() != LEAF_LEN || fresh[..] != leaf[..] {
                    report.problems.push(format!(
                        "leaf #{idx}: {} was modified (it no longer matches its leaf)",
                        rec.name()
                    ));
                }
                push(&mut recomputed, &fresh);
            }
        }
    }
    drop(rows);
    report.leaves = recomputed.len();

    // Records that have no leaf were added behind the ledger's back.
    for (kind, table, col) in [
        (LeafKind::Audit, "audit_events", "seq"),
        (LeafKind::Fhir, "fhir_history", "seq"),
        (LeafKind::Dicom, "dicom_instances", "pk"),
    ] {
        let mut stmt = conn.prepare(&format!(
            "SELECT {col} FROM {table} WHERE {col} NOT IN
             (SELECT ref FROM ledger_leaves WHERE kind = ?1) ORDER BY {col}"
        ))?;
        let ids: Vec<i64> =
            stmt.query_map([kind.as_str()], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for id in ids {
            let name =
                load_record(conn, kind, id)?.map_or(format!("{table} row {id}"), |r| r.name());
            report.problems.push(format!("{name} is not in the log (added behind the ledger)"));
        }
    }

    // Every signed checkpoint must be a valid signature over the recomputed root at its size.
    for (size, note) in cps {
        report.checkpoints += 1;
        let size = size as u64;
        let cp = match vkey.open(&note) {
            Ok(cp) if cp.size == size => cp,
            Ok(cp) => {
                report.problems.push(format!(
                    "checkpoint at size {size}: its signed note says size {}",
                    cp.size
                ));
                continue;
            }
            Err(e) => {
                report.problems.push(format!("checkpoint at size {size}: {e}"));
                continue;
            }
        };
        if size > recomputed.len() {
            report.problems.push(format!(
                "checkpoint at size {size}: the log has only {} leaves (leaves were removed)",
                recomputed.len()
            ));
            continue;
        }
        if roots.get(&size) != Some(&cp.root) {
            report.problems.push(format!(
                "checkpoint at size {size}: the recomputed log does not match its signed root"
            ));
            continue;
        }
        report.checked_size = size;
    }

    // Every confirmed chain anchor must be the recomputed root at its size (the chain itself is
    // checked by `hms-edge verify --rpc`).
    for a in anchors {
        report.anchors += 1;
        if roots.get(&a.size).is_none_or(|r| hex::encode(r) != a.root) {
            report.problems.push(format!(
                "chain anchor at size {} (transaction {}): the recomputed log does not match the anchored root",
                a.size, a.tx_hash
            ));
        }
    }
    Ok(report)
}
