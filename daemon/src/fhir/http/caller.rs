//! Who is calling: authentication (bearer token or workstation certificate), the scope check,
//! and the read audit records, batched into one store write.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, header};

use super::FhirContext;
use crate::fhir::FhirError;
use crate::fhir::auth::{Interaction, Principal};
use crate::fhir::storage::{self, AuditRecord};
use crate::store::Store;

/// Audit records of read-type accesses waiting for the store's writer. All records queued
/// while a flush is pending go into that one write (one savepoint in the group commit), so a
/// burst of reads costs one queued write, not one per read.
#[derive(Default)]
pub(super) struct AuditQueue {
    /// (records, a flush is scheduled)
    pub(super) pending: Mutex<(Vec<AuditRecord>, bool)>,
}

/// The client's address, set per connection by the listener.
#[derive(Debug, Clone)]
pub struct ClientAddr(pub SocketAddr, pub Option<Arc<str>>);

impl ClientAddr {
    /// The subject CN of the client certificate presented in the TLS handshake (verified
    /// against `fhir.client_ca_file`), if any.
    pub fn client_cn(&self) -> Option<&str> {
        self.1.as_deref()
    }
}

/// Who is calling (from auth), for audit and access decisions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: String,
    pub source: String,
    pub principal: Principal,
}

/// Authenticates the request (bearer token, or anonymous when auth is off). Failures are
/// audited and answered 401/403.
pub(crate) fn authenticate(
    ctx: &FhirContext,
    headers: &HeaderMap,
    addr: Option<&ClientAddr>,
) -> Result<Caller, FhirError> {
    let source = addr.map_or("unknown".into(), |a| a.0.ip().to_string());
    let bearer = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    let workstation = match (bearer, addr.and_then(|a| a.client_cn())) {
        (None, Some(cn)) => {
            ctx.client_certs.get(cn).map(|scopes| Principal::workstation(cn, scopes))
        }
        _ => None,
    };
    let principal = match &ctx.verifier {
        None => Principal::anonymous(),
        Some(_) if workstation.is_some() => workstation.expect("checked"),
        Some(v) => match v.verify(bearer) {
            Ok(p) => p,
            Err(e) => {
                let e = FhirError::from(e);
                let who = Caller {
                    actor: "unauthenticated".into(),
                    source,
                    principal: Principal::anonymous(),
                };
                audit_read(ctx, &who, "authenticate", "-".into(), &format!("{} {e}", e.status()));
                return Err(e);
            }
        },
    };
    Ok(Caller { actor: principal.subject.clone(), source, principal })
}

/// [`authenticate`] plus the scope check for one interaction on one type (denials audited).
pub(crate) fn authorize(
    ctx: &FhirContext,
    headers: &HeaderMap,
    addr: Option<&ClientAddr>,
    rtype: &str,
    what: Interaction,
) -> Result<Caller, FhirError> {
    let who = authenticate(ctx, headers, addr)?;
    if let Err(e) = who.principal.require(rtype, what) {
        audit_read(ctx, &who, "authorize", format!("{rtype} {what:?}"), "403");
        return Err(e.into());
    }
    Ok(who)
}

/// Queues an audit record for a read-type access (reads do not wait for it to be durable).
pub(crate) fn audit_read(
    ctx: &FhirContext,
    who: &Caller,
    action: &str,
    entity: String,
    outcome: &str,
) {
    let rec = AuditRecord {
        actor: who.actor.clone(),
        source: who.source.clone(),
        action: action.into(),
        entity,
        outcome: outcome.into(),
        detail: None,
    };
    {
        let mut pending = ctx.audits.pending.lock().expect("audit queue");
        pending.0.push(rec);
        if pending.1 {
            return; // the scheduled flush takes this record too
        }
        pending.1 = true;
    }
    let (store, queue) = (ctx.store.clone(), ctx.audits.clone());
    tokio::spawn(async move {
        // Reads arriving meanwhile join this write. Every commit makes SQLite drop the page
        // cache of each reader connection (WAL mode), so one write per read would keep the
        // readers decrypting the same pages again and again.
        tokio::time::sleep(READ_AUDIT_BATCH_DELAY).await;
        write_pending_audits(&store, &queue).await;
    });
}

/// How long a read's audit record waits for others to share its store write. A crash in this
/// window loses those records (the read itself has been answered); a clean stop writes them
/// ([`FhirContext::flush_audits`]).
pub const READ_AUDIT_BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

/// Writes every queued read audit record in one store write.
pub(super) async fn write_pending_audits(store: &Arc<Store>, queue: &Arc<AuditQueue>) {
    let q = queue.clone();
    let written = store
        .write(move |tx| {
            // Taken when the writer runs it: everything queued until now.
            let records = {
                let mut pending = q.pending.lock().expect("audit queue");
                pending.1 = false;
                std::mem::take(&mut pending.0)
            };
            if let Err(e) = records.iter().try_for_each(|rec| storage::audit(tx, rec)) {
                // This write's savepoint is rolled back: the records go back to the queue, to
                // be written with the next batch and counted in the error below.
                q.pending.lock().expect("audit queue").0.splice(0..0, records);
                return Err(e.into());
            }
            Ok(records.len())
        })
        .await;
    if let Err(e) = written {
        // The records are still queued (the write never ran, or it failed and put them back):
        // the next access schedules them again.
        let mut pending = queue.pending.lock().expect("audit queue");
        pending.1 = false;
        if !pending.0.is_empty() {
            tracing::error!(error = %e, records = pending.0.len(), "audit records could not be written");
        }
    }
}

pub(crate) fn write_audit(who: &Caller, action: &str, entity: String) -> AuditRecord {
    AuditRecord {
        actor: who.actor.clone(),
        source: who.source.clone(),
        action: action.into(),
        entity,
        outcome: "success".into(),
        detail: None,
    }
}
