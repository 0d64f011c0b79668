//! STOW-RS: each `application/dicom` part of a multipart/related request is streamed into an
//! encrypted blob as it arrives and committed by [`crate::dicom::ingest`], as for C-STORE (index
//! rows, ledger leaf and `dicom-store` audit event, the token's subject as sender, in one durable
//! write); here only the mapping of its outcome to a Failure Reason.
//! A part that is not a complete, well-formed DICOM instance of a storage SOP class leaves no blob
//! and no row and is listed in the FailedSOPSequence.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::json::tag_key;
use super::multipart::{Event, MediaType, Parser};
use super::part10::{self, Part10Meta};
use super::{DicomWebContext, SCOPE_TYPE, base_url, check_uid, json_response};
use crate::dicom::index;
use crate::dicom::ingest::{self, Declared, IngestError, Receiving, Written};
use crate::dicom::uids;
use crate::fhir::FhirError;
use crate::fhir::auth::Interaction;
use crate::http_caller::{Caller, Identity};

// Failure reasons (PS3.18 Table 10.5.3-3 / PS3.4 status codes).
const DUPLICATE: u16 = 0x0111;
const CLASS_NOT_SUPPORTED: u16 = 0x0122;
const OUT_OF_RESOURCES: u16 = 0xA700;
const DOES_NOT_MATCH: u16 = 0xA900;
const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Most parts (instances) in one STOW-RS request; each leaves an outcome in the response. A CT
/// series is a few thousand; more goes in further requests.
pub const MAX_STOW_PARTS: usize = 10_000;
/// Most `Warning` headers (one per refused part) in one response.
const MAX_WARNINGS: usize = 100;

