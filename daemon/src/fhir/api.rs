//! The FHIR R4 REST API (axum), base `/fhir`. Every request either answers with a resource or
//! Bundle, or with an OperationOutcome and the right 4xx/5xx status; every access to patient data
//! is audited in the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::auth::{Interaction, Principal, Verifier};
use super::search::{self, SearchRequest, Total};
use super::storage::{self, AuditRecord, Written};
use super::{FhirError, date, params, parse_resource};
use crate::store::Store;

/// FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
/// Search result snapshots kept for paging.
const PAGE_CACHE_ENTRIES: usize = 512;
/// Ids held by all kept snapshots together (~100 bytes each): a `$everything` of a patient with
/// years of records is thousands of ids, and 512 of those held ~250 MiB in the 1M-resource
/// benchmark. The oldest snapshots go first; their `next` links then answer 410 Gone.
const PAGE_CACHE_MAX_IDS: usize = 250_000;
/// How long a search snapshot stays pageable.
const PAGE_TTL: Duration = Duration::from_secs(30 * 60);

/// What the API needs from the daemon.
pub struct FhirContext {
    pub store: Arc<Store>,
    /// Token verifier; `None` when authentication is off (development, loopback only).
    pub verifier: Option<Verifier>,
    /// Largest request body accepted (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// The integrity ledger, for `$verify`.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// Workstation client-certificate CN → granted SMART scopes (`fhir.client_certs`).
    pub client_certs: std::collections::BTreeMap<String, String>,
    pages: Mutex<HashMap<String, Arc<Snapshot>>>,
    audits: Arc<AuditQueue>,
    /// Transaction and batch Bundles being read, parsed or written ([`MAX_CONCURRENT_BUNDLES`]).
    bundles: tokio::sync::Semaphore,
}

/// Transaction and batch Bundles handled at once. A Synthea patient Bundle is a few MB of JSON
/// and tens of MB once parsed; they are written one at a time by the store's single writer
/// anyway, so more than two in memory (one writing, the next parsed and waiting) only raises the
/// daemon's RSS. Others wait for a permit before their body is read.
pub const MAX_CONCURRENT_BUNDLES: usize = 2;

/// Audit records of read-type accesses waiting for the store's writer. All records queued
/// while a flush is pending go into that one write (one savepoint in the group commit), so a
/// burst of reads costs one queued write, not one per read.
#[derive(Default)]
struct AuditQueue {
    /// (records, a flush is scheduled)
    pending: Mutex<(Vec<AuditRecord>, bool)>,
}

impl std::fmt::Debug for FhirContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirContext").finish_non_exhaustive()
    }
}

impl FhirContext {
    /// Writes the read audit records still waiting for their batch; called on shutdown before
    /// the store closes.
    pub async fn flush_audits(&self) {
        if !self.audits.pending.lock().expect("audit queue").0.is_empty() {
            write_pending_audits(&self.store, &self.audits).await;
        }
    }

    pub fn new(
        store: Arc<Store>,
        max_body_bytes: usize,
        verifier: Option<Verifier>,
        ledger: Arc<crate::ledger::Ledger>,
        client_certs: std::collections::BTreeMap<String, String>,
    ) -> Arc<Self> {
        Arc::new(FhirContext {
            store,
            verifier,
            max_body_bytes,
            ledger,
            client_certs,
            pages: Mutex::new(HashMap::new()),
            audits: Arc::default(),
            bundles: tokio::sync::Semaphore::new(MAX_CONCURRENT_BUNDLES),
        })
    }
}

/// A search's complete, ordered result at the time of the first page: later pages slice it, so
/// concurrent writes never shift entries between pages.
struct Snapshot {
    req: SearchRequest,
    ids: Vec<String>,
    created: Instant,
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

pub(super) type ApiResult = Result<Response, FhirError>;

pub fn router(ctx: Arc<FhirContext>) -> Router {
    Router::new()
        .merge(super::audit_api::routes())
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

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        if let FhirError::Internal(m) = &self {
            tracing::error!(error = %m, "FHIR request failed");
        }
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, self.outcome().to_string()).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
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

pub(super) fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("https://{host}/fhir")
}

fn query_flag<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(a, _)| a == k).map(|(_, b)| b.as_str())
}

/// Checks `_format` / `Accept`: only JSON is served.
pub(super) fn check_format(q: &[(String, String)], headers: &HeaderMap) -> Result<(), FhirError> {
    if let Some(f) = query_flag(q, "_format")
        && !matches!(f, "json" | "application/json" | "application/fhir+json")
    {
        return Err(FhirError::NotAcceptable(format!("_format={f} is not supported; use json")));
    }
    if let Some(a) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        let ok = a.split(',').any(|t| {
            let t = t.split(';').next().unwrap_or("").trim();
            matches!(t, "*/*" | "application/*" | "application/json" | "application/fhir+json" | "")
        });
        if !ok {
            return Err(FhirError::NotAcceptable(format!(
                "cannot answer in {a}; use application/fhir+json"
            )));
        }
    }
    Ok(())
}

