//! The DICOM index in the encrypted database: patients, studies, series and instances, written in
//! the same transaction as the instance's blob row and its outbox change.

use rusqlite::{Connection, OptionalExtension, params};

use super::sink::ReceivedInstance;
use crate::config::DuplicatePolicy;
use crate::store::{BlobId, Change, StoreError, WriteTx, now_ms};

/// Schema of the DICOM index (appended to `store::db::MIGRATIONS`).
pub const MIGRATION: &str = r#"
    CREATE TABLE dicom_patients (
        pk           INTEGER PRIMARY KEY,
        patient_id   TEXT NOT NULL,
        patient_name TEXT NOT NULL,
        birth_date   TEXT NOT NULL,
        sex          TEXT NOT NULL,
        UNIQUE (patient_id, patient_name)
    ) STRICT;
    CREATE TABLE dicom_studies (
        study_uid           TEXT PRIMARY KEY,
        patient_pk          INTEGER NOT NULL REFERENCES dicom_patients (pk),
        study_date          TEXT NOT NULL,
        study_time          TEXT NOT NULL,
        accession_number    TEXT NOT NULL,
        study_id            TEXT NOT NULL,
        study_description   TEXT NOT NULL,
        referring_physician TEXT NOT NULL,
        created_at          INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX dicom_studies_by_patient ON dicom_studies (patient_pk);
    CREATE INDEX dicom_studies_by_date ON dicom_studies (study_date);
    CREATE INDEX dicom_studies_by_accession ON dicom_studies (accession_number);
    CREATE TABLE dicom_series (
        series_uid         TEXT PRIMARY KEY,
        study_uid          TEXT NOT NULL REFERENCES dicom_studies (study_uid),
        modality           TEXT NOT NULL,
        series_number      INTEGER,
        series_description TEXT NOT NULL,
        created_at         INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX dicom_series_by_study ON dicom_series (study_uid);
    CREATE TABLE dicom_instances (
        pk               INTEGER PRIMARY KEY,
        sop_uid          TEXT NOT NULL,
        version          INTEGER NOT NULL,
        series_uid       TEXT NOT NULL REFERENCES dicom_series (series_uid),
        sop_class_uid    TEXT NOT NULL,
        instance_number  INTEGER,
        number_of_frames INTEGER,
        transfer_syntax  TEXT NOT NULL,
        size             INTEGER NOT NULL,
        dataset_sha256   TEXT NOT NULL,
        blob             TEXT NOT NULL REFERENCES blobs (id),
        calling_ae       TEXT NOT NULL,
        received_at      INTEGER NOT NULL,
        UNIQUE (sop_uid, version)
    ) STRICT;
    CREATE INDEX dicom_instances_by_series ON dicom_instances (series_uid);
    CREATE INDEX dicom_patients_by_id ON dicom_patients (patient_id);
"#;

/// What became of a received instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored as this version (1 for a new SOP Instance UID).
    Stored { version: i64, outbox_seq: i64 },
    /// The same SOP Instance UID with identical content is already stored: nothing written.
    Identical,
    /// The same SOP Instance UID with other content, refused by the keep-first policy.
    Conflict,
}

/// Who sent an instance, for the index row and the audit event.
#[derive(Debug, Clone)]
pub struct Sender {
    /// The calling AE title (C-STORE) or the authenticated user (STOW-RS).
    pub calling_ae: String,
    /// Audit actor, e.g. `dicom:CT1`.
    pub actor: String,
    /// Remote address.
    pub source: String,
}

impl Sender {
    /// A modality on a DICOM association.
    pub fn association(calling_ae: &str, peer: std::net::SocketAddr) -> Sender {
        Sender {
            calling_ae: calling_ae.to_owned(),
            actor: format!("dicom:{calling_ae}"),
            source: peer.ip().to_string(),
        }
    }
}

/// Records a received (already fsynced) instance: blob row, index rows, outbox change and the
/// audit event, or only the audit event for a duplicate. Runs inside
/// [`crate::store::Store::write`].
pub fn record_instance(
    tx: &WriteTx<'_>,
    inst: &ReceivedInstance,
    transfer_syntax: &str,
    sender: &Sender,
    policy: DuplicatePolicy,
) -> Result<Recorded, StoreError> {
    let recorded = record_rows(tx, inst, transfer_syntax, &sender.calling_ae, policy)?;
    let (outcome, version) = match &recorded {
        Recorded::Stored { version, .. } => ("success".to_owned(), Some(*version)),
        Recorded::Identical => ("success: identical instance already stored".to_owned(), None),
        Recorded::Conflict => {
            ("refused: 0111 duplicate SOP instance with other content".into(), None)
        }
    };
    let a = &inst.attrs;
    crate::audit::append(
        tx,
        &crate::audit::AuditRecord {
            actor: sender.actor.clone(),
            source: sender.source.clone(),
            action: "dicom-store".into(),
            entity: format!("dicom:{}", a.sop_instance_uid),
            outcome,
            detail: Some(
                serde_json::json!({
                    "study": a.study_instance_uid,
                    "series": a.series_instance_uid,
                    "patient_id": a.patient_id,
                    "version": version,
                })
                .to_string(),
            ),
        },
    )?;
    Ok(recorded)
}

fn record_rows(
    tx: &WriteTx<'_>,
    inst: &ReceivedInstance,
    transfer_syntax: &str,
    calling_ae: &str,
    policy: DuplicatePolicy,
) -> Result<Recorded, StoreError> {
    let sql = tx.sql();
    let a = &inst.attrs;
    let mut versions = sql.prepare_cached(
        "SELECT version, dataset_sha256 FROM dicom_instances WHERE sop_uid = ?1 ORDER BY version",
    )?;
    let existing: Vec<(i64, String)> = versions
        .query_map([&a.sop_instance_uid], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if existing.iter().any(|(_, h)| *h == inst.dataset_sha256) {
        return Ok(Recorded::Identical);
    }
    if !existing.is_empty() && policy == DuplicatePolicy::KeepFirst {
        return Ok(Recorded::Conflict);
    }
    let version = existing.last().map_or(1, |(v, _)| v + 1);
    let now = now_ms();

    tx.insert_blob(&inst.blob)?;
    sql.prepare_cached(
        "INSERT INTO dicom_patients (patient_id, patient_name, birth_date, sex)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (patient_id, patient_name) DO NOTHING",
    )?
    .execute(params![a.patient_id, a.patient_name, a.patient_birth_date, a.patient_sex])?;
    let patient_pk: i64 = sql
        .prepare_cached(
            "SELECT pk FROM dicom_patients WHERE patient_id = ?1 AND patient_name = ?2",
        )?
        .query_row(params![a.patient_id, a.patient_name], |r| r.get(0))?;
    sql.prepare_cached(
        "INSERT INTO dicom_studies (study_uid, patient_pk, study_date, study_time, accession_number,
             study_id, study_description, referring_physician, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (study_uid) DO NOTHING",
    )?
    .execute(params![
        a.study_instance_uid,
        patient_pk,
        a.study_date,
        a.study_time,
        a.accession_number,
        a.study_id,
        a.study_description,
        a.referring_physician_name,
        now
    ])?;
    let new_study = sql.changes() == 1;
    sql.prepare_cached(
        "INSERT INTO dicom_series (series_uid, study_uid, modality, series_number,
             series_description, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (series_uid) DO NOTHING",
    )?
    .execute(params![
        a.series_instance_uid,
        a.study_instance_uid,
        a.modality,
        a.series_number,
        a.series_description,
        now
    ])?;
    sql.prepare_cached(
        "INSERT INTO dicom_instances (sop_uid, version, series_uid, sop_class_uid, instance_number,
             number_of_frames, transfer_syntax, size, dataset_sha256, blob, calling_ae, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        a.sop_instance_uid,
        version,
        a.series_instance_uid,
        a.sop_class_uid,
        a.instance_number,
        a.number_of_frames,
        transfer_syntax,
        inst.blob.size as i64,
        inst.dataset_sha256,
        inst.blob.id.as_str(),
        calling_ae,
        now
    ])?;
    crate::ledger::append(
        tx,
        &crate::ledger::Record::Dicom {
            pk: sql.last_insert_rowid(),
            sop_uid: a.sop_instance_uid.clone(),
            version,
            series_uid: a.series_instance_uid.clone(),
            sop_class_uid: a.sop_class_uid.clone(),
            transfer_syntax: transfer_syntax.into(),
            size: inst.blob.size as i64,
            dataset_sha256: inst.dataset_sha256.clone(),
            blob: inst.blob.id.as_str().into(),
        },
    )?;
    // The study's FHIR ImagingStudy is rebuilt shortly after, by `fhir::imaging::refresher`.
    crate::fhir::imaging::mark_dirty(tx, &a.study_instance_uid)?;
    let detail = serde_json::json!({
        "study": a.study_instance_uid,
        "series": a.series_instance_uid,
        "sop_class": a.sop_class_uid,
        "transfer_syntax": transfer_syntax,
        "size": inst.blob.size,
    });
    let outbox_seq = tx.append_change(&Change {
        kind: "dicom".into(),
        entity: a.sop_instance_uid.clone(),
        op: "store".into(),
        version: Some(version.to_string()),
        detail: Some(detail.to_string()),
    })?;
    if new_study {
        // A PHI-free event for the broker: the agent publishes it as `study.received`.
        tx.append_change(&Change {
            kind: "event".into(),
            entity: a.study_instance_uid.clone(),
            op: "study.received".into(),
            version: None,
            detail: Some(serde_json::json!({ "study": a.study_instance_uid }).to_string()),
        })?;
    }
    Ok(Recorded::Stored { version, outbox_seq })
}

/// A stored instance as export needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    pub sop_uid: String,
    pub version: i64,
    pub blob: BlobId,
    pub size: u64,
    pub transfer_syntax: String,
    pub sop_class_uid: String,
}

/// The newest version of an instance (or a given version).
pub fn find_instance(
    conn: &Connection,
    sop_uid: &str,
    version: Option<i64>,
) -> Result<Option<StoredInstance>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, blob, size, transfer_syntax, sop_class_uid FROM dicom_instances
             WHERE sop_uid = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version DESC LIMIT 1",
        )?
        .query_row(params![sop_uid, version], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .optional()?;
    Ok(row.and_then(|(version, blob, size, ts, class)| {
        Some(StoredInstance {
            sop_uid: sop_uid.to_owned(),
            version,
            blob: BlobId::parse(&blob)?,
            size: size as u64,
            transfer_syntax: ts,
            sop_class_uid: class,
        })
    }))
}

/// Counts for tests and status: (studies, series, instances incl. versions).
pub fn counts(conn: &Connection) -> Result<(u64, u64, u64), StoreError> {
    Ok(conn.query_row(
        "SELECT (SELECT count(*) FROM dicom_studies), (SELECT count(*) FROM dicom_series),
                (SELECT count(*) FROM dicom_instances)",
        [],
        |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
        },
    )?)
}
