//! Modality Performed Procedure Step SCP, the protocol: attributes, status rules and the FHIR
//! Procedure they map to (PS3.4 F.7, SOP Class `1.2.840.10008.3.1.2.3.3`):
//! N-CREATE (IN PROGRESS) and N-SET (IN PROGRESS, COMPLETED, DISCONTINUED).
//!
//! The performed procedure step *is* a FHIR Procedure in the store: no table of its own. Every
//! N-CREATE/N-SET is one store write (the daemon's `dicom::mpps`) that checks first and writes only
//! if the request is valid, through `fhir::storage::put` with origin `local` — the same path as a
//! FHIR API write, so each version gets its history row, index rows, ledger leaf and outbox change
//! (synced upstream) — plus an audit record, all in one transaction. The response is sent after
//! that commit.
//!
//! | MPPS | FHIR |
//! |---|---|
//! | SOP Instance UID | `Procedure.id` ([`procedure_id`]) and `Procedure.identifier` (`urn:dicom:uid`, `urn:oid:<uid>`, type text `MPPS SOP Instance UID`) |
//! | Performed Procedure Step Status (0040,0252) | `Procedure.status`: IN PROGRESS → `in-progress`, COMPLETED → `completed`, DISCONTINUED → `not-done` |
//! | Scheduled Step Attributes Sequence (0040,0270): Accession Number, Requested Procedure ID | `Procedure.basedOn` → the ServiceRequest with that accession number (else Requested Procedure ID), see [`crate::worklist`] |
//! | … Study Instance UID (0020,000D) | `Procedure.identifier` (`urn:dicom:uid`, `urn:oid:<uid>`, type text `Study Instance UID`): the same identifier as the ImagingStudy the cache builds (`fhir::imaging`) |
//! | PPS Start/End Date and Time (0040,0244/0245, 0040,0250/0251) | `Procedure.performedPeriod.start/end`: a dateTime with the offset of Timezone Offset From UTC (0008,0201) when sent, else the date only (a FHIR time needs a zone) |
//! | Performed Procedure Step Description (0040,0254) | `Procedure.code.text` (else the order's `code`) |
//! | Patient | `Procedure.subject` = the order's `subject`; without an order, a logical reference by `site.patient_id_system` and Patient ID (0010,0020) |
//! | Performed Station AE Title (0040,0241) | `Procedure.extension` `urn:hms-edge:performed-station-ae` |
//!
//! Effect on the order: IN PROGRESS leaves it `active`; COMPLETED sets it `completed` (it leaves
//! the worklist); DISCONTINUED keeps it `active` (so the step can be done again) and adds a `note`
//! saying the step was discontinued.
//!
//! Statuses (PS3.4 F.7.2.1.2 / F.7.2.2.2, PS3.7 C): 0111 duplicate SOP instance (N-CREATE of an
//! existing step), 0112 no such object instance (N-SET of an unknown step), 0106 invalid attribute
//! value (a status other than the allowed ones), 0120 missing attribute (no status in N-CREATE),
//! 0110 processing failure with comment "Performed Procedure Step Object may no longer be
//! updated" (N-SET of a COMPLETED or DISCONTINUED step), 0110 also for a store failure.

use dicom_core::Tag;
use dicom_object::InMemDicomObject;
use serde_json::{Value, json};

/// N-service command fields (PS3.7 E.1).
pub mod field {
    pub const N_SET_RQ: u16 = 0x0120;
    pub const N_SET_RSP: u16 = 0x8120;
    pub const N_CREATE_RQ: u16 = 0x0140;
    pub const N_CREATE_RSP: u16 = 0x8140;
}

/// N-service command elements (group 0000).
pub mod tag {
    pub const REQUESTED_SOP_CLASS_UID: u16 = 0x0003;
    pub const REQUESTED_SOP_INSTANCE_UID: u16 = 0x1001;
}

/// Statuses of N-CREATE / N-SET (PS3.7 Annex C).
pub mod status {
    pub const INVALID_ATTRIBUTE_VALUE: u16 = 0x0106;
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    pub const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    pub const MISSING_ATTRIBUTE: u16 = 0x0120;
}

/// Extension on Procedure naming the Performed Station AE Title.
pub const PERFORMED_STATION_AE_EXTENSION: &str = "urn:hms-edge:performed-station-ae";
/// The 0110 comment for an update of a finished step (PS3.4 F.7.2.2.2).
pub const NO_LONGER_UPDATABLE: &str = "Performed Procedure Step Object may no longer be updated";