pub(super) fn json_response(status: StatusCode, body: &Value, q: &[(String, String)]) -> Response {
    let text = if query_flag(q, "_pretty") == Some("true") {
        serde_json::to_string_pretty(body).unwrap_or_default()
    } else {
        body.to_string()
    };
    let mut r = (status, text).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

/// A response from JSON text that is already serialised (a stored resource, a Bundle built from
/// stored resources): sent as is, parsed again only for `_pretty=true`.
fn raw_json_response(status: StatusCode, text: String, q: &[(String, String)]) -> Response {
    let text = if query_flag(q, "_pretty") == Some("true") {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(text),
            Err(_) => text,
        }
    } else {
        text
    };
    let mut r = (status, text).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

/// A Bundle whose `entry` array is made of already serialised entries (see [`entry_json`]):
/// `head` holds every other element.
fn bundle_response(head: &Value, entries: &[String], q: &[(String, String)]) -> Response {
    let mut text = head.to_string();
    text.pop(); // the closing brace of the object
    let len: usize = entries.iter().map(|e| e.len() + 1).sum();
    text.reserve(len + 16);
    if text.len() > 1 {
        text.push(',');
    }
    text.push_str("\"entry\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(e);
    }
    text.push_str("]}");
    raw_json_response(StatusCode::OK, text, q)
}

/// One serialised Bundle entry around a serialised resource.
fn entry_json(full_url: &str, resource: &str, mode: &str) -> String {
    format!(
        "{{\"fullUrl\":{},\"resource\":{resource},\"search\":{{\"mode\":\"{mode}\"}}}}",
        Value::String(full_url.to_owned())
    )
}

/// Formats ms since epoch as an HTTP date (IMF-fixdate).
fn http_date(ms: i64) -> String {
    let iso = date::format_instant(ms);
    let days = ms.div_euclid(86_400_000);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let m: usize = iso[5..7].parse().unwrap_or(1);
    format!("{wd}, {} {} {} {} GMT", &iso[8..10], months[m - 1], &iso[0..4], &iso[11..19])
}

pub(super) fn version_headers(r: &mut Response, version: i64, last_updated: i64) {
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(last_updated)) {
        r.headers_mut().insert(header::LAST_MODIFIED, v);
    }
}

fn check_type(rtype: &str) -> Result<(), FhirError> {
    if super::is_resource_type(rtype) {
        Ok(())
    } else {
        Err(FhirError::NotFound(format!("unknown resource type {rtype:?}")))
    }
}

fn check_id(id: &str) -> Result<(), FhirError> {
    if super::valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::BadRequest(format!("{id:?} is not a valid FHIR id")))
    }
}

/// Applies `_elements` (top-level elements plus the mandatory ones) and marks the result.
fn apply_elements(mut v: Value, elements: &Option<Vec<String>>) -> Value {
    let Some(keep) = elements else { return v };
    if let Value::Object(map) = &mut v {
        map.retain(|k, _| matches!(k.as_str(), "resourceType" | "id" | "meta") || keep.contains(k));
        let meta = map.entry("meta").or_insert_with(|| json!({}));
        if let Value::Object(m) = meta {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Value::Array(t) = tags {
                t.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}));
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Read interactions

async fn metadata(headers: HeaderMap, Query(q): Query<Vec<(String, String)>>) -> ApiResult {
    check_format(&q, &headers)?;
    Ok(json_response(StatusCode::OK, &capability_statement(&base_url(&headers)), &q))
}

/// The CapabilityStatement, generated from the same tables that drive indexing and search.
pub fn capability_statement(base: &str) -> Value {
    let mut resources = Vec::new();
    for &t in super::R4_RESOURCE_TYPES {
        let mut interactions = vec!["read", "vread", "history-instance", "history-type"];
        if !super::READ_ONLY_TYPES.contains(&t) {
            interactions.extend(["create", "update", "delete"]);
        }
        let mut r = json!({
            "type": t,
            "versioning": "versioned-update",
            "readHistory": true,
            "updateCreate": !super::READ_ONLY_TYPES.contains(&t),
            "conditionalCreate": !super::READ_ONLY_TYPES.contains(&t),
            "conditionalDelete": "not-supported",
            "interaction": [],
        });
        if t == "AuditEvent" {
            // Served from the audit trail itself (`fhir::audit_api`), with its own parameters.
            r["interaction"] = json!([{"code": "read"}, {"code": "vread"},
                {"code": "history-instance"}, {"code": "search-type"}]);
            r["searchParam"] = Value::Array(
                crate::audit::SEARCH_PARAMS
                    .iter()
                    .map(|(name, kind)| json!({"name": name, "type": kind}))
                    .collect(),
            );
            resources.push(r);
            continue;
        }
        if let Some(defs) = params::params_for(t) {
            interactions.push("search-type");
            let mut sp = vec![
                json!({"name": "_id", "type": "token"}),
                json!({"name": "_lastUpdated", "type": "date"}),
            ];
            for d in defs.iter().filter(|d| super::index::is_supported(t, d.code)) {
                sp.push(json!({
                    "name": d.code,
                    "definition": format!("http://hl7.org/fhir/SearchParameter/{t}-{}", d.code),
                    "type": d.kind.as_str(),
                }));
            }
            r["searchParam"] = Value::Array(sp);
            let refs: Vec<String> = defs
                .iter()
                .filter(|d| d.kind == params::ParamKind::Reference)
                .map(|d| format!("{t}:{}", d.code))
                .collect();
            r["searchInclude"] = json!(refs);
        }
        r["interaction"] = Value::Array(interactions.iter().map(|i| json!({"code": i})).collect());
        resources.push(r);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date::format_instant(crate::store::now_ms())[..10],
        "kind": "instance",
        "software": {"name": "hms-edge", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "hms-edge on-premise FHIR cache", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]
        }]
    })
}

