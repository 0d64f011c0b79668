//! FHIR resources in the store: current version pointer, full version history, search index rows.
//! Every function here runs inside a transaction handed out by `Store::write` (or on a read-only
//! connection for reads), so a write and its index rows, history row and outbox entry are atomic.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::FhirError;
use super::index::{self, IndexEntry, IndexValue};
use crate::store::{Change, StoreError, WriteTx, now_ms};

/// Schema of the FHIR cache (appended to the store's migrations).
pub const MIGRATION: &str = r#"
    CREATE TABLE fhir_history (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        rtype        TEXT NOT NULL,
        id           TEXT NOT NULL,
        version      INTEGER NOT NULL,
        last_updated INTEGER NOT NULL,
        method       TEXT NOT NULL,
        json         TEXT,
        UNIQUE (rtype, id, version)
    ) STRICT;
    CREATE INDEX fhir_history_by_time ON fhir_history (last_updated);
    CREATE TABLE fhir_current (
        rtype        TEXT NOT NULL,
        id           TEXT NOT NULL,
        version      INTEGER NOT NULL,
        last_updated INTEGER NOT NULL,
        deleted      INTEGER NOT NULL DEFAULT 0,
        origin       TEXT NOT NULL DEFAULT 'local',
        seq          INTEGER NOT NULL REFERENCES fhir_history (seq),
        PRIMARY KEY (rtype, id)
    ) STRICT;
    CREATE INDEX fhir_current_by_updated ON fhir_current (rtype, last_updated);
    CREATE TABLE fhir_idx_token (
        rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        system TEXT, code TEXT NOT NULL, text TEXT
    ) STRICT;
    CREATE INDEX fhir_idx_token_search ON fhir_idx_token (rtype, param, code, system);
    CREATE INDEX fhir_idx_token_owner ON fhir_idx_token (rtype, id);
    CREATE TABLE fhir_idx_string (
        rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        norm TEXT NOT NULL, exact TEXT NOT NULL
    ) STRICT;
    CREATE INDEX fhir_idx_string_search ON fhir_idx_string (rtype, param, norm);
    CREATE INDEX fhir_idx_string_owner ON fhir_idx_string (rtype, id);
    CREATE TABLE fhir_idx_date (
        rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        lo INTEGER NOT NULL, hi INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX fhir_idx_date_search ON fhir_idx_date (rtype, param, lo);
    CREATE INDEX fhir_idx_date_owner ON fhir_idx_date (rtype, id);
    CREATE TABLE fhir_idx_ref (
        rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        target_type TEXT, target_id TEXT NOT NULL
    ) STRICT;
    CREATE INDEX fhir_idx_ref_search ON fhir_idx_ref (rtype, param, target_id);
    CREATE INDEX fhir_idx_ref_target ON fhir_idx_ref (target_id, target_type);
    CREATE INDEX fhir_idx_ref_owner ON fhir_idx_ref (rtype, id);
    CREATE TABLE fhir_idx_number (
        rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        value REAL NOT NULL, system TEXT, code TEXT
    ) STRICT;
    CREATE INDEX fhir_idx_number_search ON fhir_idx_number (rtype, param, value);
    CREATE INDEX fhir_idx_number_owner ON fhir_idx_number (rtype, id);
    CREATE TABLE audit_events (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        at       INTEGER NOT NULL,
        actor    TEXT NOT NULL,
        source   TEXT NOT NULL,
        action   TEXT NOT NULL,
        entity   TEXT NOT NULL,
        outcome  TEXT NOT NULL,
        detail   TEXT
    ) STRICT;
"#;

/// Covering indexes for search (appended to the store's migrations after [`MIGRATION`]): every
/// index ends with the columns a search reads, so a driving clause (`id` from the value index), a
/// correlated check or a sort key (values from the owner index) never touch the table rows.
/// `fhir_idx_ref_target` is ordered as `$everything` and `_revinclude` read it.
pub const MIGRATION_COVERING: &str = r#"
    DROP INDEX fhir_idx_token_search;
    DROP INDEX fhir_idx_token_owner;
    CREATE INDEX fhir_idx_token_search ON fhir_idx_token (rtype, param, code, system, id);
    CREATE INDEX fhir_idx_token_owner ON fhir_idx_token (rtype, id, param, code, system);
    DROP INDEX fhir_idx_string_search;
    DROP INDEX fhir_idx_string_owner;
    CREATE INDEX fhir_idx_string_search ON fhir_idx_string (rtype, param, norm, id);
    CREATE INDEX fhir_idx_string_owner ON fhir_idx_string (rtype, id, param, norm);
    DROP INDEX fhir_idx_date_search;
    DROP INDEX fhir_idx_date_owner;
    CREATE INDEX fhir_idx_date_search ON fhir_idx_date (rtype, param, lo, hi, id);
    CREATE INDEX fhir_idx_date_owner ON fhir_idx_date (rtype, id, param, lo, hi);
    DROP INDEX fhir_idx_ref_search;
    DROP INDEX fhir_idx_ref_target;
    DROP INDEX fhir_idx_ref_owner;
    CREATE INDEX fhir_idx_ref_search ON fhir_idx_ref (rtype, param, target_id, target_type, id);
    CREATE INDEX fhir_idx_ref_target ON fhir_idx_ref (target_id, target_type, rtype, id, param);
    CREATE INDEX fhir_idx_ref_owner ON fhir_idx_ref (rtype, id, param, target_id, target_type);
    DROP INDEX fhir_idx_number_search;
    DROP INDEX fhir_idx_number_owner;
    CREATE INDEX fhir_idx_number_search ON fhir_idx_number (rtype, param, value, id);
    CREATE INDEX fhir_idx_number_owner ON fhir_idx_number (rtype, id, param, value);
"#;

/// Token parameters also kept per patient in `fhir_idx_patient_token` (see
/// [`MIGRATION_PATIENT_TOKEN`]): the ones a ward view searches within one chart.
pub const PATIENT_TOKEN_PARAMS: &[&str] = &["code", "category"];

/// The backfill of `fhir_idx_patient_token` from the index rows written before it existed:
/// one row per (`patient` reference, token of a [`PATIENT_TOKEN_PARAMS`] parameter) of a
/// resource, with the earliest start and latest end of its `date` parameter. [`write_index`]
/// writes the same rows for every new version (a unit test compares the two).
macro_rules! patient_token_backfill {
    () => {
        r#"
    INSERT INTO fhir_idx_patient_token
        (rtype, id, target_type, target_id, param, system, code, date_lo, date_hi)
    SELECT t.rtype, t.id, r.target_type, r.target_id, t.param, t.system, t.code,
        (SELECT MIN(d.lo) FROM fhir_idx_date d WHERE d.rtype = t.rtype AND d.id = t.id AND d.param = 'date'),
        (SELECT MAX(d.hi) FROM fhir_idx_date d WHERE d.rtype = t.rtype AND d.id = t.id AND d.param = 'date')
    FROM fhir_idx_token t
    JOIN fhir_idx_ref r ON r.rtype = t.rtype AND r.id = t.id AND r.param = 'patient'
    WHERE t.param IN ('code', 'category');
"#
    };
}

/// The backfill alone, for the test that compares it with [`write_index`].
#[cfg(test)]
pub(crate) const PATIENT_TOKEN_BACKFILL: &str = patient_token_backfill!();

/// Patient-compartment token index (appended to the store's migrations after
/// [`MIGRATION_COVERING`]).
///
/// Why: the ward's most frequent search is one chart's values of one code, newest first
/// (`Observation?patient=…&code=…&_sort=-date`). With separate index tables it reads every row
/// of the patient or of the code and probes the other table and the date per row: fine for a
/// patient with a few hundred Observations, tens of milliseconds for a long-lived patient with
/// tens of thousands. This table holds the (patient, token, date) triple of each resource, so
/// that search is one range of one covering index, already holding the sort key.
pub const MIGRATION_PATIENT_TOKEN: &str = concat!(
    r#"
    CREATE TABLE fhir_idx_patient_token (
        rtype TEXT NOT NULL, id TEXT NOT NULL,
        target_type TEXT, target_id TEXT NOT NULL,
        param TEXT NOT NULL, system TEXT, code TEXT NOT NULL,
        date_lo INTEGER, date_hi INTEGER
    ) STRICT;
"#,
    patient_token_backfill!(),
    r#"
    CREATE INDEX fhir_idx_patient_token_search ON fhir_idx_patient_token
        (rtype, target_id, param, code, system, target_type, date_hi, date_lo, id);
    CREATE INDEX fhir_idx_patient_token_owner ON fhir_idx_patient_token (rtype, id);
"#
);

/// The current state of one resource.
#[derive(Debug, Clone)]
pub struct Current {
    pub version: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub json: Option<String>,
}

/// One stored version (history entry).
#[derive(Debug, Clone)]
pub struct Version {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub last_updated: i64,
    pub method: String,
    pub json: Option<String>,
}

/// Reads the current version of a resource (deleted ones included, flagged).
pub fn read_current(
    conn: &Connection,
    rtype: &str,
    id: &str,
) -> Result<Option<Current>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT c.version, c.last_updated, c.deleted, h.json FROM fhir_current c
             JOIN fhir_history h ON h.seq = c.seq WHERE c.rtype = ?1 AND c.id = ?2",
        )?
        .query_row([rtype, id], |r| {
            Ok(Current {
                version: r.get(0)?,
                last_updated: r.get(1)?,
                deleted: r.get::<_, i64>(2)? != 0,
                json: r.get(3)?,
            })
        })
        .optional()?)
}

