//! ImagingStudy resources for the studies the DICOM receiver stores.
//!
//! The DICOM path only marks a study "dirty" in the same transaction as the instance (a cheap
//! insert, so ingest speed is unaffected); a refresher task turns dirty studies into
//! ImagingStudy versions about once a second. The mark is durable, so a crash between the two
//! only delays the update. The study is linked to the Patient whose identifier is the DICOM
//! PatientID under the site's issuer system, or to a placeholder Patient made for it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::storage;
use crate::dicom::index;
use crate::fhir::FhirError;
use crate::store::{Store, StoreError, WriteTx};

/// Schema: studies whose ImagingStudy needs rebuilding.
pub const MIGRATION: &str = r#"
    CREATE TABLE fhir_imaging_dirty (study_uid TEXT PRIMARY KEY) STRICT;
"#;

/// How often dirty studies are turned into ImagingStudy versions.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(1000);
/// Most studies refreshed in one transaction.
const REFRESH_BATCH: usize = 64;
/// Id of the Endpoint resource that ImagingStudy.endpoint points to.
pub const ENDPOINT_ID: &str = "hms-edge-dicomweb";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// Where ImagingStudies point and how DICOM patients are identified.
#[derive(Debug, Clone)]
pub struct ImagingLink {
    /// Identifier system for DICOM PatientID values of this site.
    pub patient_id_system: String,
    /// DICOMweb base URL for the Endpoint resource.
    pub dicomweb_base: String,
}

/// Marks a study for an ImagingStudy refresh (called in the instance's transaction).
pub fn mark_dirty(tx: &WriteTx<'_>, study_uid: &str) -> Result<(), StoreError> {
    tx.sql()
        .prepare_cached(
            "INSERT INTO fhir_imaging_dirty (study_uid) VALUES (?1) ON CONFLICT DO NOTHING",
        )?
        .execute([study_uid])?;
    Ok(())
}

/// Runs until `shutdown`, refreshing dirty studies; one last pass at shutdown.
pub async fn refresher(store: Arc<Store>, link: ImagingLink, shutdown: CancellationToken) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(REFRESH_INTERVAL) => false,
            () = shutdown.cancelled() => true,
        };
        loop {
            let l = link.clone();
            match store.write_as(move |tx| refresh_dirty(tx, &l)).await {
                Ok(n) if n == REFRESH_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "ImagingStudy refresh failed");
                    break;
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// Rebuilds up to `REFRESH_BATCH` dirty studies. Returns how many.
pub fn refresh_dirty(tx: &WriteTx<'_>, link: &ImagingLink) -> Result<usize, FhirError> {
    let sql = tx.sql();
    let dirty: Vec<String> = sql
        .prepare_cached("SELECT study_uid FROM fhir_imaging_dirty LIMIT ?1")?
        .query_map([REFRESH_BATCH as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if dirty.is_empty() {
        return Ok(0);
    }
    ensure_endpoint(tx, link)?;
    for uid in &dirty {
        if let Some(study) = build_study(tx, uid, link)? {
            let id = study_id(uid);
            storage::put(tx, "ImagingStudy", &id, study, None, "local")?;
        }
        sql.prepare_cached("DELETE FROM fhir_imaging_dirty WHERE study_uid = ?1")?
            .execute([uid])?;
    }
    Ok(dirty.len())
}

pub use hms_edge_fhir::imaging_study_id as study_id;

fn ensure_endpoint(tx: &WriteTx<'_>, link: &ImagingLink) -> Result<(), FhirError> {
    let current = storage::read_current(tx.sql(), "Endpoint", ENDPOINT_ID)?;
    let wanted = json!({
        "resourceType": "Endpoint", "id": ENDPOINT_ID, "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
        "name": "hms-edge DICOMweb",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": link.dicomweb_base,
    });
    let same = current
        .as_ref()
        .and_then(|c| c.json.as_deref())
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .is_some_and(|mut v| {
            if let Some(m) = v.as_object_mut() {
                m.remove("meta");
            }
            v == wanted
        });
    if !same {
        storage::put(tx, "Endpoint", ENDPOINT_ID, wanted, None, "local")?;
    }
    Ok(())
}

/// StudyDate as a FHIR date. The StudyTime is not used: DICOM times are the modality's local
/// time without a zone, and a FHIR dateTime with a time must carry one (a cloud server in strict
/// mode refuses it), so the day is the precision we can state truthfully.
fn dicom_date(d: &str, _t: &str) -> Option<String> {
    let d = d.trim();
    if d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..8]))
}

