//! DICOMweb (PS3.18) on the FHIR HTTPS listener, base `/dicom-web`: QIDO-RS, WADO-RS and STOW-RS
//! over the same index, blobs and durable write path as the DICOM receiver, with the FHIR API's
//! authentication (SMART scopes on `ImagingStudy`: `s` for QIDO, `r` for WADO, `c` for STOW) and
//! audit (one audit row per access).
//!
//! Layers: protocol, no I/O — [`multipart`] (multipart/related writer pieces and a push parser),
//! [`json`] (DICOM JSON from a streaming data set walk, bulk data, frame locations), [`qido`]
//! (query parameters → `dicom::query`), [`part10`] (File Meta of an uploaded part); I/O — this
//! module (routes, auth, audit, SQL on the DICOM index) and [`stream`] (blob → response body on a
//! blocking thread through a small channel: an instance is never held in memory).

pub mod part10;
pub mod qido;
pub mod stow;
pub mod stream;

pub use hms_edge_dicom::{json, multipart};

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use crate::config::DuplicatePolicy;
use crate::dicom::index;
use crate::dicom::query::Level;
use crate::fhir::FhirError;
use crate::fhir::auth::Interaction;
use crate::http_caller::{Access, Caller, CallerState, Identity};
use crate::store::Store;

/// DICOM JSON media type.
pub const DICOM_JSON: &str = "application/dicom+json";
/// Resource type whose SMART scopes govern DICOMweb.
pub const SCOPE_TYPE: &str = "ImagingStudy";
/// Binary values up to this size are inlined in metadata; larger ones are bulk data.
pub const INLINE_MAX: u64 = 1024;

/// What DICOMweb needs from the daemon.
pub struct DicomWebContext {
    pub store: Arc<Store>,
    /// The FHIR API's authentication and read audit queue (one per listener).
    pub access: Arc<Access>,
    /// Largest request body (bytes, `fhir.max_body_bytes`): what is drained of a refused STOW.
    pub max_body_bytes: usize,
    pub duplicate_policy: DuplicatePolicy,
    /// Most QIDO matches returned when the client gives no `limit`.
    pub max_results: usize,
    /// Studies retrieved (WADO-RS), for eviction's least-recently-used order.
    pub accessed: Arc<crate::dicom::evict::AccessLog>,
    /// How long a retrieve waits for evicted instances to come back (`storage.recall_timeout_secs`).
    pub recall_timeout: std::time::Duration,
}

impl std::fmt::Debug for DicomWebContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomWebContext").finish_non_exhaustive()
    }
}

impl CallerState for Arc<DicomWebContext> {
    fn access(&self) -> &Arc<Access> {
        &self.access
    }
}

type Ctx = State<Arc<DicomWebContext>>;
type ApiResult = Result<Response, FhirError>;

/// The routes under `/dicom-web` (merged into the FHIR router; unknown paths get its 404).
pub fn router(ctx: Arc<DicomWebContext>) -> Router {
    Router::new()
        .route("/dicom-web/studies", get(qido_studies).post(stow::stow))
        .route("/dicom-web/series", get(qido_series))
        .route("/dicom-web/instances", get(qido_instances))
        .route("/dicom-web/studies/{study}", get(wado_study).post(stow::stow_in_study))
        .route("/dicom-web/studies/{study}/metadata", get(metadata_study))
        .route("/dicom-web/studies/{study}/series", get(qido_study_series))
        .route("/dicom-web/studies/{study}/instances", get(qido_study_instances))
        .route("/dicom-web/studies/{study}/series/{series}", get(wado_series))
        .route("/dicom-web/studies/{study}/series/{series}/metadata", get(metadata_series))
        .route("/dicom-web/studies/{study}/series/{series}/instances", get(qido_series_instances))
        .route("/dicom-web/studies/{study}/series/{series}/instances/{sop}", get(wado_instance))
        .route(
            "/dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata",
            get(metadata_instance),
        )
        .route(
            "/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
            get(stream::frames),
        )
        .route(
            "/dicom-web/studies/{study}/series/{series}/instances/{sop}/bulk/{spec}",
            get(stream::bulk),
        )
        .with_state(ctx)
}

/// `https://<host>/dicom-web`, from the request's Host.
pub(crate) fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("https://{host}/dicom-web")
}

/// The audit entity of a request: path and query (the FHIR API audits searches the same way).
fn entity(path: &str, q: &[(String, String)]) -> String {
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", serde_urlencoded::to_string(q).unwrap_or_default())
    }
}

pub(crate) fn check_uid(what: &str, uid: &str) -> Result<(), FhirError> {
    if uid.is_empty() || uid.len() > 64 || !uid.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(FhirError::BadRequest(format!("{what} {uid:?} is not a valid UID")));
    }
    Ok(())
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON));
    r
}

// ---- QIDO-RS --------------------------------------------------------------------------------

