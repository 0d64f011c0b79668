//! Who is calling over HTTPS, for the FHIR API and DICOMweb alike: the [`Caller`] extractor (the
//! request's credentials and the client's address), authentication — a bearer token checked
//! offline by the [`Verifier`] (signature, issuer, audience, and the site's tenant in the
//! token's tenant claim: a token of another tenant is refused with 403), or a workstation's
//! verified client certificate with the scopes `fhir.client_certs` grants its CN —, the SMART
//! scope check, and the audit records of read-type accesses, batched into one store write.
//!
//! Authentication runs when a handler asks for it ([`Caller::authenticate`],
//! [`Caller::authorize`]), not when the extractor runs: handlers first refuse what they can
//! refuse without knowing the caller (format, type, id), so such a request gets its 4xx without
//! a token check and without an audit record. This module knows no FHIR handler; DICOMweb
//! uses it the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};

use crate::fhir::FhirError;
use crate::fhir::auth::{Interaction, Principal, Verifier};
use crate::fhir::storage::{self, AuditRecord};
use crate::store::Store;

/// How long a read's audit record waits for others to share its store write. A crash in this
/// window loses those records (the read itself has been answered); a clean stop writes them
/// ([`Access::flush_audits`]).
pub const READ_AUDIT_BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

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

/// What the [`Caller`] extractor needs from the daemon: how to check credentials, and the queue
/// of read audit records. One per listener, shared by the FHIR API and DICOMweb.
pub struct Access {
    store: Arc<Store>,
    /// Token verifier; `None` when authentication is off (development, loopback only).
    verifier: Option<Verifier>,
    /// Workstation client-certificate CN → granted SMART scopes (`fhir.client_certs`).
    client_certs: BTreeMap<String, String>,
    audits: Arc<AuditQueue>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

impl Access {
    pub fn new(
        store: Arc<Store>,
        verifier: Option<Verifier>,
        client_certs: BTreeMap<String, String>,
    ) -> Arc<Self> {
        Arc::new(Access { store, verifier, client_certs, audits: Arc::default() })
    }

    /// Writes the read audit records still waiting for their batch; called on shutdown before
    /// the store closes.
    pub async fn flush_audits(&self) {
        if !self.audits.pending.lock().expect("audit queue").0.is_empty() {
            write_pending_audits(&self.store, &self.audits).await;
        }
    }
}

/// A router state the [`Caller`] extractor can take its [`Access`] from.
pub trait CallerState: Send + Sync {
    fn access(&self) -> &Arc<Access>;
}

/// The caller of one request, as an axum extractor: its credentials (the `Authorization`
/// header, the client certificate's CN) and address, not yet checked. Never rejects; a handler
/// calls [`Caller::authorize`] (or [`Caller::authenticate`]) when it needs to know who it is.
#[derive(Debug, Clone)]
pub struct Caller {
    access: Arc<Access>,
    authorization: Option<HeaderValue>,
    addr: Option<ClientAddr>,
}

impl<S: CallerState> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller {
            access: state.access().clone(),
            authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
            addr: parts.extensions.get::<ClientAddr>().cloned(),
        })
    }
}

impl Caller {
    /// Authenticates the request (bearer token, workstation certificate, or anonymous when auth
    /// is off). Failures are audited and answered 401/403.
    pub fn authenticate(&self) -> Result<Identity, FhirError> {
        let access = &self.access;
        let addr = self.addr.as_ref();
        let source = addr.map_or("unknown".into(), |a| a.0.ip().to_string());
        let bearer = self.authorization.as_ref().and_then(|h| h.to_str().ok());
        let workstation = match (bearer, addr.and_then(|a| a.client_cn())) {
            (None, Some(cn)) => {
                access.client_certs.get(cn).map(|scopes| Principal::workstation(cn, scopes))
            }
            _ => None,
        };
        let principal = match &access.verifier {
            None => Principal::anonymous(),
            Some(_) if workstation.is_some() => workstation.expect("checked"),
            Some(v) => match v.verify(bearer) {
                Ok(p) => p,
                Err(e) => {
                    let e = FhirError::from(e);
                    let who = Identity {
                        actor: "unauthenticated".into(),
                        source,
                        principal: Principal::anonymous(),
                        access: access.clone(),
                    };
                    who.audit_read("authenticate", "-".into(), &format!("{} {e}", e.status()));
                    return Err(e);
                }
            },
        };
        Ok(Identity { actor: principal.subject.clone(), source, principal, access: access.clone() })
    }

    /// [`Caller::authenticate`] plus the scope check for one interaction on one type (denials
    /// audited).
    pub fn authorize(&self, rtype: &str, what: Interaction) -> Result<Identity, FhirError> {
        let who = self.authenticate()?;
        if let Err(e) = who.principal.require(rtype, what) {
            who.audit_read("authorize", format!("{rtype} {what:?}"), "403");
            return Err(e.into());
        }
        Ok(who)
    }
}

/// An authenticated caller: who it is (for audit records) and what it may do.
#[derive(Clone)]
pub struct Identity {
    pub actor: String,
    pub source: String,
    pub principal: Principal,
    access: Arc<Access>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("actor", &self.actor)
            .field("source", &self.source)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Queues an audit record for a read-type access (reads do not wait for it to be durable).
    pub fn audit_read(&self, action: &str, entity: String, outcome: &str) {
        let rec = AuditRecord {
            actor: self.actor.clone(),
            source: self.source.clone(),
            action: action.into(),
            entity,
            outcome: outcome.into(),
            detail: None,
        };
        let access = &self.access;
        {
            let mut pending = access.audits.pending.lock().expect("audit queue");
            pending.0.push(rec);
            if pending.1 {
                return; // the scheduled flush takes this record too
            }
            pending.1 = true;
        }
        let (store, queue) = (access.store.clone(), access.audits.clone());
        tokio::spawn(async move {
            // Reads arriving meanwhile join this write. Every commit makes SQLite drop the page
            // cache of each reader connection (WAL mode), so one write per read would keep the
            // readers decrypting the same pages again and again.
            tokio::time::sleep(READ_AUDIT_BATCH_DELAY).await;
            write_pending_audits(&store, &queue).await;
        });
    }

    /// The audit record of a successful write by this caller, for the write's own transaction.
    pub fn write_audit(&self, action: &str, entity: String) -> AuditRecord {
        AuditRecord {
            actor: self.actor.clone(),
            source: self.source.clone(),
            action: action.into(),
            entity,
            outcome: "success".into(),
            detail: None,
        }
    }
}

/// Audit records of read-type accesses waiting for the store's writer. All records queued
/// while a flush is pending go into that one write (one savepoint in the group commit), so a
/// burst of reads costs one queued write, not one per read.
#[derive(Default)]
struct AuditQueue {
    /// (records, a flush is scheduled)
    pending: Mutex<(Vec<AuditRecord>, bool)>,
}

/// Writes every queued read audit record in one store write.
async fn write_pending_audits(store: &Arc<Store>, queue: &Arc<AuditQueue>) {
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
                return Err(e);
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
