//! STOW-RS: each `application/dicom` part of a multipart/related request is streamed into an
//! encrypted blob as it arrives ([`crate::dicom::sink`], as for C-STORE) and recorded by
//! [`crate::dicom::index::record_instance`] (index rows, ledger leaf and `dicom-store` audit event,
//! the token's subject as sender) in one durable write.
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
use crate::dicom::dataset::FileMeta;
use crate::dicom::index::{self, Recorded};
use crate::dicom::sink::{ReceivedInstance, SinkHandle};
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
    Sink(SinkHandle, Part10Meta),
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
                            state = Some(feed(&ctx, s, b).await);
                        }
                    }
                    Event::PartEnd => {
                        if let Some(s) = state.take() {
                            outcomes.push(finish(&ctx, &who, study.as_deref(), s).await);
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
async fn feed(ctx: &DicomWebContext, state: PartState, b: Bytes) -> PartState {
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
                    let Some(enc) = uids::dataset_encoding(&meta.transfer_syntax) else {
                        return refuse(
                            CANNOT_UNDERSTAND,
                            format!("transfer syntax {} is not supported", meta.transfer_syntax),
                        );
                    };
                    let fm = FileMeta {
                        sop_class_uid: meta.sop_class_uid.clone(),
                        sop_instance_uid: meta.sop_instance_uid.clone(),
                        transfer_syntax: meta.transfer_syntax.clone(),
                        source_ae_title: String::new(),
                    };
                    let mut sink = SinkHandle::start(ctx.store.blobs().clone(), fm, enc);
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
async fn finish(
    ctx: &DicomWebContext,
    who: &Identity,
    study: Option<&str>,
    state: PartState,
) -> Outcome {
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
    let inst: ReceivedInstance = match sink.finish().await {
        Ok(i) => i,
        Err(crate::dicom::sink::SinkError::Malformed(m)) => {
            return fail(CANNOT_UNDERSTAND, format!("malformed data set: {m}"));
        }
        Err(e) => return fail(OUT_OF_RESOURCES, e.to_string()),
    };
    let a = &inst.attrs;
    let mismatch = if a.sop_instance_uid != meta.sop_instance_uid {
        Some("SOP Instance UID of the data set differs from the File Meta".to_owned())
    } else if a.sop_class_uid != meta.sop_class_uid {
        Some("SOP Class UID of the data set differs from the File Meta".to_owned())
    } else if a.study_instance_uid.is_empty() || a.series_instance_uid.is_empty() {
        Some("Study or Series Instance UID missing".to_owned())
    } else if study.is_some_and(|s| s != a.study_instance_uid) {
        Some(format!(
            "the instance belongs to study {}, not the one of the URL",
            a.study_instance_uid
        ))
    } else {
        None
    };
    let blob = inst.blob.id.clone();
    let remove_blob = || {
        let blobs = ctx.store.blobs().clone();
        let id = blob.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = blobs.remove(&id) {
                tracing::warn!(error = %e, "cannot remove an unreferenced blob; the next start sweeps it");
            }
        });
    };
    if let Some(why) = mismatch {
        remove_blob();
        return fail(DOES_NOT_MATCH, why);
    }
    let (st, se) = (a.study_instance_uid.clone(), a.series_instance_uid.clone());
    let ts = meta.transfer_syntax.clone();
    let policy = ctx.duplicate_policy;
    // `record_instance` writes the `dicom-store` audit event in the instance's own transaction.
    let sender = index::Sender {
        calling_ae: who.actor.clone(),
        actor: who.actor.clone(),
        source: who.source.clone(),
    };
    let result =
        ctx.store.write(move |tx| index::record_instance(tx, &inst, &ts, &sender, policy)).await;
    match result {
        Ok(Recorded::Stored { .. }) => {
            metrics::counter!("hms_dicomweb_stored_instances_total").increment(1);
            Outcome::Stored {
                class: meta.sop_class_uid.clone(),
                sop: meta.sop_instance_uid.clone(),
                study: st,
                series: se,
            }
        }
        Ok(Recorded::Identical) => {
            remove_blob();
            Outcome::Stored {
                class: meta.sop_class_uid.clone(),
                sop: meta.sop_instance_uid.clone(),
                study: st,
                series: se,
            }
        }
        Ok(Recorded::Conflict) => {
            remove_blob();
            fail(DUPLICATE, "SOP Instance UID already stored with different content".into())
        }
        Err(e) => {
            if !matches!(e, crate::store::StoreError::Closed) {
                remove_blob();
            }
            fail(OUT_OF_RESOURCES, format!("cannot store the instance: {e}"))
        }
    }
}