async fn read(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    check_id(&id)?;
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Read)?;
    let (rt, i) = (rtype.clone(), id.clone());
    let current = ctx.store.read(move |c| storage::read_current(c, &rt, &i)).await?;
    let entity = format!("{rtype}/{id}");
    match current {
        None => {
            audit_read(&ctx, &who, "read", entity, "404");
            Err(FhirError::NotFound(format!("{rtype}/{id} is not known")))
        }
        Some(c) if c.deleted => {
            audit_read(&ctx, &who, "read", entity, "410");
            Err(FhirError::Gone(format!("{rtype}/{id} was deleted (version {})", c.version)))
        }
        Some(c) => {
            audit_read(&ctx, &who, "read", entity, "success");
            let text = c.json.unwrap_or_else(|| "{}".into());
            let mut r = match query_flag(&q, "_elements") {
                // The stored text is the canonical serialisation: sent without re-parsing.
                None => raw_json_response(StatusCode::OK, text, &q),
                Some(e) => {
                    let body: Value = serde_json::from_str(&text)
                        .map_err(|e| FhirError::Internal(e.to_string()))?;
                    let elements = Some(e.split(',').map(|s| s.trim().to_owned()).collect());
                    json_response(StatusCode::OK, &apply_elements(body, &elements), &q)
                }
            };
            version_headers(&mut r, c.version, c.last_updated);
            Ok(r)
        }
    }
}

async fn vread(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    check_id(&id)?;
    let v: i64 = vid.parse().map_err(|_| FhirError::NotFound(format!("no version {vid:?}")))?;
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Read)?;
    let (rt, i) = (rtype.clone(), id.clone());
    let ver = ctx.store.read(move |c| storage::read_version(c, &rt, &i, v)).await?;
    audit_read(
        &ctx,
        &who,
        "vread",
        format!("{rtype}/{id}/_history/{v}"),
        if ver.is_some() { "success" } else { "404" },
    );
    match ver {
        None => Err(FhirError::NotFound(format!("{rtype}/{id} has no version {v}"))),
        Some(ver) if ver.json.is_none() => {
            Err(FhirError::Gone(format!("{rtype}/{id} version {v} is a deletion")))
        }
        Some(ver) => {
            let body: Value = serde_json::from_str(ver.json.as_deref().unwrap_or("{}"))
                .map_err(|e| FhirError::Internal(e.to_string()))?;
            let mut r = json_response(StatusCode::OK, &body, &q);
            version_headers(&mut r, ver.version, ver.last_updated);
            Ok(r)
        }
    }
}

/// `GET /fhir/{type}/{id}/_history/{vid}/$verify`: the integrity proof of one stored version
/// (see `crate::ledger::proof`). A version that no longer matches its ledger leaf is answered
/// 409 with an OperationOutcome naming it.
async fn verify_version(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    check_id(&id)?;
    let v: i64 = vid.parse().map_err(|_| FhirError::NotFound(format!("no version {vid:?}")))?;
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Read)?;
    let subject = crate::ledger::Subject::Fhir { rtype: rtype.clone(), id: id.clone(), version: v };
    let out = ctx.ledger.prove(&ctx.store, subject).await;
    proof_response(&ctx, &who, format!("{rtype}/{id}/_history/{v}"), out, &q)
}

/// `GET /fhir/$verify-dicom?sop=<SOP Instance UID>[&version=<n>]`: the integrity proof of a
/// stored DICOM instance (newest version unless given). Needs read access to ImagingStudy.
async fn verify_dicom(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = authorize(&ctx, &headers, addr.as_deref(), "ImagingStudy", Interaction::Read)?;
    let sop = query_flag(&q, "sop")
        .filter(|s| !s.is_empty() && s.len() <= 64)
        .ok_or_else(|| FhirError::BadRequest("parameter sop (SOP Instance UID) required".into()))?
        .to_owned();
    let version = match query_flag(&q, "version") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| FhirError::BadRequest(format!("version {v:?} is not a number")))?,
        ),
    };
    let subject = crate::ledger::Subject::Dicom { sop_uid: sop.clone(), version };
    let out = ctx.ledger.prove(&ctx.store, subject).await;
    proof_response(&ctx, &who, format!("dicom:{sop}"), out, &q)
}

