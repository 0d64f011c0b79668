//! Modality Worklist SCP, the store side: the worklist items of the active orders in the FHIR
//! cache (read through `fhir::storage`, the FHIR tables' one door), matched and encoded by
//! [`hms_edge_dicom::worklist`].

use rusqlite::Connection;
use serde_json::Value;

use crate::fhir::storage;
use crate::store::StoreError;
pub use hms_edge_dicom::worklist::*;

/// The worklist item of one order, reading its Patient and Appointment.
pub fn item_for(
    conn: &Connection,
    sr: &Value,
    patient_id_system: &str,
) -> Result<Item, StoreError> {
    let patient = match str_at(sr, &["subject", "reference"]).and_then(|r| r.split_once('/')) {
        Some(("Patient", id)) => storage::read_current_json(conn, "Patient", id)?,
        _ => None,
    };
    let id = sr.get("id").and_then(Value::as_str).unwrap_or("");
    let appointment = match storage::appointment_based_on(conn, id)? {
        Some(a) => storage::read_current_json(conn, "Appointment", &a)?,
        None => None,
    };
    Ok(map_order(sr, patient.as_ref(), appointment.as_ref(), patient_id_system))
}

/// Runs a worklist query; at most `limit` matches (`Err(limit)` beyond).
pub fn run(
    conn: &Connection,
    q: &WorklistQuery,
    patient_id_system: &str,
    limit: usize,
) -> Result<Result<Vec<Item>, usize>, StoreError> {
    let mut out = Vec::new();
    for sr in storage::active_service_requests(conn)?.iter().filter(|sr| is_scheduled(sr)) {
        let item = item_for(conn, sr, patient_id_system)?;
        if item.matches(q) {
            if out.len() == limit {
                return Ok(Err(limit));
            }
            out.push(item);
        }
    }
    Ok(Ok(out))
}