async fn qido_studies(
    s: Ctx,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    qido(s, q, h, c, Level::Study, None, None, "/dicom-web/studies").await
}
async fn qido_series(
    s: Ctx,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    qido(s, q, h, c, Level::Series, None, None, "/dicom-web/series").await
}
async fn qido_instances(
    s: Ctx,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    qido(s, q, h, c, Level::Image, None, None, "/dicom-web/instances").await
}
async fn qido_study_series(
    s: Ctx,
    Path(study): Path<String>,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    let p = format!("/dicom-web/studies/{study}/series");
    qido(s, q, h, c, Level::Series, Some(study), None, &p).await
}
async fn qido_study_instances(
    s: Ctx,
    Path(study): Path<String>,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    let p = format!("/dicom-web/studies/{study}/instances");
    qido(s, q, h, c, Level::Image, Some(study), None, &p).await
}
async fn qido_series_instances(
    s: Ctx,
    Path((study, series)): Path<(String, String)>,
    q: Query<Vec<(String, String)>>,
    h: HeaderMap,
    c: Caller,
) -> ApiResult {
    let p = format!("/dicom-web/studies/{study}/series/{series}/instances");
    qido(s, q, h, c, Level::Image, Some(study), Some(series), &p).await
}

#[allow(clippy::too_many_arguments)]
async fn qido(
    State(ctx): Ctx,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    level: Level,
    study: Option<String>,
    series: Option<String>,
    path: &str,
) -> ApiResult {
    let who = caller.authorize(SCOPE_TYPE, Interaction::Search)?;
    let ent = entity(path, &pairs);
    let parsed = (|| {
        if let Some(s) = &study {
            check_uid("Study Instance UID", s)?;
        }
        if let Some(s) = &series {
            check_uid("Series Instance UID", s)?;
        }
        qido::parse(level, &pairs, study.as_deref(), series.as_deref())
            .map_err(FhirError::BadRequest)
    })();
    let q = match parsed {
        Ok(q) => q,
        Err(e) => {
            who.audit_read("dicomweb-search", ent, "400");
            return Err(e);
        }
    };
    let query = q.query.clone();
    let cap = q.limit.unwrap_or(ctx.max_results).min(ctx.max_results);
    let offset = q.offset;
    // Only the requested window is kept in memory, however many instances match.
    let (records, more) = ctx.store.read(move |c| index::find_page(c, &query, offset, cap)).await?;
    let base = base_url(&headers);
    let out: Vec<Value> = records
        .iter()
        .map(|rec| {
            let g = |t| rec.get(&t).map(String::as_str).unwrap_or("");
            use crate::dicom::dataset::tags;
            let url = match level {
                Level::Study => format!("{base}/studies/{}", g(tags::STUDY_INSTANCE_UID)),
                Level::Series => format!(
                    "{base}/studies/{}/series/{}",
                    g(tags::STUDY_INSTANCE_UID),
                    g(tags::SERIES_INSTANCE_UID)
                ),
                Level::Image => format!(
                    "{base}/studies/{}/series/{}/instances/{}",
                    g(tags::STUDY_INSTANCE_UID),
                    g(tags::SERIES_INSTANCE_UID),
                    g(tags::SOP_INSTANCE_UID)
                ),
            };
            qido::record_json(&q, rec, &url)
        })
        .collect();
    who.audit_read("dicomweb-search", ent, "success");
    let mut r = json_response(StatusCode::OK, &Value::Array(out));
    if q.limit.is_none() && more {
        r.headers_mut().insert(
            header::WARNING,
            HeaderValue::from_static(
                "299 hms-edge \"The number of results exceeded the maximum supported by the server. Additional results can be requested.\"",
            ),
        );
    }
    Ok(r)
}

// ---- instance lookup ------------------------------------------------------------------------

/// A stored instance (newest version) with its place in the hierarchy, as the index reads it.
pub type Located = index::LatestInstance;

/// Instances of a study (optionally one series, one instance), in series/instance order.
pub(crate) async fn locate(
    ctx: &DicomWebContext,
    study: &str,
    series: Option<&str>,
    sop: Option<&str>,
) -> Result<Vec<Located>, FhirError> {
    check_uid("Study Instance UID", study)?;
    if let Some(s) = series {
        check_uid("Series Instance UID", s)?;
    }
    if let Some(s) = sop {
        check_uid("SOP Instance UID", s)?;
    }
    let (st, se, so) = (study.to_owned(), series.map(str::to_owned), sop.map(str::to_owned));
    let out: Vec<Located> = ctx
        .store
        .read(move |c| index::study_instances(c, &st, se.as_deref(), so.as_deref()))
        .await
        .map_err(|e| FhirError::Internal(e.to_string()))?;
    if out.is_empty() {
        let what = match (series, sop) {
            (_, Some(s)) => format!("instance {s}"),
            (Some(s), None) => format!("series {s}"),
            (None, None) => format!("study {study}"),
        };
        return Err(FhirError::NotFound(format!("no stored {what} in study {study}")));
    }
    Ok(out)
}

// ---- WADO-RS --------------------------------------------------------------------------------

