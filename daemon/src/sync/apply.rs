//! Applying what the upstream server changed, under the site's conflict policy.
//!
//! A conflict is an upstream change to a resource that also has an unsynced edge change (an
//! outbox entry). Everything here runs inside one write transaction, so the check and the write
//! cannot interleave with a ward's write.

use rusqlite::{OptionalExtension, params};
use serde_json::Value;

use super::api::{ApplyOutcome, ApplyRequest, ApplyResponse, ConflictPolicy};
use super::outbox::{set_upstream_version, upstream_version};
use super::{content_of, tenant_of};
use crate::fhir::{FhirError, storage};
use crate::store::{StoreError, WriteTx, now_ms};

/// Why an upstream resource was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("resource is tagged for tenant {found:?}, this box serves {expected:?}")]
    WrongTenant { found: String, expected: String },
    #[error("invalid upstream resource: {0}")]
    Invalid(String),
    #[error("no conflict {0}")]
    NoSuchConflict(i64),
    #[error("conflict {0} is already resolved")]
    AlreadyResolved(i64),
    #[error(transparent)]
    Fhir(#[from] FhirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// Applies one upstream version or delete. Checks the tenant tag first (invariant 5).
pub fn apply(
    tx: &WriteTx<'_>,
    tenant: &str,
    req: ApplyRequest,
) -> Result<ApplyResponse, ApplyError> {
    let (rtype, id) = (req.rtype.as_str(), req.id.as_str());
    if !crate::fhir::is_resource_type(rtype) || !crate::fhir::valid_id(id) {
        return Err(ApplyError::Invalid(format!("bad resource address {rtype}/{id}")));
    }
    if let Some(r) = &req.resource {
        if let Some(found) = tenant_of(r).filter(|found| *found != tenant) {
            return Err(ApplyError::WrongTenant { found: found.into(), expected: tenant.into() });
        }
        if r.get("resourceType").and_then(Value::as_str) != Some(rtype)
            || r.get("id").and_then(Value::as_str) != Some(id)
        {
            return Err(ApplyError::Invalid("resourceType/id do not match the address".into()));
        }
    }
    let sql = tx.sql();
    let entity = format!("{rtype}/{id}");
    let known = upstream_version(sql, rtype, id)?;
    let current = storage::read_current(sql, rtype, id)?;
    let local_content = current
        .as_ref()
        .filter(|c| !c.deleted)
        .and_then(|c| c.json.as_deref())
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .map(|v| content_of(&v));
    let upstream_content = req.resource.as_ref().map(content_of);
    // Same as the edge already holds (our own push coming back, a replayed page): only remember
    // upstream's version.
    let same = match (&local_content, &upstream_content) {
        (Some(a), Some(b)) => a == b,
        (None, None) => true,
        _ => false,
    };
    // An older upstream version than the one we know (a history page read out of order, a
    // replay after a crash mid-round) never regresses the edge.
    let stale = match (known.as_deref().map(str::parse::<i64>), req.upstream_version.parse::<i64>())
    {
        (Some(Ok(k)), Ok(v)) => v < k,
        _ => false,
    };
    if stale {
        return Ok(ApplyResponse { outcome: ApplyOutcome::Unchanged, conflict_id: None });
    }
    if known.as_deref() == Some(req.upstream_version.as_str()) || same {
        set_upstream_version(sql, rtype, id, &req.upstream_version)?;
        return Ok(ApplyResponse { outcome: ApplyOutcome::Unchanged, conflict_id: None });
    }
    // Upstream holds one of the edge's own earlier versions (our push landed but its
    // acknowledgement was lost, then the resource changed again here): not a conflict. Remember
    // upstream's version so the pending push goes through with If-Match on it.
    if let Some(up) = &upstream_content
        && local_history_has(sql, rtype, id, up)?
    {
        set_upstream_version(sql, rtype, id, &req.upstream_version)?;
        return Ok(ApplyResponse { outcome: ApplyOutcome::Unchanged, conflict_id: None });
    }
    let pending: i64 = sql
        .prepare_cached("SELECT count(*) FROM outbox WHERE kind = 'fhir' AND entity = ?1")?
        .query_row([&entity], |r| r.get(0))?;
    if pending == 0 {
        write_upstream(tx, rtype, id, req.resource)?;
        set_upstream_version(sql, rtype, id, &req.upstream_version)?;
        return Ok(ApplyResponse { outcome: ApplyOutcome::Applied, conflict_id: None });
    }
    // Already held for site IT with this very upstream version (a later pull or push round
    // meets the same conflict): one record, not one per round.
    let held: Option<i64> = sql
        .prepare_cached(
            "SELECT id FROM sync_conflicts WHERE entity = ?1 AND state = 'open'
             AND upstream_version = ?2",
        )?
        .query_row(params![entity, req.upstream_version], |r| r.get(0))
        .optional()?;
    if let Some(id) = held {
        return Ok(ApplyResponse { outcome: ApplyOutcome::ConflictHeld, conflict_id: Some(id) });
    }
    let local_version = current.as_ref().map(|c| c.version);
    let upstream_json = req.resource.as_ref().map(|r| r.to_string());
    let (outcome, state, resolution) = match req.policy {
        ConflictPolicy::ServerWins => {
            // Upstream's version becomes current; the edge's stays in history (recorded below).
            write_upstream(tx, rtype, id, req.resource)?;
            set_upstream_version(sql, rtype, id, &req.upstream_version)?;
            sql.execute("DELETE FROM outbox WHERE kind = 'fhir' AND entity = ?1", [&entity])?;
            (
                ApplyOutcome::ConflictServerWins,
                "resolved",
                Some("upstream kept; local version in history"),
            )
        }
        ConflictPolicy::ClientWins => {
            // The pending push will now carry If-Match on upstream's version and overwrite it;
            // upstream's content is kept in the conflict record.
            set_upstream_version(sql, rtype, id, &req.upstream_version)?;
            (
                ApplyOutcome::ConflictClientWins,
                "resolved",
                Some("local kept; upstream content recorded"),
            )
        }
        ConflictPolicy::Manual => {
            sql.execute(
                "UPDATE outbox SET state = 'parked', last_error = 'conflict: waiting for site IT'
                 WHERE kind = 'fhir' AND entity = ?1",
                [&entity],
            )?;
            (ApplyOutcome::ConflictHeld, "open", None)
        }
    };
    sql.prepare_cached(
        "INSERT INTO sync_conflicts (at, entity, policy, state, local_version, upstream_version,
           upstream_json, resolution, resolved_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, CASE WHEN ?4 = 'resolved' THEN ?1 END)",
    )?
    .execute(params![
        now_ms(),
        entity,
        req.policy.as_str(),
        state,
        local_version,
        req.upstream_version,
        upstream_json,
        resolution
    ])?;
    Ok(ApplyResponse { outcome, conflict_id: Some(sql.last_insert_rowid()) })
}

