//! `GET /fhir/Patient/{id}/$everything`: the Patient's compartment, paged like a search.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde_json::json;

use super::paging::{Snapshot, load_resources, page_links, remember};
use super::response::{base_url, bundle_response, check_format, check_id, query_flag};
use super::{ApiResult, FhirContext};
use crate::fhir::auth::Interaction;
use crate::fhir::search::{self, SearchRequest, Total};
use crate::fhir::{FhirError, storage};
use crate::http_caller::{Caller, Identity};

pub(super) async fn everything(
    State(ctx): State<Arc<FhirContext>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_id(&id)?;
    let who = caller.authorize("Patient", Interaction::Read)?;
    let count = query_flag(&q, "_count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(100usize)
        .min(search::MAX_COUNT);
    let pid = id.clone();
    let keys = ctx.store.read(move |c| storage::patient_compartment(c, &pid)).await?;
    let Some(keys) = keys else {
        who.audit_read("everything", format!("Patient/{id}"), "404");
        return Err(FhirError::NotFound(format!("Patient/{id} is not known")));
    };
    who.audit_read("everything", format!("Patient/{id}"), "success");
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

pub(super) async fn everything_page(
    ctx: &Arc<FhirContext>,
    base: &str,
    key: &str,
    snap: &Arc<Snapshot>,
    offset: usize,
    q: &[(String, String)],
    who: &Identity,
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