/// The attributes of an N-CREATE / N-SET data set that we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub status: Option<String>,
    pub start_date: String,
    pub start_time: String,
    pub end_date: String,
    pub end_time: String,
    pub tz_offset: String,
    pub description: String,
    pub station_ae: String,
    pub patient_id: String,
    pub patient_name: String,
    /// (accession number, requested procedure id, study instance uid) per scheduled step.
    pub scheduled: Vec<(String, String, String)>,
}

fn text(obj: &InMemDicomObject, g: u16, e: u16) -> String {
    obj.get(Tag(g, e))
        .and_then(|el| el.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_owned())
        .unwrap_or_default()
}

/// Decodes an N-CREATE / N-SET data set.
pub fn parse(bytes: &[u8], ts: &str) -> Result<Attributes, String> {
    let obj = crate::dataset::read_small(bytes, ts)?;
    let status = obj.get(Tag(0x0040, 0x0252)).map(|_| text(&obj, 0x0040, 0x0252));
    let scheduled = obj
        .get(Tag(0x0040, 0x0270))
        .and_then(|e| e.items())
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (text(i, 0x0008, 0x0050), text(i, 0x0040, 0x1001), text(i, 0x0020, 0x000D))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Attributes {
        status,
        start_date: text(&obj, 0x0040, 0x0244),
        start_time: text(&obj, 0x0040, 0x0245),
        end_date: text(&obj, 0x0040, 0x0250),
        end_time: text(&obj, 0x0040, 0x0251),
        tz_offset: text(&obj, 0x0008, 0x0201),
        description: text(&obj, 0x0040, 0x0254),
        station_ae: text(&obj, 0x0040, 0x0241),
        patient_id: text(&obj, 0x0010, 0x0020),
        patient_name: text(&obj, 0x0010, 0x0010),
        scheduled,
    })
}

/// The Procedure id of an MPPS SOP Instance UID: the UID when it is a valid FHIR id, else a hash.
pub fn procedure_id(uid: &str) -> String {
    hms_edge_fhir::imaging_study_id(uid)
}

/// A DICOM date and time as a FHIR dateTime: with a time only when the offset is known.
pub fn fhir_date_time(date: &str, time: &str, tz: &str) -> Option<String> {
    let d = date.trim();
    if d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let day = format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..8]);
    let t: String =
        time.split('.').next().unwrap_or("").chars().filter(char::is_ascii_digit).collect();
    let tz = tz.trim();
    let tz_ok = tz.len() == 5
        && (tz.starts_with('+') || tz.starts_with('-'))
        && tz[1..].bytes().all(|b| b.is_ascii_digit());
    if t.len() < 4 || !tz_ok {
        return Some(day);
    }
    let sec = if t.len() >= 6 { &t[4..6] } else { "00" };
    Some(format!("{day}T{}:{}:{sec}{}:{}", &t[..2], &t[2..4], &tz[..3], &tz[3..]))
}

/// The Procedure status of a PPS status, `None` for a value the standard does not allow.
pub fn procedure_status(pps_status: &str) -> Option<&'static str> {
    match pps_status.trim() {
        "IN PROGRESS" => Some("in-progress"),
        "COMPLETED" => Some("completed"),
        "DISCONTINUED" => Some("not-done"),
        _ => None,
    }
}

fn uid_identifier(kind: &str, uid: &str) -> Value {
    json!({"type": {"text": kind}, "system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")})
}

/// The Procedure of a new step (pure): `order` is the matched ServiceRequest, if any.
pub fn new_procedure(
    uid: &str,
    a: &Attributes,
    order: Option<&Value>,
    patient_id_system: &str,
) -> Value {
    let mut identifiers = vec![uid_identifier("MPPS SOP Instance UID", uid)];
    if let Some(study) = a.scheduled.iter().map(|s| s.2.as_str()).find(|s| !s.is_empty()) {
        identifiers.push(uid_identifier("Study Instance UID", study));
    }
    let mut p = json!({
        "resourceType": "Procedure",
        "id": procedure_id(uid),
        "identifier": identifiers,
        "status": "in-progress",
    });
    match order {
        Some(sr) => {
            let id = sr.get("id").and_then(Value::as_str).unwrap_or("");
            p["basedOn"] = json!([{"reference": format!("ServiceRequest/{id}")}]);
            if let Some(s) = sr.get("subject") {
                p["subject"] = s.clone();
            }
            if let Some(c) = sr.get("code") {
                p["code"] = c.clone();
            }
        }
        None => {
            p["subject"] = json!({
                "identifier": {"system": patient_id_system, "value": a.patient_id},
                "display": a.patient_name.replace('^', " ").trim(),
            });
        }
    }
    if !a.description.is_empty() {
        p["code"] = json!({"text": a.description});
    }
    if !a.station_ae.is_empty() {
        p["extension"] =
            json!([{"url": PERFORMED_STATION_AE_EXTENSION, "valueString": a.station_ae}]);
    }
    if let Some(start) = fhir_date_time(&a.start_date, &a.start_time, &a.tz_offset) {
        p["performedPeriod"] = json!({"start": start});
    }
    p
}

