//! `/fhir/AuditEvent`: the audit trail (`crate::audit`) read as FHIR AuditEvent resources (IHE
//! BALP style). Read, vread, instance history and search; never written by clients (405). The
//! resources are computed from the audit rows on each request, so what an auditor sees is
//! exactly what the integrity ledger commits to. Reading the audit trail is itself audited.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::response::{base_url, check_format, json_response, strict_handling, version_headers};
use super::{ApiResult, FhirContext};
use crate::audit::{self, AuditQuery};
use crate::fhir::FhirError;
use crate::fhir::auth::Interaction;
use crate::http_caller::{Caller, Identity};

const RTYPE: &str = "AuditEvent";

/// The routes (merged before the generic `/fhir/{rtype}` ones, which they take precedence over).
pub fn routes() -> Router<Arc<FhirContext>> {
    Router::new()
        .route("/fhir/AuditEvent", get(search_get).post(refuse_write))
        .route("/fhir/AuditEvent/_search", post(search_post))
        .route("/fhir/AuditEvent/_history", get(type_history))
        .route("/fhir/AuditEvent/{id}", get(read).put(refuse_write).delete(refuse_write))
        .route("/fhir/AuditEvent/{id}/_history", get(instance_history))
        .route("/fhir/AuditEvent/{id}/_history/{vid}", get(vread))
}

fn observer(ctx: &FhirContext) -> String {
    format!("hms-edged {}", ctx.ledger.origin())
}

async fn refuse_write() -> ApiResult {
    Err(FhirError::MethodNotAllowed(
        "AuditEvent is read-only: the server records every access itself".into(),
    ))
}

async fn type_history() -> ApiResult {
    Err(FhirError::BadRequest(
        "AuditEvent has no type history (events never change); search AuditEvent by date".into(),
    ))
}

fn parse_id(id: &str) -> Result<i64, FhirError> {
    id.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| FhirError::NotFound(format!("AuditEvent/{id} is not known")))
}

async fn load(
    ctx: &Arc<FhirContext>,
    who: &Identity,
    action: &str,
    id: &str,
) -> Result<audit::AuditRow, FhirError> {
    let entity = format!("{RTYPE}/{id}");
    let seq = match parse_id(id) {
        Ok(s) => s,
        Err(e) => {
            who.audit_read(action, entity, "404");
            return Err(e);
        }
    };
    let row = ctx.store.read(move |c| audit::get(c, seq)).await?;
    match row {
        Some(r) => {
            who.audit_read(action, entity, "success");
            Ok(r)
        }
        None => {
            who.audit_read(action, entity, "404");
            Err(FhirError::NotFound(format!("AuditEvent/{id} is not known")))
        }
    }
}

async fn read(
    State(ctx): State<Arc<FhirContext>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = caller.authorize(RTYPE, Interaction::Read)?;
    let row = load(&ctx, &who, "read", &id).await?;
    let mut r = json_response(StatusCode::OK, &audit::to_fhir(&row, &observer(&ctx)), &q);
    version_headers(&mut r, 1, row.at);
    Ok(r)
}

async fn vread(
    State(ctx): State<Arc<FhirContext>>,
    Path((id, vid)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = caller.authorize(RTYPE, Interaction::Read)?;
    let row = load(&ctx, &who, "vread", &id).await?;
    if vid != "1" {
        return Err(FhirError::NotFound(format!(
            "AuditEvent/{id} has one version only (1), not {vid}"
        )));
    }
    let mut r = json_response(StatusCode::OK, &audit::to_fhir(&row, &observer(&ctx)), &q);
    version_headers(&mut r, 1, row.at);
    Ok(r)
}

async fn instance_history(
    State(ctx): State<Arc<FhirContext>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = caller.authorize(RTYPE, Interaction::Read)?;
    let row = load(&ctx, &who, "history", &id).await?;
    let base = base_url(&headers);
    let b = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": 1,
        "entry": [{
            "fullUrl": format!("{base}/AuditEvent/{}", row.seq),
            "resource": audit::to_fhir(&row, &observer(&ctx)),
            "request": {"method": "POST", "url": "AuditEvent"},
            "response": {"status": "201 Created", "etag": "W/\"1\""},
        }],
    });
    Ok(json_response(StatusCode::OK, &b, &q))
}

async fn search_get(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    search(ctx, q, headers, caller).await
}

async fn search_post(
    State(ctx): State<Arc<FhirContext>>,
    Query(mut q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult {
    if body.len() > ctx.max_body_bytes {
        return Err(FhirError::PayloadTooLarge(format!(
            "_search body over {} bytes",
            ctx.max_body_bytes
        )));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|e| FhirError::BadRequest(format!("_search body must be form-encoded: {e}")))?;
    q.extend(form);
    search(ctx, q, headers, caller).await
}

async fn search(
    ctx: Arc<FhirContext>,
    q: Vec<(String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = caller.authorize(RTYPE, Interaction::Search)?;
    let aq = AuditQuery::parse(&q, strict_handling(&headers)).map_err(FhirError::BadRequest)?;
    let entity = format!("{RTYPE}?{}", serde_urlencoded::to_string(&q).unwrap_or_default());
    let aq2 = aq.clone();
    let (mut rows, total) = ctx.store.read(move |c| audit::search(c, &aq2)).await?;
    who.audit_read("search", entity, "success");
    let base = base_url(&headers);
    if aq.summary_count {
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": total.unwrap_or(0)});
        return Ok(json_response(StatusCode::OK, &b, &q));
    }
    let has_next = rows.len() > aq.count;
    rows.truncate(aq.count);
    let link_q = aq.link_params(&q);
    let url = |extra: Option<i64>| {
        let mut p = link_q.clone();
        if let Some(c) = extra {
            p.push(("_cursor".into(), c.to_string()));
        }
        format!("{base}/AuditEvent?{}", serde_urlencoded::to_string(&p).unwrap_or_default())
    };
    let mut links = vec![json!({"relation": "self", "url": url(aq.cursor)})];
    if has_next && let Some(last) = rows.last() {
        links.push(json!({"relation": "next", "url": url(Some(last.seq))}));
    }
    let obs = observer(&ctx);
    let entries: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "fullUrl": format!("{base}/AuditEvent/{}", r.seq),
                "resource": audit::to_fhir(r, &obs),
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut b =
        json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries});
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    if !aq.ignored.is_empty() {
        b["meta"] = json!({"tag": [{"code": "lenient", "display": format!("ignored: {}", aq.ignored.join(", "))}]});
    }
    Ok(json_response(StatusCode::OK, &b, &q))
}