/// Authorizes a retrieval, finds its instances and audits the access (also a refusal).
pub(crate) async fn retrieve_prelude(
    caller: &Caller,
    ctx: &DicomWebContext,
    action: &str,
    ids: (&str, Option<&str>, Option<&str>),
) -> Result<(Identity, Vec<Located>), FhirError> {
    let who = caller.authorize(SCOPE_TYPE, Interaction::Read)?;
    let (study, series, sop) = ids;
    let mut ent = format!("studies/{study}");
    if let Some(s) = series {
        ent.push_str(&format!("/series/{s}"));
    }
    if let Some(s) = sop {
        ent.push_str(&format!("/instances/{s}"));
    }
    let found = match locate(ctx, study, series, sop).await {
        Ok(found) if found.iter().any(|i| !i.held) => recall_for(ctx, study, found).await,
        other => other,
    };
    match found {
        Ok(found) => {
            who.audit_read(action, ent, "success");
            ctx.accessed.touch([study]);
            Ok((who, found))
        }
        Err(e) => {
            who.audit_read(action, ent, &e.status().to_string());
            Err(e)
        }
    }
}

/// Some instances asked for were evicted: ask the agent to fetch them back from the cloud PACS
/// and wait for them (`storage.recall_timeout_secs`); 503 saying why if they do not come back.
async fn recall_for(
    ctx: &DicomWebContext,
    study: &str,
    found: Vec<Located>,
) -> Result<Vec<Located>, FhirError> {
    use crate::dicom::recall;
    let missing: Vec<String> =
        found.iter().filter(|i| !i.held).map(|i| i.blob.as_str().to_owned()).collect();
    let unavailable = |why: String| {
        FhirError::Unavailable(format!(
            "{} of the {} instances asked for were evicted from this box to free disk space and \
             could not be brought back from the cloud PACS: {why}",
            missing.len(),
            found.len()
        ))
    };
    recall::request(&ctx.store, vec![study.to_owned()]).await?;
    let deadline = std::time::Instant::now() + ctx.recall_timeout;
    loop {
        let p = recall::progress(&ctx.store, missing.clone(), vec![study.to_owned()]).await?;
        if p.missing == 0 {
            break;
        }
        if let Some(e) = p.failure {
            return Err(unavailable(e));
        }
        if std::time::Instant::now() >= deadline {
            return Err(unavailable(format!("not back within {:?}", ctx.recall_timeout)));
        }
        tokio::time::sleep(RECALL_POLL).await;
    }
    let ids: Vec<String> = found.iter().map(|i| i.blob.as_str().to_owned()).collect();
    let held = ctx.store.read(move |c| index::held_among(c, &ids)).await?;
    Ok(found
        .into_iter()
        .map(|mut i| {
            i.held = held.contains(i.blob.as_str());
            i
        })
        .collect())
}

/// How often a retrieve waiting for a recall looks.
pub const RECALL_POLL: std::time::Duration = std::time::Duration::from_millis(250);

async fn wado_study(
    State(ctx): Ctx,
    Path(study): Path<String>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    stream::check_accept_dicom(&headers)?;
    let (_, found) =
        retrieve_prelude(&caller, &ctx, "dicomweb-retrieve", (&study, None, None)).await?;
    Ok(stream::instances(&ctx, found))
}

async fn wado_series(
    State(ctx): Ctx,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    stream::check_accept_dicom(&headers)?;
    let ids = (study.as_str(), Some(series.as_str()), None);
    let (_, found) = retrieve_prelude(&caller, &ctx, "dicomweb-retrieve", ids).await?;
    Ok(stream::instances(&ctx, found))
}

async fn wado_instance(
    State(ctx): Ctx,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    stream::check_accept_dicom(&headers)?;
    let ids = (study.as_str(), Some(series.as_str()), Some(sop.as_str()));
    let (_, found) = retrieve_prelude(&caller, &ctx, "dicomweb-retrieve", ids).await?;
    Ok(stream::instances(&ctx, found))
}

async fn metadata_study(
    State(ctx): Ctx,
    Path(study): Path<String>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    let (_, found) =
        retrieve_prelude(&caller, &ctx, "dicomweb-metadata", (&study, None, None)).await?;
    Ok(stream::metadata(&ctx, found, base_url(&headers)))
}

async fn metadata_series(
    State(ctx): Ctx,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    let ids = (study.as_str(), Some(series.as_str()), None);
    let (_, found) = retrieve_prelude(&caller, &ctx, "dicomweb-metadata", ids).await?;
    Ok(stream::metadata(&ctx, found, base_url(&headers)))
}

async fn metadata_instance(
    State(ctx): Ctx,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    let ids = (study.as_str(), Some(series.as_str()), Some(sop.as_str()));
    let (_, found) = retrieve_prelude(&caller, &ctx, "dicomweb-metadata", ids).await?;
    Ok(stream::metadata(&ctx, found, base_url(&headers)))
}

/// The WADO-RS base the FHIR `Endpoint` of ImagingStudies advertises: the listener's address,
/// or this host's name when it listens on every address.
pub fn public_base(listen: std::net::SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    };
    format!("https://{host}:{}/dicom-web", listen.port())
}