/// Applies an N-SET to the current Procedure (pure). `Err` carries the status and comment.
pub fn updated_procedure(current: &Value, a: &Attributes) -> Result<Value, (u16, String)> {
    if current.get("status").and_then(Value::as_str) != Some("in-progress") {
        return Err((status::PROCESSING_FAILURE, NO_LONGER_UPDATABLE.into()));
    }
    let mut p = current.clone();
    if let Some(s) = &a.status {
        let st = procedure_status(s).ok_or_else(|| {
            (status::INVALID_ATTRIBUTE_VALUE, format!("Performed Procedure Step Status {s:?}"))
        })?;
        p["status"] = json!(st);
    }
    if let Some(end) = fhir_date_time(&a.end_date, &a.end_time, &a.tz_offset) {
        if !p.get("performedPeriod").is_some_and(Value::is_object) {
            p["performedPeriod"] = json!({});
        }
        p["performedPeriod"]["end"] = json!(end);
    }
    if !a.description.is_empty() {
        p["code"] = json!({"text": a.description});
    }
    if let Some(m) = p.as_object_mut() {
        m.remove("meta");
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Attributes {
        Attributes {
            status: Some("IN PROGRESS".into()),
            start_date: "20261130".into(),
            start_time: "093012.5".into(),
            tz_offset: "+0100".into(),
            description: "CT chest".into(),
            station_ae: "CT1".into(),
            patient_id: "MRN42".into(),
            patient_name: "Doe^John".into(),
            scheduled: vec![("ACC1".into(), "RP1".into(), "1.2.3".into())],
            ..Default::default()
        }
    }

    #[test]
    fn date_times() {
        assert_eq!(
            fhir_date_time("20261130", "093012.5", "+0100").as_deref(),
            Some("2026-11-30T09:30:12+01:00")
        );
        assert_eq!(
            fhir_date_time("20261130", "0930", "-0500").as_deref(),
            Some("2026-11-30T09:30:00-05:00")
        );
        assert_eq!(fhir_date_time("20261130", "093012", "").as_deref(), Some("2026-11-30"));
        assert_eq!(fhir_date_time("", "093012", "+0100"), None);
    }

    #[test]
    fn procedure_of_a_scheduled_step() {
        let sr = json!({"resourceType": "ServiceRequest", "id": "sr1", "subject": {"reference": "Patient/p1"},
                        "code": {"text": "CT"}});
        let p = new_procedure("1.2.9", &attrs(), Some(&sr), "urn:site");
        assert_eq!(p["id"], "1.2.9");
        assert_eq!(p["status"], "in-progress");
        assert_eq!(p["basedOn"][0]["reference"], "ServiceRequest/sr1");
        assert_eq!(p["subject"]["reference"], "Patient/p1");
        assert_eq!(p["identifier"][1]["value"], "urn:oid:1.2.3");
        assert_eq!(p["performedPeriod"]["start"], "2026-11-30T09:30:12+01:00");
        let unscheduled = new_procedure("1.2.9", &attrs(), None, "urn:site");
        assert_eq!(unscheduled["subject"]["identifier"]["value"], "MRN42");
        assert!(unscheduled.get("basedOn").is_none());
    }

    #[test]
    fn updates_follow_the_state_machine() {
        let p = new_procedure("1.2.9", &attrs(), None, "urn:site");
        let mut done = Attributes { status: Some("COMPLETED".into()), ..Default::default() };
        done.end_date = "20261130".into();
        let c = updated_procedure(&p, &done).unwrap();
        assert_eq!(c["status"], "completed");
        assert_eq!(c["performedPeriod"]["end"], "2026-11-30");
        assert_eq!(updated_procedure(&c, &done).unwrap_err().0, status::PROCESSING_FAILURE);
        let bad = Attributes { status: Some("PAUSED".into()), ..Default::default() };
        assert_eq!(updated_procedure(&p, &bad).unwrap_err().0, status::INVALID_ATTRIBUTE_VALUE);
        let stop = Attributes { status: Some("DISCONTINUED".into()), ..Default::default() };
        assert_eq!(updated_procedure(&p, &stop).unwrap()["status"], "not-done");
        assert_eq!(procedure_status("IN PROGRESS"), Some("in-progress"));
    }
}
