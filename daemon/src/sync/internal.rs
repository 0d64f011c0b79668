//! The internal API: HTTP/1.1 + JSON on a Unix socket (mode 0660, the service group), never TCP.
//! The only door through which `hms-edge-agent` (and the `hms-edge sync …` commands) reach the
//! store. Each route is one narrow operation; the agent cannot run a query of its choosing.
//!
//! Patient data that leaves through here (leased FHIR resources, DICOM streams, applied upstream
//! resources) is audited with actor `hms-edge-agent`.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::api::*;
use super::{apply, outbox};
use crate::audit::AuditRecord;
use crate::store::{Store, StoreError};

/// Largest request body (a lease answer can be large; requests are small).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Most changes one lease may take.
pub const MAX_LEASE: u32 = 5000;
/// Key/value namespace for the agent's cursors and status.
pub const STATE_NS: &str = "sync";
/// The actor recorded in audit events for the agent's accesses.
pub const AGENT_ACTOR: &str = "hms-edge-agent";

/// What the routes share.
#[derive(Debug)]
pub struct InternalContext {
    pub store: Arc<Store>,
    pub tenant_id: String,
    pub site_id: String,
    /// The integrity ledger (checkpoints to anchor, anchors recorded by the agent).
    pub ledger: Arc<crate::ledger::Ledger>,
    /// The worklist's Patient ID system (eviction keeps studies of active orders).
    pub patient_id_system: String,
}

/// Binds the socket: a stale file from a previous run is replaced, the mode is set to 0660.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

pub use hms_edge_wire::socket_path;

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: UnixListener, ctx: Arc<InternalContext>, shutdown: CancellationToken) {
    let app = router(ctx);
    if let Err(e) =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    {
        tracing::error!(error = %e, "internal API stopped");
    }
}

pub fn router(ctx: Arc<InternalContext>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/outbox/lease", post(lease))
        .route("/v1/outbox/ack", post(ack))
        .route("/v1/outbox/fail", post(fail))
        .route("/v1/outbox/release", post(release))
        .route("/v1/outbox/unlease", post(unlease))
        .route("/v1/outbox/parked", get(parked))
        .route("/v1/outbox/retry", post(retry))
        .route("/v1/fhir/apply", post(apply_upstream))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/conflicts/{id}/resolve", post(resolve))
        .route("/v1/dicom/instances/{sop}", get(dicom_instance))
        .route("/v1/dicom/studies/{study}/pin", post(dicom_pin))
        .route("/v1/dicom/evict", post(dicom_evict))
        .route("/v1/dicom/recall/{sop}", post(dicom_recall))
        .route("/v1/state/{key}", get(get_state).put(put_state))
        .route("/v1/events", post(event))
        .route("/v1/ledger/checkpoint", post(ledger_checkpoint))
        .route("/v1/ledger/anchors", get(ledger_anchors).post(ledger_record_anchor))
        .route("/v1/ledger/anchors/{id}", post(ledger_update_anchor))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(ctx)
}

