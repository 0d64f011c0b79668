//! The change log as a work queue. A change is *pending* until acknowledged (then deleted), may be
//! *leased* to the agent for a while (a crashed agent's lease simply runs out), and is *parked*
//! when it cannot succeed without a person (kept and reported, never dropped).

use rusqlite::{Connection, OptionalExtension, params};

use super::api::{
    AckItem, CHANNELS, ChannelStatus, Conflict, FailItem, LeasedChange, ParkedChange,
};
use crate::store::{StoreError, WriteTx, now_ms};

/// Leases up to `max` due changes of `kind`, oldest first. A resource with changes under a live
/// lease is skipped: one resource is never in two leases at once, so the agent may lease its next
/// batch while the previous one is in flight and each lease's upstream versions stay true.
pub fn lease(
    tx: &WriteTx<'_>,
    kind: &str,
    max: u32,
    lease_secs: u32,
) -> Result<Vec<LeasedChange>, StoreError> {
    let sql = tx.sql();
    let now = now_ms();
    let mut stmt = sql.prepare_cached(
        "SELECT seq, created_at, entity, op, version, attempts, detail FROM outbox o
         WHERE kind = ?1 AND state = 'pending' AND (lease_until IS NULL OR lease_until <= ?2)
           AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.kind = o.kind AND l.entity = o.entity
                           AND l.state = 'pending' AND l.lease_until > ?2)
         ORDER BY seq LIMIT ?3",
    )?;
    let mut entries: Vec<LeasedChange> = stmt
        .query_map(params![kind, now, max], |r| {
            let detail: Option<String> = r.get(6)?;
            Ok(LeasedChange {
                seq: r.get(0)?,
                created_at_ms: r.get(1)?,
                entity: r.get(2)?,
                op: r.get(3)?,
                version: r.get(4)?,
                attempts: r.get(5)?,
                detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
                current_version: None,
                resource: None,
                upstream_version: None,
            })
        })?
        .collect::<Result<_, _>>()?;
    let until = now + i64::from(lease_secs) * 1000;
    let mut mark = sql.prepare_cached("UPDATE outbox SET lease_until = ?2 WHERE seq = ?1")?;
    for e in &entries {
        mark.execute(params![e.seq, until])?;
    }
    if kind == "fhir" {
        for e in &mut entries {
            let Some((rtype, id)) = e.entity.split_once('/') else { continue };
            let current = crate::fhir::storage::read_current(sql, rtype, id)?;
            if let Some(c) = current {
                e.current_version = Some(c.version);
                e.resource = match (c.deleted, c.json) {
                    (false, Some(j)) => serde_json::from_str(&j).ok(),
                    _ => None,
                };
            }
            e.upstream_version = upstream_version(sql, rtype, id)?;
        }
    }
    Ok(entries)
}

/// The version upstream is known to hold for a resource.
pub fn upstream_version(
    conn: &Connection,
    rtype: &str,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT upstream_version FROM sync_upstream WHERE rtype = ?1 AND id = ?2")?
        .query_row([rtype, id], |r| r.get(0))
        .optional()?)
}

/// Records what upstream now holds for a resource.
pub fn set_upstream_version(
    conn: &Connection,
    rtype: &str,
    id: &str,
    version: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sync_upstream (rtype, id, upstream_version) VALUES (?1, ?2, ?3)
         ON CONFLICT (rtype, id) DO UPDATE SET upstream_version = excluded.upstream_version",
    )?
    .execute([rtype, id, version])?;
    Ok(())
}

/// Acknowledges changes upstream confirmed: they leave the log. A FHIR acknowledgement also
/// retires the resource's older changes (squashed into the push) and records upstream's version.
/// Acknowledging an already-acknowledged change is a no-op (a retried ack after a lost reply).
pub fn ack(tx: &WriteTx<'_>, kind: &str, items: &[AckItem]) -> Result<u64, StoreError> {
    let sql = tx.sql();
    let mut affected = 0u64;
    for item in items {
        let row: Option<(String, Option<String>)> = sql
            .prepare_cached("SELECT entity, version FROM outbox WHERE seq = ?1 AND kind = ?2")?
            .query_row(params![item.seq, kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        affected += sql
            .prepare_cached("DELETE FROM outbox WHERE seq = ?1 AND kind = ?2")?
            .execute(params![item.seq, kind])? as u64;
        let Some((entity, version)) = row else { continue };
        if kind == "dicom" {
            // The cloud PACS holds this instance version now: eviction may take it.
            let v = version.and_then(|v| v.parse::<i64>().ok());
            crate::dicom::index::mark_confirmed(sql, &entity, v)?;
            continue;
        }
        if kind != "fhir" {
            continue;
        }
        if let Some(v) = item.pushed_version {
            affected += sql
                .prepare_cached(
                    "DELETE FROM outbox WHERE kind = 'fhir' AND entity = ?1
                     AND CAST(version AS INTEGER) <= ?2",
                )?
                .execute(params![entity, v])? as u64;
        }
        if let (Some(up), Some((rtype, id))) = (&item.upstream_version, entity.split_once('/')) {
            set_upstream_version(sql, rtype, id, up)?;
        }
    }
    Ok(affected)
}

/// Whether a change of `kind` for `entity` is still waiting (pending, leased or not).
pub fn has_pending(conn: &Connection, kind: &str, entity: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM outbox WHERE kind = ?1 AND entity = ?2 AND state = 'pending'",
        )?
        .exists(params![kind, entity])?)
}

