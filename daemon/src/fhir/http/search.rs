//! Search: `GET`/`POST _search` on a type, the pages of a kept snapshot (`GET /fhir?_getpages=…`,
//! also for `$everything`), `_include`/`_revinclude`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;

use super::everything::everything_page;
use super::paging::{Snapshot, load_resources, page_links, remember};
use super::response::{
    base_url, bundle_response, check_format, check_type, json_response, query_flag, strict_handling,
};
use super::write::read_body;
use super::{ApiResult, FhirContext};
use crate::fhir::FhirError;
use crate::fhir::auth::Interaction;
use crate::fhir::search::{self, Total};
use crate::fhir::search_sql;
use crate::http_caller::{Caller, Identity};

pub(super) async fn search_get(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    run_search(ctx, rtype, q, headers, caller).await
}

pub(super) async fn search_post(
    State(ctx): State<Arc<FhirContext>>,
    Path(rtype): Path<String>,
    Query(mut q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> ApiResult {
    // Who is asking, and whether they may search this type, is known before the body is read.
    check_type(&rtype)?;
    caller.authorize(&rtype, Interaction::Search)?;
    let bytes = read_body(&ctx, body).await?;
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| FhirError::BadRequest(format!("_search body must be form-encoded: {e}")))?;
    q.extend(form);
    run_search(ctx, rtype, q, headers, caller).await
}

async fn run_search(
    ctx: Arc<FhirContext>,
    rtype: String,
    q: Vec<(String, String)>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    let who = caller.authorize(&rtype, Interaction::Search)?;
    let req = search::parse(&rtype, &q, strict_handling(&headers))?;
    let entity = format!("{rtype}?{}", serde_urlencoded::to_string(&q).unwrap_or_default());
    let r2 = req.clone();
    let ids = ctx.store.read_as(move |c| search_sql::execute(c, &r2)).await?;
    who.audit_read("search", entity, "success");
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

async fn page_bundle(
    ctx: &Arc<FhirContext>,
    base: &str,
    key: PageKey<'_>,
    snap: &Arc<Snapshot>,
    offset: usize,
    q: &[(String, String)],
    who: &Identity,
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
                    keys.extend(search_sql::include_targets(c, &rt2, &ids2, inc)?);
                }
                for inc in &r2.revincludes {
                    keys.extend(search_sql::revinclude_sources(c, &rt2, &ids2, inc)?);
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
        let oo = crate::fhir::operation_outcome(
            "warning",
            "not-supported",
            &format!("ignored search parameters: {}", req.ignored.join(", ")),
        );
        entries.push(json!({"resource": oo, "search": {"mode": "outcome"}}).to_string());
    }
    Ok(bundle_response(&bundle, &entries, q))
}

/// `GET /fhir?_getpages=…` (paging) — anything else at the root is not supported.
pub(super) async fn system_get(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
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
        let who = caller.authorize("Patient", Interaction::Read)?;
        who.audit_read("everything-page", format!("?_getpages={key}"), "success");
        return everything_page(&ctx, &base_url(&headers), key, &snap, offset, &q, &who).await;
    }
    let who = caller.authorize(&snap.req.rtype, Interaction::Search)?;
    who.audit_read("search-page", format!("{}?_getpages={key}", snap.req.rtype), "success");
    page_bundle(&ctx, &base_url(&headers), PageKey::Snapshot(key), &snap, offset, &q, &who).await
}