/// An error answer: `{"error": "..."}` with a status that says whose fault it is.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// A sync write's own failures keep their meaning for the agent: whose fault, which status.
impl From<apply::ApplyError> for ApiError {
    fn from(e: apply::ApplyError) -> Self {
        use apply::ApplyError;
        let status = match e {
            ApplyError::Store(s) => return ApiError::from(s),
            ApplyError::Db(d) => return ApiError::from(StoreError::from(d)),
            ApplyError::WrongTenant { .. } => StatusCode::FORBIDDEN,
            ApplyError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApplyError::NoSuchConflict(_) => StatusCode::NOT_FOUND,
            ApplyError::AlreadyResolved(_) => StatusCode::CONFLICT,
            ApplyError::Fhir(ref f) => {
                StatusCode::from_u16(f.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn check_kind(kind: &str) -> ApiResult<()> {
    if CHANNELS.contains(&kind) { Ok(()) } else { Err(bad(format!("unknown channel {kind:?}"))) }
}

fn agent_audit(action: &str, entity: String, detail: Option<String>) -> AuditRecord {
    AuditRecord {
        actor: AGENT_ACTOR.into(),
        source: "internal-api".into(),
        action: action.into(),
        entity,
        outcome: "success".into(),
        detail,
    }
}

/// Appends the agent's audit record in the write `tx` (the row id is not needed).
fn audit(tx: &crate::store::WriteTx<'_>, rec: &AuditRecord) -> Result<(), StoreError> {
    crate::audit::append(tx, rec).map(drop)
}

/// The newest signed checkpoint (made now when the log grew), for the agent to anchor.
async fn ledger_checkpoint(
    State(ctx): State<Arc<InternalContext>>,
) -> ApiResult<axum::Json<crate::ledger::anchor::CheckpointInfo>> {
    Ok(axum::Json(ctx.ledger.checkpoint_info(&ctx.store).await?))
}

async fn ledger_anchors(
    State(ctx): State<Arc<InternalContext>>,
) -> ApiResult<axum::Json<crate::ledger::anchor::AnchorsView>> {
    Ok(axum::Json(ctx.store.read(crate::ledger::anchor::view).await?))
}

/// Records an anchor transaction before the agent broadcasts it.
async fn ledger_record_anchor(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(a): axum::Json<crate::ledger::anchor::NewAnchor>,
) -> ApiResult<axum::Json<crate::ledger::anchor::AnchorRow>> {
    let row = ctx.store.write(move |tx| crate::ledger::anchor::record(tx, &a)).await.map_err(
        |e| match e {
            StoreError::Rejected(m) => bad(m),
            e => e.into(),
        },
    )?;
    Ok(axum::Json(row))
}

async fn ledger_update_anchor(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(id): UrlPath<i64>,
    axum::Json(u): axum::Json<crate::ledger::anchor::AnchorUpdate>,
) -> ApiResult<axum::Json<crate::ledger::anchor::AnchorRow>> {
    let row = ctx.store.write(move |tx| crate::ledger::anchor::update(tx, id, &u)).await.map_err(
        |e| match e {
            StoreError::Rejected(m) => bad(m),
            e => e.into(),
        },
    )?;
    Ok(axum::Json(row))
}

async fn status(State(ctx): State<Arc<InternalContext>>) -> ApiResult<axum::Json<StatusResponse>> {
    let (channels, open, agent) = ctx
        .store
        .read(|c| {
            let channels = outbox::status(c)?;
            let open = outbox::open_conflicts(c)?;
            let mut agent = serde_json::Map::new();
            let mut stmt = c.prepare_cached(
                "SELECT key, value FROM kv WHERE ns = ?1 AND key LIKE 'status.%' ORDER BY key",
            )?;
            let rows = stmt
                .query_map([STATE_NS], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
            for row in rows {
                let (k, v) = row?;
                let value = serde_json::from_slice(&v).unwrap_or(Value::Null);
                agent.insert(k.trim_start_matches("status.").to_owned(), value);
            }
            Ok((channels, open, agent))
        })
        .await?;
    Ok(axum::Json(StatusResponse {
        tenant_id: ctx.tenant_id.clone(),
        site_id: ctx.site_id.clone(),
        channels,
        open_conflicts: open,
        agent,
    }))
}

async fn lease(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<LeaseRequest>,
) -> ApiResult<axum::Json<LeaseResponse>> {
    check_kind(&req.kind)?;
    let max = req.max.clamp(1, MAX_LEASE);
    let lease_secs = req.lease_secs.clamp(1, 24 * 3600);
    let kind = req.kind.clone();
    let entries = ctx
        .store
        .write(move |tx| {
            let entries = outbox::lease(tx, &kind, max, lease_secs)?;
            if kind != "event" && !entries.is_empty() {
                // One audit event per lease: resources or instances handed to the agent for
                // upstream (the instance reads that follow are covered by it).
                let ids: Vec<&str> = entries.iter().map(|e| e.entity.as_str()).collect();
                let (action, what) = match kind.as_str() {
                    "fhir" => ("sync-push", "resources"),
                    "recall" => ("sync-recall", "studies"),
                    _ => ("sync-forward", "instances"),
                };
                audit(
                    tx,
                    &agent_audit(action, format!("{} {what}", ids.len()), Some(ids.join(","))),
                )?;
            }
            Ok(entries)
        })
        .await?;
    Ok(axum::Json(LeaseResponse { entries }))
}

async fn ack(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<AckRequest>,
) -> ApiResult<axum::Json<Affected>> {
    check_kind(&req.kind)?;
    let affected = ctx.store.write(move |tx| outbox::ack(tx, &req.kind, &req.items)).await?;
    Ok(axum::Json(Affected { affected }))
}

async fn fail(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<FailRequest>,
) -> ApiResult<axum::Json<Affected>> {
    check_kind(&req.kind)?;
    let affected = ctx.store.write(move |tx| outbox::fail(tx, &req.kind, &req.items)).await?;
    Ok(axum::Json(Affected { affected }))
}

#[derive(Debug, Deserialize)]
struct KindBody {
    kind: String,
}

async fn release(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<KindBody>,
) -> ApiResult<axum::Json<Affected>> {
    check_kind(&req.kind)?;
    let affected = ctx.store.write(move |tx| outbox::release_all(tx, &req.kind)).await?;
    Ok(axum::Json(Affected { affected }))
}

#[derive(Debug, Deserialize)]
struct UnleaseBody {
    kind: String,
    seqs: Vec<i64>,
}

async fn unlease(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<UnleaseBody>,
) -> ApiResult<axum::Json<Affected>> {
    check_kind(&req.kind)?;
    let affected = ctx.store.write(move |tx| outbox::unlease(tx, &req.kind, &req.seqs)).await?;
    Ok(axum::Json(Affected { affected }))
}

async fn parked(
    State(ctx): State<Arc<InternalContext>>,
) -> ApiResult<axum::Json<Vec<ParkedChange>>> {
    Ok(axum::Json(ctx.store.read(|c| outbox::parked(c, 10_000)).await?))
}

#[derive(Debug, Deserialize)]
struct RetryBody {
    #[serde(default)]
    seqs: Vec<i64>,
}

async fn retry(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<RetryBody>,
) -> ApiResult<axum::Json<Affected>> {
    let affected = ctx.store.write(move |tx| outbox::retry_parked(tx, &req.seqs)).await?;
    Ok(axum::Json(Affected { affected }))
}

async fn apply_upstream(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<ApplyRequest>,
) -> ApiResult<axum::Json<ApplyResponse>> {
    ctx.store
        .space()
        .admit(crate::store::space::WriteClass::Records)
        .map_err(|e| ApiError(StatusCode::INSUFFICIENT_STORAGE, e.to_string()))?;
    let tenant = ctx.tenant_id.clone();
    let entity = format!("{}/{}", req.rtype, req.id);
    let resp = ctx
        .store
        .write_as(move |tx| -> Result<_, apply::ApplyError> {
            let resp = apply::apply(tx, &tenant, req)?;
            if resp.outcome != ApplyOutcome::Unchanged {
                audit(tx, &agent_audit("sync-pull", entity, Some(format!("{:?}", resp.outcome))))?;
            }
            Ok(resp)
        })
        .await?;
    Ok(axum::Json(resp))
}

/// `hms-edge dicom pin|unpin`: the request names who asked (the socket is site IT's and the
/// agent's only).
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct PinRequest {
    pub pinned: bool,
    pub actor: String,
}

async fn dicom_pin(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(study): UrlPath<String>,
    axum::Json(req): axum::Json<PinRequest>,
) -> ApiResult<axum::Json<Value>> {
    let uid = study.clone();
    let pinned = req.pinned;
    let found = ctx
        .store
        .write(move |tx| {
            let found = crate::dicom::index::set_pinned(tx.sql(), &uid, req.pinned)?;
            let action = if req.pinned { "dicom-pin" } else { "dicom-unpin" };
            audit(
                tx,
                &AuditRecord {
                    actor: req.actor,
                    source: "internal-api".into(),
                    action: action.into(),
                    entity: format!("dicom-study:{uid}"),
                    outcome: if found { "success".into() } else { "failed: no such study".into() },
                    detail: None,
                },
            )?;
            Ok(found)
        })
        .await?;
    if !found {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no study {study} is stored")));
    }
    Ok(axum::Json(json!({ "study": study, "pinned": pinned })))
}

/// `hms-edge dicom evict`.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct EvictCall {
    #[serde(flatten)]
    pub request: crate::dicom::evict::EvictRequest,
    pub actor: String,
}

async fn dicom_evict(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(call): axum::Json<EvictCall>,
) -> ApiResult<axum::Json<crate::dicom::evict::EvictReport>> {
    use crate::dicom::evict;
    if call.request.study.is_none() == call.request.before_ms.is_none() {
        return Err(bad("give exactly one of study and before_ms"));
    }
    let who =
        evict::Requester { actor: call.actor, source: "internal-api".into(), reason: "manual" };
    match evict::evict_by_hand(&ctx.store, &call.request, &ctx.patient_id_system, &who).await? {
        Some(report) => Ok(axum::Json(report)),
        None => Err(ApiError(StatusCode::NOT_FOUND, "no such study is stored".into())),
    }
}

#[derive(Debug, Deserialize)]
struct RecallQuery {
    version: i64,
}

/// The agent hands back an evicted instance it fetched from the cloud PACS (the body is the Part
/// 10 file, streamed: no size limit beyond the instance's recorded size, checked as it goes).
async fn dicom_recall(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(sop): UrlPath<String>,
    Query(q): Query<RecallQuery>,
    body: Body,
) -> ApiResult<axum::Json<Value>> {
    use crate::dicom::recall::{RecallError, accept};
    use futures_util::TryStreamExt;
    let stream = body.into_data_stream().map_err(|e| e.to_string());
    match accept(&ctx.store, &sop, q.version, AGENT_ACTOR, Box::pin(stream)).await {
        Ok(bytes) => Ok(axum::Json(json!({ "sop": sop, "version": q.version, "bytes": bytes }))),
        Err(RecallError::NotEvicted(..)) => {
            Err(ApiError(StatusCode::CONFLICT, format!("{sop} v{} is not evicted here", q.version)))
        }
        Err(e @ (RecallError::Mismatch(_) | RecallError::Body(_))) => {
            tracing::warn!(%sop, error = %e, "recalled instance refused");
            Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
        }
        Err(RecallError::Store(e)) => Err(e.into()),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct ConflictQuery {
    #[serde(default)]
    open: Option<bool>,
}

async fn conflicts(
    State(ctx): State<Arc<InternalContext>>,
    Query(q): Query<ConflictQuery>,
) -> ApiResult<axum::Json<Vec<Conflict>>> {
    let open = q.open.unwrap_or(false);
    Ok(axum::Json(ctx.store.read(move |c| outbox::conflicts(c, open, 10_000)).await?))
}

async fn resolve(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(id): UrlPath<i64>,
    axum::Json(req): axum::Json<ResolveRequest>,
) -> ApiResult<axum::Json<Value>> {
    ctx.store.write_as(move |tx| apply::resolve(tx, id, &req.keep)).await?;
    Ok(axum::Json(json!({ "resolved": id })))
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

/// Streams the Part 10 file of an instance: 64 KiB chunks, each authenticated before it is sent,
/// never the whole instance in memory. (Audited with the lease that handed it to the agent.)
async fn dicom_instance(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(sop): UrlPath<String>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Response> {
    let store = ctx.store.clone();
    let sop2 = sop.clone();
    let inst =
        tokio::task::spawn_blocking(move || crate::dicom::export::lookup(&store, &sop2, q.version))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| match e {
                crate::dicom::export::ExportError::NotFound(m) => {
                    ApiError(StatusCode::NOT_FOUND, format!("no stored instance {m}"))
                }
                other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
            })?;
    // The instance leaves the box (to the cloud PACS): audited before the first byte is sent.
    let rec = agent_audit(
        "dicom-forward",
        format!("dicom:{sop}"),
        Some(format!("version {}", inst.version)),
    );
    ctx.store
        .write(move |tx| audit(tx, &rec))
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let size = inst.size;
    let blob = inst.blob.clone();
    let store = ctx.store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = match store.blobs().open_reader(&blob) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // The body ends with an error: the client sees a truncated, failed transfer.
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/dicom")
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

async fn get_state(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(key): UrlPath<String>,
) -> ApiResult<Response> {
    let k = key.clone();
    let rec = ctx.store.read(move |c| Store::kv_get(c, STATE_NS, &k)).await?;
    match rec {
        Some((value, _)) => {
            Ok(([(header::CONTENT_TYPE, "application/json")], value).into_response())
        }
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no state {key:?}"))),
    }
}

async fn put_state(
    State(ctx): State<Arc<InternalContext>>,
    UrlPath(key): UrlPath<String>,
    axum::Json(value): axum::Json<Value>,
) -> ApiResult<StatusCode> {
    if key.is_empty() || key.len() > 200 {
        return Err(bad("state key must be 1-200 characters"));
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| bad(e.to_string()))?;
    ctx.store.write(move |tx| tx.kv_put(STATE_NS, &key, &bytes, None)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn event(
    State(ctx): State<Arc<InternalContext>>,
    axum::Json(req): axum::Json<EventRequest>,
) -> ApiResult<axum::Json<Value>> {
    if req.event.is_empty()
        || req.event.len() > 64
        || !req.event.bytes().all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
    {
        return Err(bad("event must be 1-64 characters of a-z . _"));
    }
    let detail = req.payload.to_string();
    if detail.len() > 16 * 1024 {
        return Err(bad("event payload larger than 16 KiB"));
    }
    let seq = ctx
        .store
        .write(move |tx| {
            tx.append_change(&crate::store::Change {
                kind: "event".into(),
                entity: String::new(),
                op: req.event,
                version: None,
                detail: Some(detail),
            })
        })
        .await?;
    Ok(axum::Json(json!({ "seq": seq })))
}