/// The last error of a pending change of `kind` for `entity` that already failed at least
/// once (the agent retries it; a waiting requester can say why it is not there yet).
pub fn pending_failure(
    conn: &Connection,
    kind: &str,
    entity: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT last_error FROM outbox WHERE kind = ?1 AND entity = ?2 AND state = 'pending'
               AND attempts > 0 AND last_error IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![kind, entity], |r| r.get(0))
        .optional()?)
}

/// Records failed attempts: retry later, or park.
pub fn fail(tx: &WriteTx<'_>, kind: &str, items: &[FailItem]) -> Result<u64, StoreError> {
    let sql = tx.sql();
    let now = now_ms();
    let mut affected = 0u64;
    for item in items {
        let error: String = item.error.chars().take(2000).collect();
        affected += sql
            .prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?3,
                   state = CASE WHEN ?4 THEN 'parked' ELSE state END,
                   lease_until = ?5
                 WHERE seq = ?1 AND kind = ?2",
            )?
            .execute(params![
                item.seq,
                kind,
                error,
                item.park,
                now + i64::from(item.retry_after_secs) * 1000
            ])? as u64;
    }
    Ok(affected)
}

/// Ends every lease of a channel (the agent calls this when it starts: a lease held by its
/// previous, crashed incarnation need not run out first).
pub fn release_all(tx: &WriteTx<'_>, kind: &str) -> Result<u64, StoreError> {
    Ok(tx.sql().execute(
        "UPDATE outbox SET lease_until = NULL WHERE kind = ?1 AND state = 'pending'
           AND lease_until > ?2",
        params![kind, now_ms()],
    )? as u64)
}

/// Gives leased changes back untouched (not attempted: no attempt counted, no delay).
pub fn unlease(tx: &WriteTx<'_>, kind: &str, seqs: &[i64]) -> Result<u64, StoreError> {
    let mut n = 0;
    for s in seqs {
        n += tx.sql().execute(
            "UPDATE outbox SET lease_until = NULL WHERE seq = ?1 AND kind = ?2 AND state = 'pending'",
            params![s, kind],
        )? as u64;
    }
    Ok(n)
}

/// Ends every lease and retry delay (at daemon start).
pub fn release_after_restart(tx: &WriteTx<'_>) -> Result<u64, StoreError> {
    Ok(tx.sql().execute(
        "UPDATE outbox SET lease_until = NULL WHERE state = 'pending' AND lease_until IS NOT NULL",
        [],
    )? as u64)
}

/// Puts parked changes (all, or the given ones) back in the queue.
pub fn retry_parked(tx: &WriteTx<'_>, seqs: &[i64]) -> Result<u64, StoreError> {
    let sql = tx.sql();
    if seqs.is_empty() {
        return Ok(sql.execute(
            "UPDATE outbox SET state = 'pending', lease_until = NULL WHERE state = 'parked'",
            [],
        )? as u64);
    }
    let mut n = 0;
    for s in seqs {
        n += sql.execute(
            "UPDATE outbox SET state = 'pending', lease_until = NULL
             WHERE seq = ?1 AND state = 'parked'",
            [s],
        )? as u64;
    }
    Ok(n)
}

/// Queue figures per channel.
pub fn status(conn: &Connection) -> Result<Vec<ChannelStatus>, StoreError> {
    let now = now_ms();
    let mut out = Vec::new();
    for kind in CHANNELS {
        let (pending, leased, parked, oldest): (i64, i64, i64, Option<i64>) = conn
            .prepare_cached(
                "SELECT
                   coalesce(sum(state = 'pending' AND (lease_until IS NULL OR lease_until <= ?2)), 0),
                   coalesce(sum(state = 'pending' AND lease_until > ?2), 0),
                   coalesce(sum(state = 'parked'), 0),
                   min(created_at)
                 FROM outbox WHERE kind = ?1",
            )?
            .query_row(params![kind, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        out.push(ChannelStatus {
            kind: (*kind).to_owned(),
            pending: pending as u64,
            leased: leased as u64,
            parked: parked as u64,
            oldest_age_ms: oldest.map(|t| (now - t).max(0)),
        });
    }
    Ok(out)
}

/// Parked changes, oldest first.
pub fn parked(conn: &Connection, limit: u32) -> Result<Vec<ParkedChange>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kind, entity, op, attempts, last_error FROM outbox
         WHERE state = 'parked' ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |r| {
        Ok(ParkedChange {
            seq: r.get(0)?,
            kind: r.get(1)?,
            entity: r.get(2)?,
            op: r.get(3)?,
            attempts: r.get(4)?,
            last_error: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Recorded conflicts, newest first (`open_only`: the ones waiting for site IT).
pub fn conflicts(
    conn: &Connection,
    open_only: bool,
    limit: u32,
) -> Result<Vec<Conflict>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, entity, policy, state, local_version, upstream_version, resolution
         FROM sync_conflicts WHERE (?1 = 0 OR state = 'open') ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![open_only, limit], |r| {
        Ok(Conflict {
            id: r.get(0)?,
            at_ms: r.get(1)?,
            entity: r.get(2)?,
            policy: r.get(3)?,
            state: r.get(4)?,
            local_version: r.get(5)?,
            upstream_version: r.get(6)?,
            resolution: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Number of conflicts waiting for site IT.
pub fn open_conflicts(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn.query_row("SELECT count(*) FROM sync_conflicts WHERE state = 'open'", [], |r| {
        r.get::<_, i64>(0)
    })? as u64)
}