/// True when some version the edge wrote itself has exactly this content.
fn local_history_has(
    sql: &rusqlite::Connection,
    rtype: &str,
    id: &str,
    content: &Value,
) -> Result<bool, ApplyError> {
    let mut stmt = sql.prepare_cached(
        "SELECT json FROM fhir_history WHERE rtype = ?1 AND id = ?2 AND json IS NOT NULL
         ORDER BY version DESC LIMIT 50",
    )?;
    let rows = stmt.query_map([rtype, id], |r| r.get::<_, String>(0))?;
    for json in rows {
        if let Ok(v) = serde_json::from_str::<Value>(&json?)
            && content_of(&v) == *content
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn write_upstream(
    tx: &WriteTx<'_>,
    rtype: &str,
    id: &str,
    resource: Option<Value>,
) -> Result<(), ApplyError> {
    match resource {
        Some(r) => {
            storage::put(tx, rtype, id, r, None, "upstream")?;
        }
        None => {
            storage::delete(tx, rtype, id, "upstream")?;
        }
    }
    Ok(())
}

/// Resolves a held (manual) conflict: `keep = "local"` pushes the edge version over upstream's,
/// `keep = "upstream"` takes upstream's and drops the parked edge change.
pub fn resolve(tx: &WriteTx<'_>, conflict_id: i64, keep: &str) -> Result<(), ApplyError> {
    let sql = tx.sql();
    let row: Option<(String, String, Option<String>, Option<String>)> = sql
        .query_row(
            "SELECT entity, state, upstream_version, upstream_json FROM sync_conflicts WHERE id = ?1",
            [conflict_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((entity, state, up_version, up_json)) = row else {
        return Err(ApplyError::NoSuchConflict(conflict_id));
    };
    if state != "open" {
        return Err(ApplyError::AlreadyResolved(conflict_id));
    }
    let (rtype, id) = entity.split_once('/').unwrap_or(("", ""));
    let resolution = match keep {
        "local" => {
            if let Some(v) = &up_version {
                set_upstream_version(sql, rtype, id, v)?;
            }
            sql.execute(
                "UPDATE outbox SET state = 'pending', lease_until = NULL, last_error = NULL
                 WHERE kind = 'fhir' AND entity = ?1 AND state = 'parked'",
                [&entity],
            )?;
            "site IT kept local"
        }
        "upstream" => {
            let resource = match up_json {
                Some(j) => {
                    Some(serde_json::from_str(&j).map_err(|e| ApplyError::Invalid(e.to_string()))?)
                }
                None => None,
            };
            write_upstream(tx, rtype, id, resource)?;
            if let Some(v) = &up_version {
                set_upstream_version(sql, rtype, id, v)?;
            }
            sql.execute("DELETE FROM outbox WHERE kind = 'fhir' AND entity = ?1", [&entity])?;
            "site IT kept upstream"
        }
        other => {
            return Err(ApplyError::Invalid(format!(
                "keep must be local or upstream, not {other:?}"
            )));
        }
    };
    sql.execute(
        "UPDATE sync_conflicts SET state = 'resolved', resolution = ?2, resolved_at = ?3 WHERE id = ?1",
        params![conflict_id, resolution, now_ms()],
    )?;
    Ok(())
}