/// The Patient for a DICOM PatientID: matched by identifier, or a placeholder created now.
fn patient_for(
    tx: &WriteTx<'_>,
    system: &str,
    patient_id: &str,
    name: &str,
    birth: &str,
    sex: &str,
) -> Result<String, FhirError> {
    if let Some(id) = storage::patient_by_identifier(tx.sql(), system, patient_id)? {
        return Ok(id);
    }
    let mut p = json!({
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "urn:hms-edge", "code": "placeholder-from-dicom"}]},
        "identifier": [{"system": system, "value": patient_id}],
    });
    let mut parts = name.split('^');
    let family = parts.next().unwrap_or("").trim();
    let given: Vec<&str> = parts.take(2).map(str::trim).filter(|s| !s.is_empty()).collect();
    if !family.is_empty() || !given.is_empty() {
        p["name"] = json!([{"family": family, "given": given}]);
    }
    if let Some(d) = dicom_date(birth, "") {
        p["birthDate"] = json!(d);
    }
    let gender = match sex.trim() {
        "M" => Some("male"),
        "F" => Some("female"),
        "O" => Some("other"),
        _ => None,
    };
    if let Some(g) = gender {
        p["gender"] = json!(g);
    }
    let id = super::new_id();
    p["id"] = json!(id);
    storage::put(tx, "Patient", &id, p, None, "local")?;
    Ok(id)
}

fn build_study(
    tx: &WriteTx<'_>,
    uid: &str,
    link: &ImagingLink,
) -> Result<Option<Value>, FhirError> {
    let sql = tx.sql();
    let Some(head) = index::study_head(sql, uid)? else {
        return Ok(None);
    };
    let index::StudyHead {
        study_date: date,
        study_time: time,
        accession_number: accession,
        study_description: description,
        patient_id: pid,
        patient_name: pname,
        birth_date: birth,
        sex,
    } = head;
    let patient = patient_for(tx, &link.patient_id_system, &pid, &pname, &birth, &sex)?;
    let series_rows = index::series_of_study(sql, uid)?;
    let mut series = Vec::new();
    let mut modalities: Vec<String> = Vec::new();
    let mut total = 0usize;
    for index::SeriesRow {
        series_uid: suid,
        modality,
        series_number: number,
        series_description: sdesc,
    } in series_rows
    {
        let instances: Vec<Value> = index::instances_of_series(sql, &suid)?
            .into_iter()
            .map(|(sop, class, num)| {
                let mut v = json!({"uid": sop, "sopClass": {"system": "urn:ietf:rfc:3986", "code": format!("urn:oid:{class}")}});
                if let Some(n) = num {
                    v["number"] = json!(n);
                }
                v
            })
            .collect();
        total += instances.len();
        if !modality.is_empty() && !modalities.contains(&modality) {
            modalities.push(modality.clone());
        }
        let mut s = json!({"uid": suid, "modality": {"system": DCM, "code": modality},
                           "numberOfInstances": instances.len(), "instance": instances});
        if let Some(n) = number {
            s["number"] = json!(n);
        }
        if !sdesc.is_empty() {
            s["description"] = json!(sdesc);
        }
        series.push(s);
    }
    let mut identifiers =
        vec![json!({"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")})];
    if !accession.is_empty() {
        identifiers.push(json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": accession}));
    }
    let mut study = json!({
        "resourceType": "ImagingStudy",
        "id": study_id(uid),
        "status": "available",
        "identifier": identifiers,
        "subject": {"reference": format!("Patient/{patient}")},
        "endpoint": [{"reference": format!("Endpoint/{ENDPOINT_ID}")}],
        "modality": modalities.iter().map(|m| json!({"system": DCM, "code": m})).collect::<Vec<_>>(),
        "numberOfSeries": series.len(),
        "numberOfInstances": total,
        "series": series,
    });
    if let Some(s) = dicom_date(&date, &time) {
        study["started"] = json!(s);
    }
    if !description.is_empty() {
        study["description"] = json!(description);
    }
    link_order(tx, uid, &accession, &mut study)?;
    Ok(Some(study))
}

/// `basedOn` the order with this accession number and `procedureReference` the Procedure an MPPS
/// recorded for this study (`dicom::mpps`), when they exist.
fn link_order(
    tx: &WriteTx<'_>,
    uid: &str,
    accession: &str,
    study: &mut Value,
) -> Result<(), FhirError> {
    let sql = tx.sql();
    let ids_with = |rtype: &str, system: Option<&str>, value: &str| {
        storage::ids_by_identifier(sql, rtype, system, value)
    };
    if !accession.is_empty() {
        for id in ids_with("ServiceRequest", None, accession)? {
            let sr = storage::read_current_json(sql, "ServiceRequest", &id)?;
            if sr.as_ref().and_then(hms_edge_dicom::worklist::accession_number) == Some(accession) {
                study["basedOn"] = json!([{"reference": format!("ServiceRequest/{id}")}]);
                break;
            }
        }
    }
    let procedures = ids_with("Procedure", Some("urn:dicom:uid"), &format!("urn:oid:{uid}"))?;
    if let Some(id) = procedures.first() {
        study["procedureReference"] = json!({"reference": format!("Procedure/{id}")});
    }
    Ok(())
}