pub async fn stow(
    ctx: State<Arc<DicomWebContext>>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> Result<Response, FhirError> {
    run(ctx, None, headers, caller, body).await
}

pub async fn stow_in_study(
    ctx: State<Arc<DicomWebContext>>,
    Path(study): Path<String>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> Result<Response, FhirError> {
    run(ctx, Some(study), headers, caller, body).await
}

/// One part's outcome.
enum Outcome {
    Stored { class: String, sop: String, study: String, series: String },
    Failed { class: String, sop: String, reason: u16, why: String },
}

enum PartState {
    /// Gathering the File Meta.
    Meta(Vec<u8>),
    /// Streaming the data set into a blob.
    Sink(Receiving, Part10Meta),
    /// Refused; the rest of the part is skipped.
    Refused { class: String, sop: String, reason: u16, why: String },
}

fn failed(reason: u16, why: impl Into<String>) -> PartState {
    PartState::Refused { class: String::new(), sop: String::new(), reason, why: why.into() }
}

async fn run(
    State(ctx): State<Arc<DicomWebContext>>,
    study: Option<String>,
    headers: HeaderMap,
    caller: Caller,
    body: Body,
) -> Result<Response, FhirError> {
    let who = match caller.authorize(SCOPE_TYPE, Interaction::Create) {
        Ok(w) => w,
        Err(e) => {
            drain(body, ctx.max_body_bytes).await;
            return Err(e);
        }
    };
    let refuse = |e: FhirError| {
        who.audit_read("dicomweb-store", "studies".into(), &e.status().to_string());
        e
    };
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mt = MediaType::parse(ct);
    let part_type = mt.param("type").unwrap_or("application/dicom").to_ascii_lowercase();
    let checked = (|| {
        if let Some(s) = &study {
            check_uid("Study Instance UID", s)?;
        }
        if mt.essence != "multipart/related" {
            return Err(FhirError::UnsupportedMediaType(format!(
                "Content-Type {ct:?}: STOW-RS takes multipart/related; type=\"application/dicom\""
            )));
        }
        if part_type != "application/dicom" {
            return Err(FhirError::UnsupportedMediaType(format!(
                "multipart/related of type {part_type:?}: only application/dicom instances are accepted"
            )));
        }
        // Below the critical floor of free space nothing is read into the store: 507 at once.
        ctx.store.space().admit(crate::store::space::WriteClass::Images)?;
        Parser::new(mt.param("boundary").unwrap_or(""))
            .map_err(|e| FhirError::BadRequest(format!("Content-Type {ct:?}: {e}")))
    })();
    let mut parser = match checked {
        Ok(p) => p,
        Err(e) => {
            drain(body, ctx.max_body_bytes).await;
            return Err(refuse(e));
        }
    };

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut state: Option<PartState> = None;
    let mut stream = body.into_data_stream();
    let result: Result<(), FhirError> = async {
        loop {
            let chunk = match stream.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    return Err(FhirError::BadRequest(format!(
                        "cannot read the request body: {e}"
                    )));
                }
                None => break,
            };
            let events = parser.feed(&chunk).map_err(|e| FhirError::BadRequest(e.to_string()))?;
            for ev in events {
                match ev {
                    Event::Part(h) => {
                        if outcomes.len() >= MAX_STOW_PARTS {
                            return Err(FhirError::PayloadTooLarge(format!(
                                "at most {MAX_STOW_PARTS} instances in one STOW-RS request; \
                                 the first {MAX_STOW_PARTS} were processed"
                            )));
                        }
                        let t = h
                            .iter()
                            .find(|(k, _)| k == "content-type")
                            .map(|(_, v)| MediaType::parse(v).essence)
                            .unwrap_or_else(|| part_type.clone());
                        state = Some(if t == "application/dicom" {
                            PartState::Meta(Vec::new())
                        } else {
                            failed(
                                CANNOT_UNDERSTAND,
                                format!("part of type {t:?} is not application/dicom"),
                            )
                        });
                    }
                    Event::Data(b) => {
                        if let Some(s) = state.take() {
                            state = Some(feed(&ctx, s, b, study.as_deref()).await);
                        }
                    }
                    Event::PartEnd => {
                        if let Some(s) = state.take() {
                            outcomes.push(finish(&ctx, &who, s).await);
                        }
                    }
                }
            }
        }
        parser.finish().map_err(|e| FhirError::BadRequest(e.to_string()))
    }
    .await;
    if let Some(PartState::Sink(sink, _)) = state.take() {
        sink.abandon();
    }
    if let Err(e) = result {
        return Err(refuse(e));
    }
    if outcomes.is_empty() {
        return Err(refuse(FhirError::BadRequest("the request holds no part".into())));
    }

    let base = base_url(&headers);
    let mut referenced = Vec::new();
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    for o in &outcomes {
        match o {
            Outcome::Stored { class, sop, study, series } => referenced.push(json!({
                "00081150": {"vr": "UI", "Value": [class]},
                "00081155": {"vr": "UI", "Value": [sop]},
                "00081190": {"vr": "UR", "Value": [format!("{base}/studies/{study}/series/{series}/instances/{sop}")]},
            })),
            Outcome::Failed { class, sop, reason, why } => {
                let mut item = Map::new();
                let ui = |v: &str| {
                    if v.is_empty() { json!({"vr": "UI"}) } else { json!({"vr": "UI", "Value": [v]}) }
                };
                item.insert("00081150".into(), ui(class.as_str()));
                item.insert("00081155".into(), ui(sop.as_str()));
                item.insert("00081197".into(), json!({"vr": "US", "Value": [reason]}));
                tracing::info!(sop, why, "STOW-RS part refused");
                if warnings.len() < MAX_WARNINGS {
                    warnings.push(format!("299 hms-edge \"{}: {}\"", if sop.is_empty() { "part" } else { sop.as_str() }, why.replace(['"', '\r', '\n'], "'")));
                }
                failures.push(Value::Object(item));
            }
        }
    }
    let mut out = Map::new();
    if let Some(s) = &study {
        out.insert(
            tag_key(0x0008_1190),
            json!({"vr": "UR", "Value": [format!("{base}/studies/{s}")]}),
        );
    }
    if !failures.is_empty() {
        out.insert(tag_key(0x0008_1198), json!({"vr": "SQ", "Value": failures}));
    }
    if !referenced.is_empty() {
        out.insert(tag_key(0x0008_1199), json!({"vr": "SQ", "Value": referenced}));
    }
    let status = match (referenced.is_empty(), failures.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) => StatusCode::CONFLICT,
    };
    if status == StatusCode::CONFLICT {
        who.audit_read("dicomweb-store", "studies".into(), "409");
    }
    let mut r = json_response(status, &Value::Object(out));
    for w in warnings {
        if let Ok(v) = axum::http::HeaderValue::from_str(&w) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    Ok(r)
}

/// Reads and discards (up to `limit` bytes of) a refused request's body, so that the client,
/// still sending, receives the answer instead of a reset connection.
async fn drain(body: Body, limit: usize) {
    let mut stream = body.into_data_stream();
    let mut seen = 0;
    while seen < limit {
        match stream.next().await {
            Some(Ok(c)) => seen += c.len(),
            _ => return,
        }
    }
}