fn proof_response(
    ctx: &FhirContext,
    who: &Caller,
    entity: String,
    out: Result<crate::ledger::proof::ProofDoc, crate::ledger::LedgerError>,
    q: &[(String, String)],
) -> ApiResult {
    use crate::ledger::LedgerError;
    let outcome = match &out {
        Ok(_) => "success".to_string(),
        Err(LedgerError::NotFound(_)) => "404".into(),
        Err(LedgerError::Tampered(_)) => "409 integrity check failed".into(),
        Err(LedgerError::Store(_)) => "500".into(),
    };
    audit_read(ctx, who, "verify", entity, &outcome);
    match out {
        Ok(doc) => {
            let body =
                serde_json::to_value(&doc).map_err(|e| FhirError::Internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &body, q))
        }
        Err(LedgerError::NotFound(m)) => Err(FhirError::NotFound(m)),
        Err(e @ LedgerError::Tampered(_)) => Err(FhirError::Conflict(e.to_string())),
        Err(LedgerError::Store(e)) => Err(e.into()),
    }
}

fn history_bundle(base: &str, versions: Vec<storage::Version>) -> Value {
    let entries: Vec<Value> = versions
        .into_iter()
        .map(|v| {
            let full = format!("{base}/{}/{}", v.rtype, v.id);
            let mut e = json!({
                "fullUrl": full,
                "request": {"method": v.method, "url": if v.method == "POST" { v.rtype.clone() } else { format!("{}/{}", v.rtype, v.id) }},
                "response": {"status": if v.method == "DELETE" { "204" } else if v.method == "POST" { "201" } else { "200" },
                             "etag": format!("W/\"{}\"", v.version), "lastModified": date::format_instant(v.last_updated)}
            });
            if let Some(j) = v.json
                && let Ok(r) = serde_json::from_str::<Value>(&j)
            {
                e["resource"] = r;
            }
            e
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries})
}

async fn history_common(
    ctx: Arc<FhirContext>,
    rtype: Option<String>,
    id: Option<String>,
    q: Vec<(String, String)>,
    headers: HeaderMap,
    addr: Option<ClientAddr>,
) -> ApiResult {
    check_format(&q, &headers)?;
    if let Some(t) = &rtype {
        check_type(t)?;
    }
    if let Some(i) = &id {
        check_id(i)?;
    }
    let since = match query_flag(&q, "_since") {
        Some(s) => Some(
            date::parse_range(s)
                .ok_or_else(|| FhirError::BadRequest(format!("_since={s:?} is not a date")))?
                .0,
        ),
        None => None,
    };
    let count = match query_flag(&q, "_count") {
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| FhirError::BadRequest("_count must be an integer".into()))?
            .min(search::MAX_COUNT),
        None => 100,
    };
    let who = authorize(
        &ctx,
        &headers,
        addr.as_ref(),
        rtype.as_deref().unwrap_or("*"),
        Interaction::Read,
    )?;
    let (rt, i) = (rtype.clone(), id.clone());
    let versions = ctx
        .store
        .read(move |c| storage::history(c, rt.as_deref(), i.as_deref(), since, count))
        .await?;
    let entity = match (&rtype, &id) {
        (Some(t), Some(i)) => format!("{t}/{i}/_history"),
        (Some(t), None) => format!("{t}/_history"),
        _ => "_history".into(),
    };
    if rtype.is_some() && id.is_some() && versions.is_empty() {
        audit_read(&ctx, &who, "history", entity, "404");
        return Err(FhirError::NotFound("no such resource".into()));
    }
    audit_read(&ctx, &who, "history", entity, "success");
    Ok(json_response(StatusCode::OK, &history_bundle(&base_url(&headers), versions), &q))
}

async fn system_history(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    history_common(ctx, None, None, q, headers, addr.map(|a| a.0)).await
}

async fn type_history(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    history_common(ctx, Some(rtype), None, q, headers, addr.map(|a| a.0)).await
}

async fn instance_history(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    history_common(ctx, Some(rtype), Some(id), q, headers, addr.map(|a| a.0)).await
}

// ---------------------------------------------------------------------------------------------
// Search

pub(super) fn strict_handling(headers: &HeaderMap) -> bool {
    prefer(headers, "handling").as_deref() == Some("strict")
}

fn prefer(headers: &HeaderMap, key: &str) -> Option<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
}

async fn search_get(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    run_search(ctx, rtype, q, headers, addr.map(|a| a.0)).await
}

async fn search_post(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(mut q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
    body: Body,
) -> ApiResult {
    // Who is asking, and whether they may search this type, is known before the body is read.
    check_type(&rtype)?;
    authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Search)?;
    let bytes = read_body(&ctx, body).await?;
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| FhirError::BadRequest(format!("_search body must be form-encoded: {e}")))?;
    q.extend(form);
    run_search(ctx, rtype, q, headers, addr.map(|a| a.0)).await
}

