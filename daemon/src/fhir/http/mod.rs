//! The FHIR R4 REST API (axum), base `/fhir`. Every request either answers with a resource or
//! Bundle, or with an OperationOutcome and the right 4xx/5xx status; every access to patient data
//! is audited in the store.
//!
//! One file per interaction group: [`read`] (read, vread, `$verify`), [`history`], [`search`]
//! (with the paging cache in [`paging`]), [`everything`] (`Patient/$everything`), [`write`]
//! (create, update, delete, transaction/batch Bundles), [`metadata`] (the CapabilityStatement),
//! [`audit_event`] (the audit trail as AuditEvent); [`response`] holds the request and response
//! helpers they share. Who is calling is `crate::http_caller`'s business (the [`Caller`]
//! extractor), shared with DICOMweb.

mod audit_event;
mod everything;
mod history;
mod metadata;
mod paging;
mod read;
pub mod response;
mod search;
mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::http::Method;
use axum::response::Response;
use axum::routing::{get, post};

pub use metadata::capability_statement;
pub use response::FHIR_JSON;
pub use write::BODY_READ_TIMEOUT;

use super::FhirError;
use super::auth::Verifier;
use crate::http_caller::{Access, CallerState};
use crate::store::Store;
use everything::everything;
use history::{instance_history, system_history, type_history};
use metadata::metadata;
use paging::Snapshot;
use read::{read, verify_dicom, verify_version, vread};
use search::{search_get, search_post, system_get};
use write::{create, delete, system_bundle, update};

/// What the API needs from the daemon.
pub struct FhirContext {
    pub store: Arc<Store>,
    /// Largest request body accepted (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// The integrity ledger, for `$verify`.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// Authentication and the read audit queue, shared with DICOMweb.
    pub access: Arc<Access>,
    pages: Mutex<HashMap<String, Arc<Snapshot>>>,
    /// Transaction and batch Bundles being read, parsed or written ([`MAX_CONCURRENT_BUNDLES`]).
    bundles: tokio::sync::Semaphore,
}

/// Transaction and batch Bundles handled at once. A Synthea patient Bundle is a few MB of JSON
/// and tens of MB once parsed; they are written one at a time by the store's single writer
/// anyway, so more than two in memory (one writing, the next parsed and waiting) only raises the
/// daemon's RSS. Others wait for a permit before their body is read.
pub const MAX_CONCURRENT_BUNDLES: usize = 2;

impl std::fmt::Debug for FhirContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirContext").finish_non_exhaustive()
    }
}

impl FhirContext {
    /// Writes the read audit records still waiting for their batch; called on shutdown before
    /// the store closes.
    pub async fn flush_audits(&self) {
        self.access.flush_audits().await;
    }

    pub fn new(
        store: Arc<Store>,
        max_body_bytes: usize,
        verifier: Option<Verifier>,
        ledger: Arc<crate::ledger::Ledger>,
        client_certs: std::collections::BTreeMap<String, String>,
    ) -> Arc<Self> {
        Arc::new(FhirContext {
            access: Access::new(store.clone(), verifier, client_certs),
            store,
            max_body_bytes,
            ledger,
            pages: Mutex::new(HashMap::new()),
            bundles: tokio::sync::Semaphore::new(MAX_CONCURRENT_BUNDLES),
        })
    }
}

impl CallerState for Arc<FhirContext> {
    fn access(&self) -> &Arc<Access> {
        &self.access
    }
}

pub(crate) type ApiResult = Result<Response, FhirError>;

pub fn router(ctx: Arc<FhirContext>) -> Router {
    Router::new()
        .merge(audit_event::routes())
        .route("/fhir", post(system_bundle).get(system_get))
        .route("/fhir/", post(system_bundle).get(system_get))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/_history", get(system_history))
        .route("/fhir/{rtype}", get(search_get).post(create))
        .route("/fhir/{rtype}/_search", post(search_post))
        .route("/fhir/{rtype}/_history", get(type_history))
        .route("/fhir/{rtype}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{rtype}/{id}/_history", get(instance_history))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .route("/fhir/{rtype}/{id}/_history/{vid}/$verify", get(verify_version))
        .route("/fhir/$verify-dicom", get(verify_dicom))
        .route("/fhir/Patient/{id}/$everything", get(everything))
        .fallback(|| async { FhirError::NotFound("no such FHIR endpoint".into()) })
        .layer(axum::middleware::from_fn(count_request))
        .with_state(ctx)
}

/// `hms_fhir_requests_total{method, code}` (code: the status class, `2xx`…`5xx`) and the
/// `hms_fhir_request_seconds` summary, for `/metrics` and the Grafana dashboard.
async fn count_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    let started = Instant::now();
    let res = next.run(req).await;
    let code = match res.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("hms_fhir_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("hms_fhir_request_seconds").record(started.elapsed().as_secs_f64());
    res
}