/// Feeds part bytes to the part's state.
async fn feed(ctx: &DicomWebContext, state: PartState, b: Bytes, study: Option<&str>) -> PartState {
    match state {
        PartState::Meta(mut buf) => {
            buf.extend_from_slice(&b);
            match part10::parse(&buf) {
                Ok(None) if buf.len() > part10::MAX_META => {
                    failed(CANNOT_UNDERSTAND, "File Meta Information too long")
                }
                Ok(None) => PartState::Meta(buf),
                Err(why) => failed(CANNOT_UNDERSTAND, why),
                Ok(Some(meta)) => {
                    let refuse = |reason, why: String| PartState::Refused {
                        class: meta.sop_class_uid.clone(),
                        sop: meta.sop_instance_uid.clone(),
                        reason,
                        why,
                    };
                    if !uids::is_storage_sop_class(&meta.sop_class_uid) {
                        return refuse(
                            CLASS_NOT_SUPPORTED,
                            format!("{} is not a storage SOP class", meta.sop_class_uid),
                        );
                    }
                    let declared = Declared {
                        sop_class_uid: meta.sop_class_uid.clone(),
                        sop_instance_uid: meta.sop_instance_uid.clone(),
                        transfer_syntax: meta.transfer_syntax.clone(),
                        source_ae_title: String::new(),
                        study_instance_uid: study.map(str::to_owned),
                    };
                    let mut sink = match Receiving::start(ctx.store.blobs(), declared) {
                        Ok(s) => s,
                        Err(e) => return refuse(CANNOT_UNDERSTAND, e.to_string()),
                    };
                    let rest = Bytes::copy_from_slice(&buf[meta.dataset_offset..]);
                    if !rest.is_empty() {
                        sink.push(rest).await;
                    }
                    PartState::Sink(sink, meta)
                }
            }
        }
        PartState::Sink(mut sink, meta) => {
            sink.push(b).await;
            PartState::Sink(sink, meta)
        }
        refused @ PartState::Refused { .. } => refused,
    }
}

/// Ends a part: checks the instance and records it durably, or reports why not.
async fn finish(ctx: &DicomWebContext, who: &Identity, state: PartState) -> Outcome {
    let (sink, meta) = match state {
        PartState::Meta(buf) => {
            let why = match part10::parse(&buf) {
                Err(w) => w,
                _ => "the part is not a complete DICOM Part 10 file".into(),
            };
            return Outcome::Failed {
                class: String::new(),
                sop: String::new(),
                reason: CANNOT_UNDERSTAND,
                why,
            };
        }
        PartState::Refused { class, sop, reason, why } => {
            return Outcome::Failed { class, sop, reason, why };
        }
        PartState::Sink(sink, meta) => (sink, meta),
    };
    let fail = |reason, why: String| Outcome::Failed {
        class: meta.sop_class_uid.clone(),
        sop: meta.sop_instance_uid.clone(),
        reason,
        why,
    };
    // `ingest::commit` writes the `dicom-store` audit event in the instance's own transaction.
    let sender = index::Sender {
        calling_ae: who.actor.clone(),
        actor: who.actor.clone(),
        source: who.source.clone(),
    };
    match ingest::commit(&ctx.store, ctx.duplicate_policy, sink, sender).await {
        Ok(stored) => {
            if let Written::New { .. } = stored.written {
                metrics::counter!("hms_dicomweb_stored_instances_total").increment(1);
            }
            Outcome::Stored {
                class: meta.sop_class_uid.clone(),
                sop: meta.sop_instance_uid.clone(),
                study: stored.study_instance_uid,
                series: stored.series_instance_uid,
            }
        }
        Err(e) => {
            let reason = match &e {
                IngestError::UnsupportedTransferSyntax(_) | IngestError::Malformed(_) => {
                    CANNOT_UNDERSTAND
                }
                IngestError::Write(_) | IngestError::Store(_) => OUT_OF_RESOURCES,
                IngestError::Mismatch(_) => DOES_NOT_MATCH,
                IngestError::Conflict => DUPLICATE,
            };
            let why = match e {
                IngestError::Mismatch(m) => m.describe("the File Meta"),
                e => e.to_string(),
            };
            fail(reason, why)
        }
    }
}
