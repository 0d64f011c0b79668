//! History interactions: system, type and instance `_history`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::response::{base_url, check_format, check_id, check_type, json_response, query_flag};
use super::{ApiResult, FhirContext};
use crate::fhir::auth::Interaction;
use crate::fhir::{FhirError, date, search, storage};
use crate::http_caller::Caller;

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
    caller: Caller,
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
    let who = caller.authorize(rtype.as_deref().unwrap_or("*"), Interaction::Read)?;
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
        who.audit_read("history", entity, "404");
        return Err(FhirError::NotFound("no such resource".into()));
    }
    who.audit_read("history", entity, "success");
    Ok(json_response(StatusCode::OK, &history_bundle(&base_url(&headers), versions), &q))
}

pub(super) async fn system_history(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    history_common(ctx, None, None, q, headers, caller).await
}

pub(super) async fn type_history(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    history_common(ctx, Some(rtype), None, q, headers, caller).await
}

pub(super) async fn instance_history(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    history_common(ctx, Some(rtype), Some(id), q, headers, caller).await
}
