//! Request and response helpers shared by the handlers: content negotiation, JSON and Bundle
//! bodies (stored JSON sent without re-parsing), version headers, `Prefer`, id and type checks.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::fhir::{FhirError, date};

/// FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

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

pub(super) fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("https://{host}/fhir")
}

pub(super) fn query_flag<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
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
pub(super) fn raw_json_response(
    status: StatusCode,
    text: String,
    q: &[(String, String)],
) -> Response {
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
pub(super) fn bundle_response(
    head: &Value,
    entries: &[String],
    q: &[(String, String)],
) -> Response {
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
pub(super) fn entry_json(full_url: &str, resource: &str, mode: &str) -> String {
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

pub(super) fn check_type(rtype: &str) -> Result<(), FhirError> {
    if crate::fhir::is_resource_type(rtype) {
        Ok(())
    } else {
        Err(FhirError::NotFound(format!("unknown resource type {rtype:?}")))
    }
}

pub(super) fn check_id(id: &str) -> Result<(), FhirError> {
    if crate::fhir::valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::BadRequest(format!("{id:?} is not a valid FHIR id")))
    }
}

/// Applies `_elements` (top-level elements plus the mandatory ones) and marks the result.
pub(super) fn apply_elements(mut v: Value, elements: &Option<Vec<String>>) -> Value {
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

pub(super) fn strict_handling(headers: &HeaderMap) -> bool {
    prefer(headers, "handling").as_deref() == Some("strict")
}

pub(super) fn prefer(headers: &HeaderMap, key: &str) -> Option<String> {
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