/// Reads one version.
pub fn read_version(
    conn: &Connection,
    rtype: &str,
    id: &str,
    version: i64,
) -> Result<Option<Version>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT last_updated, method, json FROM fhir_history
             WHERE rtype = ?1 AND id = ?2 AND version = ?3",
        )?
        .query_row(params![rtype, id, version], |r| {
            Ok(Version {
                rtype: rtype.to_owned(),
                id: id.to_owned(),
                version,
                last_updated: r.get(0)?,
                method: r.get(1)?,
                json: r.get(2)?,
            })
        })
        .optional()?)
}

/// History, newest first: of one resource, one type, or the whole system.
pub fn history(
    conn: &Connection,
    rtype: Option<&str>,
    id: Option<&str>,
    since: Option<i64>,
    limit: usize,
) -> Result<Vec<Version>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT rtype, id, version, last_updated, method, json FROM fhir_history
         WHERE (?1 IS NULL OR rtype = ?1) AND (?2 IS NULL OR id = ?2)
           AND (?3 IS NULL OR last_updated >= ?3)
         ORDER BY seq DESC LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![rtype, id, since, limit as i64], |r| {
        Ok(Version {
            rtype: r.get(0)?,
            id: r.get(1)?,
            version: r.get(2)?,
            last_updated: r.get(3)?,
            method: r.get(4)?,
            json: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Result of a create/update/delete.
#[derive(Debug, Clone)]
pub struct Written {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub last_updated: i64,
    /// Stored JSON (None for a delete).
    pub json: Option<String>,
    /// True when the resource did not exist (or was deleted) before.
    pub created: bool,
}

/// Stores a new version of `resource` (which must already carry `resourceType` and `id`).
/// `if_match`: the version the client last saw (version-aware update); mismatch → 412.
/// `origin`: `local` for LAN writes (synced upstream), `upstream` for pulled data (not echoed).
pub fn put(
    tx: &WriteTx<'_>,
    rtype: &str,
    id: &str,
    mut resource: Value,
    if_match: Option<i64>,
    origin: &str,
) -> Result<Written, FhirError> {
    let conn = tx.sql();
    let current = read_current(conn, rtype, id)?;
    if let Some(expected) = if_match {
        match &current {
            Some(c) if c.version == expected && !c.deleted => {}
            Some(c) => {
                return Err(FhirError::PreconditionFailed(format!(
                    "If-Match version {expected} does not match current version {}{}",
                    c.version,
                    if c.deleted { " (deleted)" } else { "" }
                )));
            }
            None => {
                return Err(FhirError::PreconditionFailed(format!(
                    "If-Match given but {rtype}/{id} does not exist"
                )));
            }
        }
    }
    let created = current.as_ref().is_none_or(|c| c.deleted);
    let version = current.as_ref().map_or(1, |c| c.version + 1);
    // lastUpdated never goes backwards for a resource, even if the clock does.
    let last_updated = now_ms().max(current.as_ref().map_or(0, |c| c.last_updated + 1));
    let meta = resource
        .as_object_mut()
        .expect("validated object")
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    let meta = meta.as_object_mut().expect("object");
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(super::date::format_instant(last_updated)));
    let entries = index::extract(rtype, &resource);
    let json = serde_json::to_string(&resource).map_err(|e| FhirError::Internal(e.to_string()))?;
    let method = if created { "POST" } else { "PUT" };
    conn.prepare_cached(
        "INSERT INTO fhir_history (rtype, id, version, last_updated, method, json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![rtype, id, version, last_updated, method, json])?;
    let seq = conn.last_insert_rowid();
    crate::ledger::append(
        tx,
        &crate::ledger::Record::Fhir {
            seq,
            rtype: rtype.into(),
            id: id.into(),
            version,
            last_updated,
            method: method.into(),
            json: Some(json.clone()),
        },
    )?;
    conn.prepare_cached(
        "INSERT INTO fhir_current (rtype, id, version, last_updated, deleted, origin, seq)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)
         ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version,
           last_updated = excluded.last_updated, deleted = 0, origin = excluded.origin,
           seq = excluded.seq",
    )?
    .execute(params![rtype, id, version, last_updated, origin, seq])?;
    if current.is_some() {
        clear_index(conn, rtype, id)?;
    }
    write_index(conn, rtype, id, &entries)?;
    if origin == "local" {
        tx.append_change(&Change {
            kind: "fhir".into(),
            entity: format!("{rtype}/{id}"),
            op: if created { "create" } else { "update" }.into(),
            version: Some(version.to_string()),
            detail: None,
        })?;
    }
    Ok(Written {
        rtype: rtype.into(),
        id: id.into(),
        version,
        last_updated,
        json: Some(json),
        created,
    })
}

/// Deletes a resource (a new, empty version). Deleting what is absent or deleted is a no-op.
pub fn delete(
    tx: &WriteTx<'_>,
    rtype: &str,
    id: &str,
    origin: &str,
) -> Result<Option<Written>, FhirError> {
    let conn = tx.sql();
    let Some(current) = read_current(conn, rtype, id)?.filter(|c| !c.deleted) else {
        return Ok(None);
    };
    let version = current.version + 1;
    let last_updated = now_ms().max(current.last_updated + 1);
    conn.prepare_cached(
        "INSERT INTO fhir_history (rtype, id, version, last_updated, method, json)
         VALUES (?1, ?2, ?3, ?4, 'DELETE', NULL)",
    )?
    .execute(params![rtype, id, version, last_updated])?;
    let seq = conn.last_insert_rowid();
    crate::ledger::append(
        tx,
        &crate::ledger::Record::Fhir {
            seq,
            rtype: rtype.into(),
            id: id.into(),
            version,
            last_updated,
            method: "DELETE".into(),
            json: None,
        },
    )?;
    conn.prepare_cached(
        "UPDATE fhir_current SET version = ?3, last_updated = ?4, deleted = 1, origin = ?5, seq = ?6
         WHERE rtype = ?1 AND id = ?2",
    )?
    .execute(params![rtype, id, version, last_updated, origin, seq])?;
    clear_index(conn, rtype, id)?;
    if origin == "local" {
        tx.append_change(&Change {
            kind: "fhir".into(),
            entity: format!("{rtype}/{id}"),
            op: "delete".into(),
            version: Some(version.to_string()),
            detail: None,
        })?;
    }
    Ok(Some(Written {
        rtype: rtype.into(),
        id: id.into(),
        version,
        last_updated,
        json: None,
        created: false,
    }))
}

const INDEX_TABLES: [&str; 6] = [
    "fhir_idx_token",
    "fhir_idx_string",
    "fhir_idx_date",
    "fhir_idx_ref",
    "fhir_idx_number",
    "fhir_idx_patient_token",
];

fn clear_index(conn: &Connection, rtype: &str, id: &str) -> Result<(), FhirError> {
    for t in INDEX_TABLES {
        conn.prepare_cached(&format!("DELETE FROM {t} WHERE rtype = ?1 AND id = ?2"))?
            .execute([rtype, id])?;
    }
    Ok(())
}

fn write_index(
    conn: &Connection,
    rtype: &str,
    id: &str,
    entries: &[IndexEntry],
) -> Result<(), FhirError> {
    for e in entries {
        match &e.value {
            IndexValue::Token { system, code, text } => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_token (rtype, id, param, system, code, text)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![rtype, id, e.param, system, code, text.as_deref().map(index::normalize)])?,
            IndexValue::String { norm, exact } => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_string (rtype, id, param, norm, exact)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![rtype, id, e.param, norm, exact])?,
            IndexValue::Date { lo, hi } => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_date (rtype, id, param, lo, hi) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![rtype, id, e.param, lo, hi])?,
            IndexValue::Reference { target_type, target_id } => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_ref (rtype, id, param, target_type, target_id)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![rtype, id, e.param, target_type, target_id])?,
            IndexValue::Quantity { value, system, code } => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_number (rtype, id, param, value, system, code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![rtype, id, e.param, value, system, code])?,
            IndexValue::Number(v) => conn
                .prepare_cached(
                    "INSERT INTO fhir_idx_number (rtype, id, param, value, system, code)
                     VALUES (?1, ?2, ?3, ?4, NULL, NULL)",
                )?
                .execute(params![rtype, id, e.param, v])?,
        };
    }
    write_patient_tokens(conn, rtype, id, entries)
}

