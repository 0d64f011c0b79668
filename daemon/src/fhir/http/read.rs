//! Read interactions: read, vread, and the integrity proofs (`$verify` of a version,
//! `$verify-dicom` of a stored instance).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::response::{
    apply_elements, check_format, check_id, check_type, json_response, query_flag,
    raw_json_response, version_headers,
};
use super::{ApiResult, FhirContext};
use crate::fhir::FhirError;
use crate::fhir::auth::Interaction;
use crate::fhir::storage;
use crate::http_caller::{Caller, Identity};

pub(super) async fn read(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    check_type(&rtype)?;
    check_id(&id)?;
    let who = caller.authorize(&rtype, Interaction::Read)?;
    let (rt, i) = (rtype.clone(), id.clone());
    let current = ctx.store.read(move |c| storage::read_current(c, &rt, &i)).await?;
    let entity = format!("{rtype}/{id}");
    match current {
        None => {
            who.audit_read("read", entity, "404");
            Err(FhirError::NotFound(format!("{rtype}/{id} is not known")))
        }
        Some(c) if c.deleted => {
            who.audit_read("read", entity, "410");
            Err(FhirError::Gone(format!("{rtype}/{id} was deleted (version {})", c.version)))
        }
        Some(c) => {
            who.audit_read("read", entity, "success");
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

/// The checks of a `{type}/{id}/_history/{vid}` request before anything is read: format, type,
/// id, and the version number (a version that is not a number is 404, as one that is absent).
fn check_version_address(
    q: &[(String, String)],
    headers: &HeaderMap,
    rtype: &str,
    id: &str,
    vid: &str,
) -> Result<i64, FhirError> {
    check_format(q, headers)?;
    check_type(rtype)?;
    check_id(id)?;
    vid.parse().map_err(|_| FhirError::NotFound(format!("no version {vid:?}")))
}

pub(super) async fn vread(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    let v = check_version_address(&q, &headers, &rtype, &id, &vid)?;
    let who = caller.authorize(&rtype, Interaction::Read)?;
    let (rt, i) = (rtype.clone(), id.clone());
    let ver = ctx.store.read(move |c| storage::read_version(c, &rt, &i, v)).await?;
    who.audit_read(
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
pub(super) async fn verify_version(
    State(ctx): State<Arc<FhirContext>>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    let v = check_version_address(&q, &headers, &rtype, &id, &vid)?;
    let who = caller.authorize(&rtype, Interaction::Read)?;
    let subject = crate::ledger::Subject::Fhir { rtype: rtype.clone(), id: id.clone(), version: v };
    let out = ctx.ledger.prove(&ctx.store, subject).await;
    proof_response(&who, format!("{rtype}/{id}/_history/{v}"), out, &q)
}

/// `GET /fhir/$verify-dicom?sop=<SOP Instance UID>[&version=<n>]`: the integrity proof of a
/// stored DICOM instance (newest version unless given). Needs read access to ImagingStudy.
pub(super) async fn verify_dicom(
    State(ctx): State<Arc<FhirContext>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult {
    check_format(&q, &headers)?;
    let who = caller.authorize("ImagingStudy", Interaction::Read)?;
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
    proof_response(&who, format!("dicom:{sop}"), out, &q)
}

fn proof_response(
    who: &Identity,
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
    who.audit_read("verify", entity, &outcome);
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