async fn run_search(
    ctx: Arc<FhirContext>,
    rtype: String,
    q: Vec<(String, String)>,
    headers: HeaderMap,
    addr: Option<ClientAddr>,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    let who = authorize(&ctx, &headers, addr.as_ref(), &rtype, Interaction::Search)?;
    let req = search::parse(&rtype, &q, strict_handling(&headers))?;
    let entity = format!("{rtype}?{}", serde_urlencoded::to_string(&q).unwrap_or_default());
    let r2 = req.clone();
    let ids = ctx.store.read_as(move |c| search::execute(c, &r2)).await?;
    audit_read(&ctx, &who, "search", entity, "success");
    let base = base_url(&headers);
    if req.summary_count {
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": ids.len()});
        return Ok(json_response(StatusCode::OK, &b, &q));
    }
    let snap = Arc::new(Snapshot { req, ids, created: Instant::now() });
    if snap.ids.len() <= snap.req.count {
        // One page holds every match: nothing to page through, so no snapshot is kept and the
        // self link is the search itself.
        let query = serde_urlencoded::to_string(&q).unwrap_or_default();
        let self_url = format!("{base}/{}?{query}", snap.req.rtype);
        return page_bundle(&ctx, &base, PageKey::Single(&self_url), &snap, 0, &q, &who).await;
    }
    let key = remember(&ctx, snap.clone());
    page_bundle(&ctx, &base, PageKey::Snapshot(&key), &snap, 0, &q, &who).await
}

/// How a page of search results refers to itself.
#[derive(Clone, Copy)]
enum PageKey<'a> {
    /// A kept snapshot (`_getpages`).
    Snapshot(&'a str),
    /// The only page; its URL.
    Single(&'a str),
}

fn remember(ctx: &FhirContext, snap: Arc<Snapshot>) -> String {
    let mut key = [0u8; 16];
    rand::fill(&mut key);
    let key = hex::encode(key);
    let mut pages = ctx.pages.lock().expect("page cache");
    pages.retain(|_, s| s.created.elapsed() < PAGE_TTL);
    let mut held: usize = pages.values().map(|s| s.ids.len()).sum::<usize>() + snap.ids.len();
    while !pages.is_empty() && (pages.len() >= PAGE_CACHE_ENTRIES || held > PAGE_CACHE_MAX_IDS) {
        let Some(oldest) = pages.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone())
        else {
            break;
        };
        if let Some(gone) = pages.remove(&oldest) {
            held -= gone.ids.len();
        }
    }
    pages.insert(key.clone(), snap);
    key
}

/// A stored resource as its serialised JSON.
struct Loaded {
    rtype: String,
    id: String,
    json: String,
}

impl Loaded {
    /// The Bundle entry of this resource (`_elements` applied if asked for).
    fn entry(self, base: &str, mode: &str, elements: &Option<Vec<String>>) -> String {
        let url = format!("{base}/{}/{}", self.rtype, self.id);
        match elements {
            None => entry_json(&url, &self.json, mode),
            Some(_) => {
                let v = serde_json::from_str::<Value>(&self.json).unwrap_or(Value::Null);
                entry_json(&url, &apply_elements(v, elements).to_string(), mode)
            }
        }
    }
}

/// The current versions of `keys` (deleted and unknown ones left out), in order.
async fn load_resources(
    ctx: &FhirContext,
    keys: Vec<(String, String)>,
) -> Result<Vec<Loaded>, FhirError> {
    ctx.store
        .read(move |c| {
            let mut out = Vec::with_capacity(keys.len());
            for (rtype, id) in keys {
                if let Some(cur) = storage::read_current(c, &rtype, &id)?
                    && let Some(json) = cur.json
                    && !cur.deleted
                {
                    out.push(Loaded { rtype, id, json });
                }
            }
            Ok(out)
        })
        .await
        .map_err(Into::into)
}

/// `self`, `next` and `previous` links of one page of a snapshot.
fn page_links(base: &str, key: &str, offset: usize, count: usize, total: usize) -> Vec<Value> {
    let url = |off: usize| format!("{base}?_getpages={key}&_getpagesoffset={off}&_count={count}");
    let mut links = vec![json!({"relation": "self", "url": url(offset)})];
    if offset + count < total {
        links.push(json!({"relation": "next", "url": url(offset + count)}));
    }
    if offset > 0 {
        links.push(json!({"relation": "previous", "url": url(offset.saturating_sub(count))}));
    }
    links
}