/// The `fhir_idx_patient_token` rows of one resource (see [`MIGRATION_PATIENT_TOKEN`]).
fn write_patient_tokens(
    conn: &Connection,
    rtype: &str,
    id: &str,
    entries: &[IndexEntry],
) -> Result<(), FhirError> {
    let patients: Vec<(&Option<String>, &String)> = entries
        .iter()
        .filter(|e| e.param == "patient")
        .filter_map(|e| match &e.value {
            IndexValue::Reference { target_type, target_id } => Some((target_type, target_id)),
            _ => None,
        })
        .collect();
    if patients.is_empty() {
        return Ok(());
    }
    let dates = || {
        entries.iter().filter(|e| e.param == "date").filter_map(|e| match e.value {
            IndexValue::Date { lo, hi } => Some((lo, hi)),
            _ => None,
        })
    };
    let date_lo = dates().map(|(lo, _)| lo).min();
    let date_hi = dates().map(|(_, hi)| hi).max();
    let mut insert = conn.prepare_cached(
        "INSERT INTO fhir_idx_patient_token
            (rtype, id, target_type, target_id, param, system, code, date_lo, date_hi)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for e in entries.iter().filter(|e| PATIENT_TOKEN_PARAMS.contains(&e.param)) {
        let IndexValue::Token { system, code, .. } = &e.value else { continue };
        for (target_type, target_id) in &patients {
            insert.execute(params![
                rtype,
                id,
                target_type,
                target_id,
                e.param,
                system,
                code,
                date_lo,
                date_hi
            ])?;
        }
    }
    Ok(())
}

pub use crate::audit::AuditRecord;

/// Appends an audit event (who, from where, what, outcome) in the caller's transaction, with its
/// ledger leaf (see [`crate::audit::append`]).
pub fn audit(tx: &WriteTx<'_>, event: &AuditRecord) -> Result<(), StoreError> {
    crate::audit::append(tx, event)?;
    Ok(())
}

/// The current JSON of a resource, if present and not deleted.
pub fn read_current_json(
    conn: &Connection,
    rtype: &str,
    id: &str,
) -> Result<Option<Value>, StoreError> {
    let cur = read_current(conn, rtype, id)?;
    Ok(cur.filter(|c| !c.deleted).and_then(|c| c.json).and_then(|j| serde_json::from_str(&j).ok()))
}

/// Every current ServiceRequest with status `active` (the worklist candidates), by id.
pub fn active_service_requests(conn: &Connection) -> Result<Vec<Value>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT h.json FROM fhir_current c JOIN fhir_history h ON h.seq = c.seq
         WHERE c.rtype = 'ServiceRequest' AND c.deleted = 0 AND EXISTS (
             SELECT 1 FROM fhir_idx_token t WHERE t.rtype = 'ServiceRequest' AND t.id = c.id
               AND t.param = 'status' AND t.code = 'active')
         ORDER BY c.id",
    )?;
    json_rows(stmt.query([])?)
}

