//! `GET /fhir/metadata`: the CapabilityStatement, generated from the same tables that drive
//! indexing and search.

use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::ApiResult;
use super::response::{base_url, check_format, json_response};
use crate::fhir::{date, params};

pub(super) async fn metadata(
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    check_format(&q, &headers)?;
    Ok(json_response(StatusCode::OK, &capability_statement(&base_url(&headers)), &q))
}

/// The CapabilityStatement, generated from the same tables that drive indexing and search.
pub fn capability_statement(base: &str) -> Value {
    let mut resources = Vec::new();
    for &t in crate::fhir::R4_RESOURCE_TYPES {
        let mut interactions = vec!["read", "vread", "history-instance", "history-type"];
        if !crate::fhir::READ_ONLY_TYPES.contains(&t) {
            interactions.extend(["create", "update", "delete"]);
        }
        let mut r = json!({
            "type": t,
            "versioning": "versioned-update",
            "readHistory": true,
            "updateCreate": !crate::fhir::READ_ONLY_TYPES.contains(&t),
            "conditionalCreate": !crate::fhir::READ_ONLY_TYPES.contains(&t),
            "conditionalDelete": "not-supported",
            "interaction": [],
        });
        if t == "AuditEvent" {
            // Served from the audit trail itself (`fhir::http::audit_event`), with its own parameters.
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
            for d in defs.iter().filter(|d| crate::fhir::index::is_supported(t, d.code)) {
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
