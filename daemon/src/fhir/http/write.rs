//! Writes: create (with `If-None-Exist`), update (with `If-Match`), delete, and transaction and
//! batch Bundles posted to the base (run by `fhir::bundle`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::response::{base_url, check_id, check_type, json_response, prefer, version_headers};
use super::{ApiResult, FhirContext};
use crate::fhir::auth::Interaction;
use crate::fhir::storage::{self, Written};
use crate::fhir::{FhirError, new_id, parse_resource, search, search_sql};
use crate::http_caller::Caller;
use crate::store::space::WriteClass;

/// A request body must arrive within this (a slow-loris body holds a connection and a task).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) async fn read_body(ctx: &FhirContext, body: Body) -> Result<Bytes, FhirError> {
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

fn check_writable(rtype: &str) -> Result<(), FhirError> {
    if crate::fhir::READ_ONLY_TYPES.contains(&rtype) {
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
            let oo = crate::fhir::operation_outcome(
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

pub(super) async fn create(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> ApiResult {
    check_type(&rtype)?;
    check_writable(&rtype)?;
    check_content_type(&headers)?;
    // Authenticate and check the scope first: an unauthenticated caller never gets a body read
    // and parsed (JSON parsing multiplies memory).
    let who = caller.authorize(&rtype, Interaction::Create)?;
    ctx.store.space().admit(WriteClass::Records)?;
    let bytes = read_body(&ctx, body).await?;
    let mut resource = parse_resource(&bytes, &rtype)?;
    let if_none_exist =
        headers.get("if-none-exist").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cond = match &if_none_exist {
        Some(s) => {
            // The match test is a search: a create-only token may not learn what exists.
            caller.authorize(&rtype, Interaction::Search)?;
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
                let found = search_sql::execute(tx.sql(), req)?;
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
                        storage::audit(tx, &who.write_audit("create-matched-existing", entity))?;
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
            storage::audit(tx, &who.write_audit("create", format!("{rt}/{}", w.id)))?;
            Ok((true, w))
        })
        .await?;
    let (created, w) = outcome;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(write_response(&headers, &base_url(&headers), &w, status, &q))
}

pub(super) async fn update(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> ApiResult {
    check_type(&rtype)?;
    check_id(&id)?;
    check_writable(&rtype)?;
    check_content_type(&headers)?;
    let who = caller.authorize(&rtype, Interaction::Update)?;
    ctx.store.space().admit(WriteClass::Records)?;
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
                &who.write_audit(
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

pub(super) async fn delete(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    caller: Caller,
) -> ApiResult {
    check_type(&rtype)?;
    check_id(&id)?;
    check_writable(&rtype)?;
    let who = caller.authorize(&rtype, Interaction::Delete)?;
    ctx.store.space().admit(WriteClass::Records)?;
    let rt = rtype.clone();
    let w = ctx
        .store
        .write_as(move |tx| -> Result<_, FhirError> {
            let w = storage::delete(tx, &rt, &id, "local")?;
            storage::audit(tx, &who.write_audit("delete", format!("{rt}/{id}")))?;
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

pub(super) async fn system_bundle(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> ApiResult {
    check_content_type(&headers)?;
    // Who is asking is known before a large body is read and parsed.
    let who = caller.authenticate()?;
    let _permit =
        ctx.bundles.acquire().await.map_err(|_| FhirError::Unavailable("shutting down".into()))?;
    let bytes = read_body(&ctx, body).await?;
    let bundle = parse_resource(&bytes, "Bundle")?;
    // A Bundle that writes needs the records reserve; a batch of reads does not.
    let writes = bundle.get("entry").and_then(Value::as_array).is_some_and(|entries| {
        entries.iter().any(|e| {
            e.pointer("/request/method").and_then(Value::as_str).is_some_and(|m| m != "GET")
        })
    });
    if writes {
        ctx.store.space().admit(WriteClass::Records)?;
    }
    drop(bytes);
    let base = base_url(&headers);
    match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => {
            let resp = crate::fhir::bundle::transaction(&ctx.store, bundle, who).await?;
            Ok(json_response(StatusCode::OK, &resp, &q))
        }
        Some("batch") => {
            let resp = crate::fhir::bundle::batch(&ctx.store, bundle, who, &base).await?;
            Ok(json_response(StatusCode::OK, &resp, &q))
        }
        Some(t) => Err(FhirError::BadRequest(format!(
            "Bundle.type {t} cannot be posted to the base; use transaction or batch"
        ))),
        None => Err(FhirError::BadRequest("Bundle.type is missing".into())),
    }
}