async fn page_bundle(
    ctx: &Arc<FhirContext>,
    base: &str,
    key: PageKey<'_>,
    snap: &Arc<Snapshot>,
    offset: usize,
    q: &[(String, String)],
    who: &Caller,
) -> ApiResult {
    let req = &snap.req;
    let count = req.count;
    let page_ids: Vec<String> = snap.ids.iter().skip(offset).take(count).cloned().collect();
    let rtype = req.rtype.clone();
    let matches =
        load_resources(ctx, page_ids.iter().map(|i| (rtype.clone(), i.clone())).collect()).await?;
    let mut entries: Vec<String> =
        matches.into_iter().map(|r| r.entry(base, "match", &req.elements)).collect();
    if !req.includes.is_empty() || !req.revincludes.is_empty() {
        let (r2, ids2, rt2) = (req.clone(), page_ids.clone(), rtype.clone());
        let extra = ctx
            .store
            .read_as(move |c| -> Result<_, FhirError> {
                let mut keys = Vec::new();
                for inc in &r2.includes {
                    keys.extend(search::include_targets(c, &rt2, &ids2, inc)?);
                }
                for inc in &r2.revincludes {
                    keys.extend(search::revinclude_sources(c, &rt2, &ids2, inc)?);
                }
                keys.sort();
                keys.dedup();
                keys.truncate(search::MAX_INCLUDED);
                Ok(keys)
            })
            .await?;
        // Included resources the caller may not read are left out, not leaked.
        let extra: Vec<(String, String)> =
            extra.into_iter().filter(|(t, _)| who.principal.allows(t, Interaction::Read)).collect();
        for r in load_resources(ctx, extra).await? {
            entries.push(r.entry(base, "include", &None));
        }
    }
    let links = match key {
        PageKey::Snapshot(key) => page_links(base, key, offset, count, snap.ids.len()),
        PageKey::Single(url) => vec![json!({"relation": "self", "url": url})],
    };
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "link": links});
    if req.total != Total::None {
        bundle["total"] = json!(snap.ids.len());
    }
    if !req.ignored.is_empty() {
        let oo = super::operation_outcome(
            "warning",
            "not-supported",
            &format!("ignored search parameters: {}", req.ignored.join(", ")),
        );
        entries.push(json!({"resource": oo, "search": {"mode": "outcome"}}).to_string());
    }
    Ok(bundle_response(&bundle, &entries, q))
}

/// `GET /fhir?_getpages=…` (paging) — anything else at the root is not supported.
async fn system_get(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    let Some(key) = query_flag(&q, "_getpages") else {
        return Err(FhirError::BadRequest(
            "system-level search is not supported; search a resource type".into(),
        ));
    };
    let snap = ctx.pages.lock().expect("page cache").get(key).cloned().ok_or_else(|| {
        FhirError::Gone("this search page has expired; run the search again".into())
    })?;
    let offset = query_flag(&q, "_getpagesoffset").and_then(|o| o.parse().ok()).unwrap_or(0);
    if snap.req.rtype == "*" {
        // A page of Patient/$everything.
        let who = authorize(&ctx, &headers, addr.as_deref(), "Patient", Interaction::Read)?;
        audit_read(&ctx, &who, "everything-page", format!("?_getpages={key}"), "success");
        return everything_page(&ctx, &base_url(&headers), key, &snap, offset, &q, &who).await;
    }
    let who = authorize(&ctx, &headers, addr.as_deref(), &snap.req.rtype, Interaction::Search)?;
    audit_read(&ctx, &who, "search-page", format!("{}?_getpages={key}", snap.req.rtype), "success");
    page_bundle(&ctx, &base_url(&headers), PageKey::Snapshot(key), &snap, offset, &q, &who).await
}

async fn everything(
    State(ctx): State<Arc<FhirContext>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_id(&id)?;
    let who = authorize(&ctx, &headers, addr.as_deref(), "Patient", Interaction::Read)?;
    let count = query_flag(&q, "_count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(100usize)
        .min(search::MAX_COUNT);
    let pid = id.clone();
    let keys = ctx
        .store
        .read(move |c| {
            let cur = storage::read_current(c, "Patient", &pid)?;
            if cur.is_none_or(|c| c.deleted) {
                return Ok(None);
            }
            // Index rows exist only for current, not deleted versions (a delete or an update
            // clears them), so the compartment is read from the covering target index alone.
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT r.rtype, r.id FROM fhir_idx_ref r
                 WHERE r.target_id = ?1 AND r.target_type = 'Patient' ORDER BY r.rtype, r.id",
            )?;
            let mut keys = vec![("Patient".to_string(), pid.clone())];
            for row in
                stmt.query_map([&pid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            {
                let k = row?;
                if k.0 != "Patient" || k.1 != pid {
                    keys.push(k);
                }
            }
            Ok(Some(keys))
        })
        .await?;
    let Some(keys) = keys else {
        audit_read(&ctx, &who, "everything", format!("Patient/{id}"), "404");
        return Err(FhirError::NotFound(format!("Patient/{id} is not known")));
    };
    audit_read(&ctx, &who, "everything", format!("Patient/{id}"), "success");
    // Paged like a search: the compartment is snapshotted as (type, id) pairs.
    let ids: Vec<String> = keys.iter().map(|(t, i)| format!("{t}/{i}")).collect();
    let req = SearchRequest {
        rtype: "*".into(),
        clauses: vec![],
        sort: vec![],
        count,
        includes: vec![],
        revincludes: vec![],
        total: Total::Accurate,
        summary_count: false,
        elements: None,
        ignored: vec![],
    };
    let snap = Arc::new(Snapshot { req, ids, created: Instant::now() });
    let key = remember(&ctx, snap.clone());
    everything_page(&ctx, &base_url(&headers), &key, &snap, 0, &q, &who).await
}

async fn everything_page(
    ctx: &Arc<FhirContext>,
    base: &str,
    key: &str,
    snap: &Arc<Snapshot>,
    offset: usize,
    q: &[(String, String)],
    who: &Caller,
) -> ApiResult {
    let count = snap.req.count;
    let keys: Vec<(String, String)> = snap
        .ids
        .iter()
        .skip(offset)
        .take(count)
        .filter_map(|k| k.split_once('/').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let keys: Vec<(String, String)> =
        keys.into_iter().filter(|(t, _)| who.principal.allows(t, Interaction::Read)).collect();
    let entries: Vec<String> = load_resources(ctx, keys)
        .await?
        .into_iter()
        .map(|r| r.entry(base, "match", &None))
        .collect();
    let links = page_links(base, key, offset, count, snap.ids.len());
    let b = json!({"resourceType": "Bundle", "type": "searchset", "total": snap.ids.len(), "link": links});
    Ok(bundle_response(&b, &entries, q))
}

// ---------------------------------------------------------------------------------------------
// Writes

/// A request body must arrive within this (a slow-loris body holds a connection and a task).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn read_body(ctx: &FhirContext, body: Body) -> Result<Bytes, FhirError> {
    let read =
        tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, ctx.max_body_bytes));
    let Ok(read) = read.await else {
        return Err(FhirError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            BODY_READ_TIMEOUT.as_secs()
        )));
    };
    read.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("length limit")
            || std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"))
        {
            FhirError::PayloadTooLarge(format!("request body exceeds {} bytes", ctx.max_body_bytes))
        } else {
            FhirError::BadRequest(format!("cannot read request body: {msg}"))
        }
    })
}