/// The id of the first current Appointment `based-on` the ServiceRequest `sr_id` (the worklist's
/// scheduled time).
pub fn appointment_based_on(conn: &Connection, sr_id: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT r.id FROM fhir_idx_ref r JOIN fhir_current c ON c.rtype = r.rtype AND c.id = r.id
             WHERE r.rtype = 'Appointment' AND r.param = 'based-on' AND r.target_id = ?1
               AND c.deleted = 0 ORDER BY r.id LIMIT 1",
        )?
        .query_row([sr_id], |r| r.get(0))
        .optional()?)
}

/// The current ServiceRequests with an `identifier` value among `values` (accession numbers,
/// requested procedure ids), by id.
pub fn service_requests_by_identifier(
    conn: &Connection,
    values: &[&str],
) -> Result<Vec<Value>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT h.json FROM fhir_current c JOIN fhir_history h ON h.seq = c.seq
         WHERE c.rtype = 'ServiceRequest' AND c.deleted = 0 AND c.id IN (
             SELECT id FROM fhir_idx_token WHERE rtype = 'ServiceRequest' AND param = 'identifier'
               AND code IN (SELECT value FROM json_each(?1)))
         ORDER BY c.id",
    )?;
    json_rows(stmt.query([Value::from(values.to_vec()).to_string()])?)
}

