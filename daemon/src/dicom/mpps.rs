//! Modality Performed Procedure Step SCP, the store side: every N-CREATE/N-SET is one
//! [`crate::store::Store::write`] that checks first and writes only if the request is valid,
//! through [`crate::fhir::storage::put`] with origin `local` — the same path as a FHIR API write,
//! so each version gets its history row, index rows, ledger leaf and outbox change (synced
//! upstream) — plus an audit record, all in one transaction. The response is sent after that
//! commit. The protocol (attributes, statuses, the Procedure mapping) is
//! [`hms_edge_dicom::mpps`].

use serde_json::{Value, json};

use super::worklist;
use crate::audit::AuditRecord;
use crate::fhir::FhirError;
use crate::fhir::storage;
use crate::store::{StoreError, WriteTx};
pub use hms_edge_dicom::mpps::*;

/// The order a step was scheduled from: a current ServiceRequest whose accession number (else
/// Requested Procedure ID) equals one of the step's scheduled steps.
pub fn find_order(tx: &WriteTx<'_>, a: &Attributes) -> Result<Option<Value>, StoreError> {
    if a.scheduled.iter().all(|s| s.0.is_empty() && s.1.is_empty()) {
        return Ok(None);
    }
    // Candidates by the identifier index (accession numbers and procedure ids are identifier
    // values), then checked with the worklist's own mapping.
    let values: Vec<&str> = a
        .scheduled
        .iter()
        .flat_map(|s| [s.0.as_str(), s.1.as_str()])
        .filter(|v| !v.is_empty())
        .collect();
    let mut by_rp = None;
    for sr in storage::service_requests_by_identifier(tx.sql(), &values)? {
        let acc = worklist::accession_number(&sr).unwrap_or("");
        let rp = worklist::requested_procedure_id(&sr).unwrap_or("");
        if a.scheduled.iter().any(|s| !s.0.is_empty() && s.0 == acc) {
            return Ok(Some(sr));
        }
        if by_rp.is_none() && a.scheduled.iter().any(|s| !s.1.is_empty() && s.1 == rp) {
            by_rp = Some(sr);
        }
    }
    Ok(by_rp)
}

/// What a request did, for the response and the log.
pub type Outcome = Result<String, (u16, String)>;

/// Who sent the request, for the audit record.
#[derive(Debug, Clone)]
pub struct Caller {
    pub calling_ae: String,
    pub source: String,
}

fn audit(tx: &WriteTx<'_>, who: &Caller, uid: &str, outcome: &str) -> Result<(), StoreError> {
    crate::audit::append(
        tx,
        &AuditRecord {
            actor: format!("dicom:{}", who.calling_ae),
            source: who.source.clone(),
            action: "dicom-mpps".into(),
            entity: format!("dicom-mpps:{uid}"),
            outcome: outcome.into(),
            detail: None,
        },
    )?;
    Ok(())
}

/// N-CREATE, inside one write transaction. Nothing is written unless the step is accepted (the
/// audit record of a refusal excepted).
pub fn create(
    tx: &WriteTx<'_>,
    uid: &str,
    a: &Attributes,
    patient_id_system: &str,
    who: &Caller,
) -> Result<Outcome, FhirError> {
    let id = procedure_id(uid);
    let refused = |code: u16, why: String| -> Result<Outcome, FhirError> {
        audit(tx, who, uid, &format!("refused {code:04X}: {why}"))?;
        Ok(Err((code, why)))
    };
    if storage::read_current_json(tx.sql(), "Procedure", &id)?.is_some() {
        return refused(status::DUPLICATE_SOP_INSTANCE, "step already exists".into());
    }
    match a.status.as_deref() {
        None => {
            return refused(status::MISSING_ATTRIBUTE, "Performed Procedure Step Status".into());
        }
        Some("IN PROGRESS") => {}
        Some(other) => {
            return refused(
                status::INVALID_ATTRIBUTE_VALUE,
                format!("N-CREATE with Performed Procedure Step Status {other:?}"),
            );
        }
    }
    let order = find_order(tx, a)?;
    let procedure = new_procedure(uid, a, order.as_ref(), patient_id_system);
    storage::put(tx, "Procedure", &id, procedure, None, "local")?;
    // An ImagingStudy already made for the study links to the Procedure at its next refresh.
    for study in a.scheduled.iter().map(|s| s.2.as_str()).filter(|s| !s.is_empty()) {
        crate::fhir::imaging::mark_dirty(tx, study)?;
    }
    audit(tx, who, uid, "success: IN PROGRESS")?;
    Ok(Ok(format!("Procedure/{id} in-progress")))
}

/// N-SET, inside one write transaction.
pub fn set(
    tx: &WriteTx<'_>,
    uid: &str,
    a: &Attributes,
    who: &Caller,
) -> Result<Outcome, FhirError> {
    let id = procedure_id(uid);
    let refused = |code: u16, why: String| -> Result<Outcome, FhirError> {
        audit(tx, who, uid, &format!("refused {code:04X}: {why}"))?;
        Ok(Err((code, why)))
    };
    let Some(current) = storage::read_current_json(tx.sql(), "Procedure", &id)? else {
        return refused(status::NO_SUCH_OBJECT_INSTANCE, "no such step".into());
    };
    let p = match updated_procedure(&current, a) {
        Ok(p) => p,
        Err((code, why)) => return refused(code, why),
    };
    let new_status = p.get("status").and_then(Value::as_str).unwrap_or("").to_owned();
    let order_id = p
        .get("basedOn")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("reference").and_then(Value::as_str))
        .find_map(|r| r.strip_prefix("ServiceRequest/"))
        .map(str::to_owned);
    storage::put(tx, "Procedure", &id, p, None, "local")?;
    if let Some(order_id) = order_id
        && let Some(mut sr) = storage::read_current_json(tx.sql(), "ServiceRequest", &order_id)?
        && sr.get("status").and_then(Value::as_str) == Some("active")
    {
        let changed = match new_status.as_str() {
            "completed" => {
                sr["status"] = json!("completed");
                true
            }
            "not-done" => {
                let note = json!({"text": format!(
                    "Performed procedure step {uid} was discontinued at the modality; the order stays scheduled"
                )});
                match sr.get_mut("note").and_then(Value::as_array_mut) {
                    Some(notes) => notes.push(note),
                    None => sr["note"] = json!([note]),
                }
                true
            }
            _ => false,
        };
        if changed {
            if let Some(m) = sr.as_object_mut() {
                m.remove("meta");
            }
            storage::put(tx, "ServiceRequest", &order_id, sr, None, "local")?;
        }
    }
    audit(tx, who, uid, &format!("success: {}", a.status.as_deref().unwrap_or("(no status)")))?;
    Ok(Ok(format!("Procedure/{id} {new_status}")))
}