fn check_content_type(headers: &HeaderMap) -> Result<(), FhirError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let t = ct.split(';').next().unwrap_or("").trim();
        if !matches!(t, "application/fhir+json" | "application/json" | "application/json+fhir") {
            return Err(FhirError::UnsupportedMediaType(format!(
                "Content-Type {ct} is not supported; send application/fhir+json"
            )));
        }
    }
    Ok(())
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<i64>, FhirError> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    let inner = s.trim_start_matches("W/").trim_matches('"');
    inner.parse().map(Some).map_err(|_| {
        FhirError::BadRequest(format!("If-Match {s:?} is not a version ETag like W/\"3\""))
    })
}

/// A server-assigned id: a UUIDv7 (48-bit millisecond time, then random bits). Time-ordered ids
/// make the primary key, the owner indexes and the reference target index grow at their end
/// instead of touching a random page (decrypted and re-encrypted by SQLCipher) per insert.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    let ms = (crate::store::now_ms().max(0) as u64).to_be_bytes();
    b[..6].copy_from_slice(&ms[2..]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn check_writable(rtype: &str) -> Result<(), FhirError> {
    if super::READ_ONLY_TYPES.contains(&rtype) {
        return Err(FhirError::MethodNotAllowed(format!("{rtype} is written by the server only")));
    }
    Ok(())
}

/// Answers a write according to `Prefer: return=`.
fn write_response(
    headers: &HeaderMap,
    base: &str,
    w: &Written,
    status: StatusCode,
    q: &[(String, String)],
) -> Response {
    let mut r = match prefer(headers, "return").as_deref() {
        Some("minimal") => status.into_response(),
        Some("OperationOutcome") => {
            let oo = super::operation_outcome(
                "information",
                "informational",
                &format!("{}/{} stored as version {}", w.rtype, w.id, w.version),
            );
            json_response(status, &oo, q)
        }
        _ => match w.json.as_deref().and_then(|j| serde_json::from_str::<Value>(j).ok()) {
            Some(body) => json_response(status, &body, q),
            // No body to show (or the caller may not read it): the headers say what happened.
            None => status.into_response(),
        },
    };
    version_headers(&mut r, w.version, w.last_updated);
    if let Ok(loc) =
        HeaderValue::from_str(&format!("{base}/{}/{}/_history/{}", w.rtype, w.id, w.version))
    {
        r.headers_mut().insert(header::LOCATION, loc.clone());
        r.headers_mut().insert(header::CONTENT_LOCATION, loc);
    }
    r
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

async fn create(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
    body: Body,
) -> ApiResult {
    check_type(&rtype)?;
    check_writable(&rtype)?;
    check_content_type(&headers)?;
    // Authenticate and check the scope first: an unauthenticated caller never gets a body read
    // and parsed (JSON parsing multiplies memory).
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Create)?;
    let bytes = read_body(&ctx, body).await?;
    let mut resource = parse_resource(&bytes, &rtype)?;
    let if_none_exist =
        headers.get("if-none-exist").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cond = match &if_none_exist {
        Some(s) => {
            // The match test is a search: a create-only token may not learn what exists.
            authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Search)?;
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(s.trim_start_matches('?'))
                    .map_err(|e| FhirError::BadRequest(format!("If-None-Exist: {e}")))?;
            Some(search::parse(&rtype, &pairs, true)?)
        }
        None => None,
    };
    let id = new_id();
    resource["id"] = Value::String(id.clone());
    let rt = rtype.clone();
    let outcome = ctx
        .store
        .write_as(move |tx| -> Result<_, FhirError> {
            if let Some(req) = &cond {
                let found = search::execute(tx.sql(), req)?;
                match found.len() {
                    0 => {}
                    1 => {
                        let cur =
                            storage::read_current(tx.sql(), &rt, &found[0])?.ok_or_else(|| {
                                FhirError::Conflict("the match was just deleted".into())
                            })?;
                        // The existing resource goes back only to a caller who may read it,
                        // and that disclosure is audited like any read.
                        let may_read = who.principal.allows(&rt, Interaction::Read);
                        let entity = format!("{rt}/{}", found[0]);
                        storage::audit(tx, &write_audit(&who, "create-matched-existing", entity))?;
                        return Ok((
                            false,
                            Written {
                                rtype: rt.clone(),
                                id: found[0].clone(),
                                version: cur.version,
                                last_updated: cur.last_updated,
                                json: if may_read { cur.json } else { None },
                                created: false,
                            },
                        ));
                    }
                    n => {
                        return Err(FhirError::PreconditionFailed(format!(
                            "If-None-Exist matched {n} resources"
                        )));
                    }
                }
            }
            let w = storage::put(tx, &rt, &id, resource, None, "local")?;
            storage::audit(tx, &write_audit(&who, "create", format!("{rt}/{}", w.id)))?;
            Ok((true, w))
        })
        .await?;
    let (created, w) = outcome;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(write_response(&headers, &base_url(&headers), &w, status, &q))
}