/// The first (by id) current Patient with the identifier `system|value`.
pub fn patient_by_identifier(
    conn: &Connection,
    system: &str,
    value: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT t.id FROM fhir_idx_token t JOIN fhir_current c ON c.rtype = t.rtype AND c.id = t.id
             WHERE t.rtype = 'Patient' AND t.param = 'identifier' AND t.system = ?1 AND t.code = ?2
               AND c.deleted = 0 ORDER BY t.id LIMIT 1",
        )?
        .query_row(params![system, value], |r| r.get(0))
        .optional()?)
}

/// The ids of the current resources of `rtype` with an identifier `value` (in `system`, when
/// given), by id.
pub fn ids_by_identifier(
    conn: &Connection,
    rtype: &str,
    system: Option<&str>,
    value: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT t.id FROM fhir_idx_token t JOIN fhir_current c
               ON c.rtype = t.rtype AND c.id = t.id AND c.deleted = 0
             WHERE t.rtype = ?1 AND t.param = 'identifier' AND t.code = ?3
               AND (?2 IS NULL OR t.system = ?2) ORDER BY t.id",
        )?
        .query_map(params![rtype, system, value], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// `Patient/$everything`: the (type, id) of the Patient `id` and of every current resource that
/// references it — the Patient first, then by type and id; `None` if the Patient is unknown or
/// deleted.
pub fn patient_compartment(
    conn: &Connection,
    id: &str,
) -> Result<Option<Vec<(String, String)>>, StoreError> {
    let cur = read_current(conn, "Patient", id)?;
    if cur.is_none_or(|c| c.deleted) {
        return Ok(None);
    }
    // Index rows exist only for current, not deleted versions (a delete or an update clears
    // them), so the compartment is read from the covering target index alone.
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT r.rtype, r.id FROM fhir_idx_ref r
         WHERE r.target_id = ?1 AND r.target_type = 'Patient' ORDER BY r.rtype, r.id",
    )?;
    let mut keys = vec![("Patient".to_string(), id.to_owned())];
    for row in stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let k = row?;
        if k.0 != "Patient" || k.1 != id {
            keys.push(k);
        }
    }
    Ok(Some(keys))
}

/// The resources of a query whose first column is the JSON of current versions (unreadable or
/// empty JSON skipped).
fn json_rows(mut rows: rusqlite::Rows<'_>) -> Result<Vec<Value>, StoreError> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        if let Some(v) = r.get::<_, Option<String>>(0)?.and_then(|j| serde_json::from_str(&j).ok())
        {
            out.push(v);
        }
    }
    Ok(out)
}