async fn update(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
    body: Body,
) -> ApiResult {
    check_type(&rtype)?;
    check_id(&id)?;
    check_writable(&rtype)?;
    check_content_type(&headers)?;
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Update)?;
    let bytes = read_body(&ctx, body).await?;
    let resource = parse_resource(&bytes, &rtype)?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::BadRequest(format!(
                "body id {body_id} does not match the URL id {id}"
            )));
        }
        None => return Err(FhirError::BadRequest("update needs the id in the body too".into())),
    }
    let if_match = parse_if_match(&headers)?;
    let rt = rtype.clone();
    let w = ctx
        .store
        .write_as(move |tx| -> Result<_, FhirError> {
            let w = storage::put(tx, &rt, &id, resource, if_match, "local")?;
            storage::audit(
                tx,
                &write_audit(
                    &who,
                    if w.created { "create" } else { "update" },
                    format!("{rt}/{}", w.id),
                ),
            )?;
            Ok(w)
        })
        .await?;
    let status = if w.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(write_response(&headers, &base_url(&headers), &w, status, &q))
}

async fn delete(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
) -> ApiResult {
    check_type(&rtype)?;
    check_id(&id)?;
    check_writable(&rtype)?;
    let who = authorize(&ctx, &headers, addr.as_deref(), &rtype, Interaction::Delete)?;
    let rt = rtype.clone();
    let w = ctx
        .store
        .write_as(move |tx| -> Result<_, FhirError> {
            let w = storage::delete(tx, &rt, &id, "local")?;
            storage::audit(tx, &write_audit(&who, "delete", format!("{rt}/{id}")))?;
            Ok(w)
        })
        .await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Some(w) = w
        && let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", w.version))
    {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Bundles: transaction and batch

async fn system_bundle(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    addr: Option<axum::Extension<ClientAddr>>,
    body: Body,
) -> ApiResult {
    check_content_type(&headers)?;
    // Who is asking is known before a large body is read and parsed.
    let who = authenticate(&ctx, &headers, addr.as_deref())?;
    let _permit =
        ctx.bundles.acquire().await.map_err(|_| FhirError::Unavailable("shutting down".into()))?;
    let bytes = read_body(&ctx, body).await?;
    let bundle = parse_resource(&bytes, "Bundle")?;
    drop(bytes);
    let base = base_url(&headers);
    match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => {
            let resp = super::bundle::transaction(&ctx.store, bundle, who).await?;
            Ok(json_response(StatusCode::OK, &resp, &q))
        }
        Some("batch") => {
            let resp = super::bundle::batch(&ctx.store, bundle, who, &base).await?;
            Ok(json_response(StatusCode::OK, &resp, &q))
        }
        Some(t) => Err(FhirError::BadRequest(format!(
            "Bundle.type {t} cannot be posted to the base; use transaction or batch"
        ))),
        None => Err(FhirError::BadRequest("Bundle.type is missing".into())),
    }
}

/// Bridges a method from a bundle entry (kept for the bundle module).
pub fn method_of(s: &str) -> Option<Method> {
    match s {
        "GET" => Some(Method::GET),
        "POST" => Some(Method::POST),
        "PUT" => Some(Method::PUT),
        "DELETE" => Some(Method::DELETE),
        _ => None,
    }
}

/// Helpers shared with the bundle module.
pub(crate) mod shared {
    pub(crate) use super::{Caller, new_id, write_audit};
    pub(crate) use crate::fhir::validate_resource;
}
