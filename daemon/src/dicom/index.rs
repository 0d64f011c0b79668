//! The DICOM index in the encrypted database: patients, studies, series and instances, written in
//! the same transaction as the instance's blob row and its outbox change.

use rusqlite::{Connection, OptionalExtension, params};

use super::dataset::tags;
use super::query::{Level, Query, Record, matches_key};
use super::sink::ReceivedInstance;
use crate::config::DuplicatePolicy;
use crate::store::{BlobId, Change, StoreError, WriteTx, now_ms};

/// Schema of the DICOM index (in `store::MIGRATIONS`).
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

// ---- C-FIND and QIDO-RS reads: candidates by unique keys, then `query::matches_key` ----

/// Runs a query against the index; at most `limit` matches (`Err` beyond: the caller reports it).
pub fn find(
    conn: &Connection,
    q: &Query,
    limit: usize,
) -> Result<Result<Vec<Record>, usize>, StoreError> {
    let mut out = Vec::new();
    let mut over = false;
    for_each_match(conn, q, |rec| {
        if out.len() == limit {
            over = true;
            return false;
        }
        out.push(rec);
        true
    })?;
    Ok(if over { Err(limit) } else { Ok(out) })
}

/// The matches `offset..offset + take` and whether more follow: only that window is kept in
/// memory (QIDO-RS `offset`/`limit`), however many studies match.
pub fn find_page(
    conn: &Connection,
    q: &Query,
    offset: usize,
    take: usize,
) -> Result<(Vec<Record>, bool), StoreError> {
    let mut out = Vec::new();
    let (mut seen, mut more) = (0usize, false);
    for_each_match(conn, q, |rec| {
        seen += 1;
        if seen <= offset {
            return true;
        }
        if out.len() == take {
            more = true;
            return false;
        }
        out.push(rec);
        true
    })?;
    Ok((out, more))
}

/// Calls `f` with each match in order until it returns false.
fn for_each_match(
    conn: &Connection,
    q: &Query,
    mut f: impl FnMut(Record) -> bool,
) -> Result<(), StoreError> {
    let key = |tag: u32| q.keys.iter().find(|k| k.tag == tag && !k.value.is_empty());
    let uid_list = |tag: u32| -> Option<String> {
        key(tag).map(|k| {
            serde_json::Value::from(k.value.split('\\').map(|s| s.trim()).collect::<Vec<_>>())
                .to_string()
        })
    };
    let patient_id = key(tags::PATIENT_ID)
        .filter(|k| !k.value.contains(['*', '?', '\\']))
        .map(|k| k.value.clone());
    let studies = uid_list(tags::STUDY_INSTANCE_UID);
    let series = uid_list(tags::SERIES_INSTANCE_UID);
    let sops = uid_list(tags::SOP_INSTANCE_UID);

    const STUDY_COLS: &str = "st.study_uid, st.study_date, st.study_time, st.accession_number,
        st.study_id, st.study_description, st.referring_physician, p.patient_id, p.patient_name,
        p.birth_date, p.sex,
        (SELECT group_concat(DISTINCT modality) FROM dicom_series WHERE study_uid = st.study_uid),
        (SELECT count(*) FROM dicom_series WHERE study_uid = st.study_uid),
        (SELECT count(DISTINCT i.sop_uid) FROM dicom_instances i JOIN dicom_series se
            ON i.series_uid = se.series_uid WHERE se.study_uid = st.study_uid)";
    let filters = "(?1 IS NULL OR p.patient_id = ?1)
        AND (?2 IS NULL OR st.study_uid IN (SELECT value FROM json_each(?2)))";
    let sql = match q.level {
        Level::Study => format!(
            "SELECT {STUDY_COLS},
                (SELECT count(*) FROM dicom_series se2 JOIN dicom_instances i
                    ON i.series_uid = se2.series_uid JOIN blobs b ON b.id = i.blob
                 WHERE se2.study_uid = st.study_uid AND b.offloaded_at IS NOT NULL)
             FROM dicom_studies st JOIN dicom_patients p ON st.patient_pk = p.pk
             WHERE {filters} ORDER BY st.study_date, st.study_uid"
        ),
        Level::Series => format!(
            "SELECT {STUDY_COLS}, se.series_uid, se.modality, se.series_number,
                se.series_description,
                (SELECT count(DISTINCT sop_uid) FROM dicom_instances WHERE series_uid = se.series_uid),
                (SELECT count(*) FROM dicom_instances i JOIN blobs b ON b.id = i.blob
                 WHERE i.series_uid = se.series_uid AND b.offloaded_at IS NOT NULL)
             FROM dicom_series se JOIN dicom_studies st ON se.study_uid = st.study_uid
             JOIN dicom_patients p ON st.patient_pk = p.pk
             WHERE {filters} AND (?3 IS NULL OR se.series_uid IN (SELECT value FROM json_each(?3)))
             ORDER BY st.study_uid, se.series_number, se.series_uid"
        ),
        Level::Image => format!(
            "SELECT {STUDY_COLS}, se.series_uid, se.modality, se.series_number,
                se.series_description,
                (SELECT count(DISTINCT sop_uid) FROM dicom_instances WHERE series_uid = se.series_uid),
                i.sop_uid, i.sop_class_uid, i.instance_number, i.number_of_frames,
                (SELECT b.offloaded_at IS NOT NULL FROM blobs b WHERE b.id = i.blob)
             FROM dicom_instances i JOIN dicom_series se ON i.series_uid = se.series_uid
             JOIN dicom_studies st ON se.study_uid = st.study_uid
             JOIN dicom_patients p ON st.patient_pk = p.pk
             WHERE {filters} AND (?3 IS NULL OR se.series_uid IN (SELECT value FROM json_each(?3)))
               AND (?4 IS NULL OR i.sop_uid IN (SELECT value FROM json_each(?4)))
               AND i.version = (SELECT max(version) FROM dicom_instances WHERE sop_uid = i.sop_uid)
             ORDER BY se.series_uid, i.instance_number, i.sop_uid"
        ),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let n_params = stmt.parameter_count();
    let all = [patient_id, studies, series, sops];
    let mut rows = stmt.query(rusqlite::params_from_iter(all.iter().take(n_params)))?;
    while let Some(r) = rows.next()? {
        let text = |i: usize| -> rusqlite::Result<String> {
            Ok(r.get::<_, Option<String>>(i)?.unwrap_or_default())
        };
        let num = |i: usize| -> rusqlite::Result<String> {
            Ok(r.get::<_, Option<i64>>(i)?.map(|v| v.to_string()).unwrap_or_default())
        };
        let mut rec = Record::new();
        rec.insert(tags::STUDY_INSTANCE_UID, text(0)?);
        rec.insert(tags::STUDY_DATE, text(1)?);
        rec.insert(tags::STUDY_TIME, text(2)?);
        rec.insert(tags::ACCESSION_NUMBER, text(3)?);
        rec.insert(tags::STUDY_ID, text(4)?);
        rec.insert(tags::STUDY_DESCRIPTION, text(5)?);
        rec.insert(tags::REFERRING_PHYSICIAN_NAME, text(6)?);
        rec.insert(tags::PATIENT_ID, text(7)?);
        rec.insert(tags::PATIENT_NAME, text(8)?);
        rec.insert(tags::PATIENT_BIRTH_DATE, text(9)?);
        rec.insert(tags::PATIENT_SEX, text(10)?);
        let mut modalities: Vec<String> =
            text(11)?.split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
        modalities.sort();
        rec.insert(tags::MODALITIES_IN_STUDY, modalities.join("\\"));
        rec.insert(tags::NUMBER_OF_STUDY_RELATED_SERIES, num(12)?);
        rec.insert(tags::NUMBER_OF_STUDY_RELATED_INSTANCES, num(13)?);
        if q.level != Level::Study {
            rec.insert(tags::SERIES_INSTANCE_UID, text(14)?);
            rec.insert(tags::MODALITY, text(15)?);
            rec.insert(tags::SERIES_NUMBER, num(16)?);
            rec.insert(tags::SERIES_DESCRIPTION, text(17)?);
            rec.insert(tags::NUMBER_OF_SERIES_RELATED_INSTANCES, num(18)?);
        }
        if q.level == Level::Image {
            rec.insert(tags::SOP_INSTANCE_UID, text(19)?);
            rec.insert(tags::SOP_CLASS_UID, text(20)?);
            rec.insert(tags::INSTANCE_NUMBER, num(21)?);
            rec.insert(tags::NUMBER_OF_FRAMES, num(22)?);
        }
        // The last column: instances of this match whose file was evicted (the cloud PACS holds
        // them): NEARLINE, as PS3.4 C.4.1.1.3.2 has it for "retrievable, not at once".
        let evicted: i64 = r.get::<_, Option<i64>>(r.as_ref().column_count() - 1)?.unwrap_or(0);
        let availability = if evicted > 0 { "NEARLINE" } else { "ONLINE" };
        rec.insert(tags::INSTANCE_AVAILABILITY, availability.to_owned());
        if q.keys.iter().all(|k| matches_key(k, rec.get(&k.tag).map(String::as_str))) && !f(rec) {
            break;
        }
    }
    Ok(())
}

/// Convenience for tests and the CLI: all stored SOP Instance UIDs of a study.
pub fn instances_of_study(conn: &Connection, study_uid: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT i.sop_uid FROM dicom_instances i JOIN dicom_series se
         ON i.series_uid = se.series_uid WHERE se.study_uid = ?1 ORDER BY i.sop_uid",
    )?;
    let rows = stmt.query_map(params![study_uid], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- Retrieval reads (C-GET, C-MOVE, WADO-RS): the newest version of each named instance ----

/// The newest version of one stored instance, as a retrieval sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestInstance {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub blob: BlobId,
    pub size: u64,
    /// Whether its file is here (false: evicted, the cloud PACS holds it).
    pub held: bool,
}

fn latest_instance(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<LatestInstance>> {
    let blob: String = r.get(5)?;
    let Some(blob) = BlobId::parse(&blob) else { return Ok(None) };
    Ok(Some(LatestInstance {
        study_uid: r.get(0)?,
        series_uid: r.get(1)?,
        sop_uid: r.get(2)?,
        sop_class_uid: r.get(3)?,
        transfer_syntax: r.get(4)?,
        blob,
        size: r.get::<_, i64>(6)? as u64,
        held: r.get::<_, i64>(7)? != 0,
    }))
}

/// The instances a C-GET/C-MOVE identifier names (each list empty = any), in study, series,
/// instance number order; at most `limit` (`Err(limit)` beyond).
pub fn retrieve_targets(
    conn: &Connection,
    patient_id: Option<&str>,
    studies: &[String],
    series: &[String],
    instances: &[String],
    limit: usize,
) -> Result<Result<Vec<LatestInstance>, usize>, StoreError> {
    let json = |v: &[String]| (!v.is_empty()).then(|| serde_json::Value::from(v).to_string());
    let mut stmt = conn.prepare_cached(
        "SELECT se.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.blob,
                i.size, b.offloaded_at IS NULL
         FROM dicom_instances i JOIN dicom_series se ON i.series_uid = se.series_uid
         JOIN blobs b ON b.id = i.blob
         JOIN dicom_studies st ON se.study_uid = st.study_uid
         JOIN dicom_patients p ON st.patient_pk = p.pk
         WHERE (?1 IS NULL OR p.patient_id = ?1)
           AND (?2 IS NULL OR se.study_uid IN (SELECT value FROM json_each(?2)))
           AND (?3 IS NULL OR se.series_uid IN (SELECT value FROM json_each(?3)))
           AND (?4 IS NULL OR i.sop_uid IN (SELECT value FROM json_each(?4)))
           AND i.version = (SELECT max(version) FROM dicom_instances WHERE sop_uid = i.sop_uid)
         ORDER BY se.study_uid, se.series_uid, i.instance_number, i.sop_uid",
    )?;
    let mut rows = stmt.query(params![patient_id, json(studies), json(series), json(instances)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let Some(inst) = latest_instance(row)? else { continue };
        if out.len() == limit {
            return Ok(Err(limit));
        }
        out.push(inst);
    }
    Ok(Ok(out))
}

/// The instances of a study (or one series, or one instance) for WADO-RS, in series number,
/// series, instance number order.
pub fn study_instances(
    conn: &Connection,
    study: &str,
    series: Option<&str>,
    sop: Option<&str>,
) -> Result<Vec<LatestInstance>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT se.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax,
                i.blob, i.size, b.offloaded_at IS NULL
         FROM dicom_instances i JOIN dicom_series se ON i.series_uid = se.series_uid
         JOIN blobs b ON b.id = i.blob
         WHERE se.study_uid = ?1 AND (?2 IS NULL OR se.series_uid = ?2)
           AND (?3 IS NULL OR i.sop_uid = ?3)
           AND i.version = (SELECT max(version) FROM dicom_instances WHERE sop_uid = i.sop_uid)
         ORDER BY se.series_number, se.series_uid, i.instance_number, i.sop_uid",
    )?;
    let rows = stmt.query_map(params![study, series, sop], latest_instance)?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

// ---- Study reads for the FHIR ImagingStudy built from the index (`fhir::imaging`) ----

/// A study's own attributes and its patient's, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyHead {
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub study_description: String,
    pub patient_id: String,
    pub patient_name: String,
    pub birth_date: String,
    pub sex: String,
}

/// The head of a stored study, if there is one.
pub fn study_head(conn: &Connection, study_uid: &str) -> Result<Option<StudyHead>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT s.study_date, s.study_time, s.accession_number, s.study_description,
                    p.patient_id, p.patient_name, p.birth_date, p.sex
             FROM dicom_studies s JOIN dicom_patients p ON p.pk = s.patient_pk WHERE s.study_uid = ?1",
        )?
        .query_row([study_uid], |r| {
            Ok(StudyHead {
                study_date: r.get(0)?,
                study_time: r.get(1)?,
                accession_number: r.get(2)?,
                study_description: r.get(3)?,
                patient_id: r.get(4)?,
                patient_name: r.get(5)?,
                birth_date: r.get(6)?,
                sex: r.get(7)?,
            })
        })
        .optional()?)
}

/// One series of a study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    pub series_uid: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
}

/// The series of a study, by series number.
pub fn series_of_study(conn: &Connection, study_uid: &str) -> Result<Vec<SeriesRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT series_uid, modality, series_number, series_description FROM dicom_series
         WHERE study_uid = ?1 ORDER BY series_number, series_uid",
    )?;
    let rows = stmt.query_map([study_uid], |r| {
        Ok(SeriesRow {
            series_uid: r.get(0)?,
            modality: r.get(1)?,
            series_number: r.get(2)?,
            series_description: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The newest version of each instance of a series: (SOP Instance UID, SOP Class UID, Instance
/// Number), by instance number.
pub fn instances_of_series(
    conn: &Connection,
    series_uid: &str,
) -> Result<Vec<(String, String, Option<i64>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sop_uid, sop_class_uid, instance_number FROM dicom_instances i
         WHERE series_uid = ?1 AND version = (SELECT max(version) FROM dicom_instances j WHERE j.sop_uid = i.sop_uid)
         ORDER BY instance_number, sop_uid",
    )?;
    let rows = stmt.query_map([series_uid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- Storage lifecycle: upstream confirmation, access, pinning, eviction (see `dicom::evict`) ----

/// Migration 10: what eviction needs to know. `confirmed_at`: when the cloud PACS confirmed this
/// instance version (the agent's QIDO-RS/C-FIND check); instances whose change had already left
/// the outbox were confirmed before the column existed. `accessed_at`: the last retrieve of the
/// study (C-GET, C-MOVE, WADO-RS). `pinned`: site IT keeps the study here whatever the disk.
/// Whether an instance's file is here is its blob's `offloaded_at` (store migration 9).
/// `dicom_offloaded_file_meta` keeps the File Meta an evicted blob began with, so that a recall
/// (the data set from the cloud PACS) rebuilds the very same blob: same size, same checksum,
/// same ledger commitment.
pub const MIGRATION_LIFECYCLE: &str = r#"
    ALTER TABLE dicom_instances ADD COLUMN confirmed_at INTEGER;
    ALTER TABLE dicom_studies ADD COLUMN accessed_at INTEGER;
    ALTER TABLE dicom_studies ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE dicom_offloaded_file_meta (
        blob      TEXT PRIMARY KEY REFERENCES blobs (id),
        file_meta BLOB NOT NULL
    ) STRICT;
    UPDATE dicom_instances SET confirmed_at = received_at
     WHERE NOT EXISTS (SELECT 1 FROM outbox o
                        WHERE o.kind = 'dicom' AND o.entity = dicom_instances.sop_uid);
"#;

/// Records that the cloud PACS confirmed an instance version (its outbox change acknowledged).
pub fn mark_confirmed(
    conn: &Connection,
    sop_uid: &str,
    version: Option<i64>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE dicom_instances SET confirmed_at = ?3
          WHERE sop_uid = ?1 AND (?2 IS NULL OR version = ?2) AND confirmed_at IS NULL",
    )?
    .execute(params![sop_uid, version, now_ms()])?;
    Ok(())
}

/// Records the last retrieve of studies (batched by `dicom::evict::AccessLog`).
pub fn mark_accessed(conn: &Connection, studies: &[(String, i64)]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE dicom_studies SET accessed_at = max(coalesce(accessed_at, 0), ?2) WHERE study_uid = ?1",
    )?;
    for (uid, at) in studies {
        stmt.execute(params![uid, at])?;
    }
    Ok(())
}

/// Pins or unpins a study. Returns false when no such study is stored.
pub fn set_pinned(conn: &Connection, study_uid: &str, pinned: bool) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE dicom_studies SET pinned = ?2 WHERE study_uid = ?1")?
        .execute(params![study_uid, pinned])?
        == 1)
}

/// A study as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StudyUse {
    pub study_uid: String,
    pub accession_number: String,
    /// The later of its last instance received and its last retrieve, ms since the epoch.
    pub last_use_ms: i64,
    /// Instances (every version) whose file is here, and their bytes.
    pub held_instances: u64,
    pub held_bytes: u64,
    /// Instances (every version) the cloud PACS has not confirmed yet.
    pub unconfirmed: u64,
    pub pinned: bool,
}

const STUDY_USE_SELECT: &str = "
    SELECT st.study_uid, st.accession_number,
           max(st.created_at, coalesce(st.accessed_at, 0), max(i.received_at)) AS last_use,
           sum(b.offloaded_at IS NULL), sum(CASE WHEN b.offloaded_at IS NULL THEN i.size ELSE 0 END),
           sum(i.confirmed_at IS NULL), st.pinned
    FROM dicom_studies st
    JOIN dicom_series se ON se.study_uid = st.study_uid
    JOIN dicom_instances i ON i.series_uid = se.series_uid
    JOIN blobs b ON b.id = i.blob";

fn study_use(r: &rusqlite::Row<'_>) -> rusqlite::Result<StudyUse> {
    Ok(StudyUse {
        study_uid: r.get(0)?,
        accession_number: r.get(1)?,
        last_use_ms: r.get(2)?,
        held_instances: r.get::<_, i64>(3)? as u64,
        held_bytes: r.get::<_, i64>(4)? as u64,
        unconfirmed: r.get::<_, i64>(5)? as u64,
        pinned: r.get::<_, i64>(6)? != 0,
    })
}

/// One study's use, if it is stored.
pub fn study_use_of(conn: &Connection, study_uid: &str) -> Result<Option<StudyUse>, StoreError> {
    let sql = format!("{STUDY_USE_SELECT} WHERE st.study_uid = ?1 GROUP BY st.study_uid");
    Ok(conn.prepare_cached(&sql)?.query_row([study_uid], study_use).optional()?)
}

/// Studies eviction may take, least recently used first: something held here, every instance
/// confirmed upstream, not pinned, last used before `used_before_ms`. At most `limit`.
pub fn eviction_candidates(
    conn: &Connection,
    used_before_ms: i64,
    limit: usize,
) -> Result<Vec<StudyUse>, StoreError> {
    let sql = format!(
        "{STUDY_USE_SELECT} WHERE st.pinned = 0 GROUP BY st.study_uid
         HAVING sum(b.offloaded_at IS NULL) > 0 AND sum(i.confirmed_at IS NULL) = 0
            AND last_use < ?1
         ORDER BY last_use, st.study_uid LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![used_before_ms, limit as i64], study_use)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Studies with something held here whose last use was before `used_before_ms` (manual
/// eviction by date; the caller says why any of them cannot go).
pub fn studies_used_before(
    conn: &Connection,
    used_before_ms: i64,
) -> Result<Vec<StudyUse>, StoreError> {
    let sql = format!(
        "{STUDY_USE_SELECT} GROUP BY st.study_uid
         HAVING sum(b.offloaded_at IS NULL) > 0 AND last_use < ?1 ORDER BY last_use, st.study_uid"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([used_before_ms], study_use)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Offloads the blobs of a study's held instances in this transaction (their rows stay: C-FIND
/// and QIDO-RS still find the study). Re-checks, inside the transaction, that the study is
/// neither pinned nor unconfirmed, so a pin or a new instance that raced the choice wins.
/// Returns the study's use before, or `None` when it may not (or need not) go.
pub fn offload_study(
    tx: &WriteTx<'_>,
    study_uid: &str,
    file_metas: &std::collections::HashMap<String, Vec<u8>>,
) -> Result<Option<StudyUse>, StoreError> {
    let sql = tx.sql();
    let Some(before) = study_use_of(sql, study_uid)? else { return Ok(None) };
    if before.pinned || before.unconfirmed > 0 || before.held_instances == 0 {
        return Ok(None);
    }
    let blobs = held_blobs_of_study(sql, study_uid)?;
    // Every held blob's File Meta was read before the transaction; one that is not (it arrived
    // since) means the study changed: leave it for the next round.
    if blobs.iter().any(|b| !file_metas.contains_key(b)) {
        return Ok(None);
    }
    let mut keep = sql.prepare_cached(
        "INSERT OR REPLACE INTO dicom_offloaded_file_meta (blob, file_meta) VALUES (?1, ?2)",
    )?;
    for b in blobs {
        if let Some(id) = BlobId::parse(&b) {
            keep.execute(params![b, file_metas[&b]])?;
            tx.offload_blob(&id)?;
        }
    }
    Ok(Some(before))
}

/// The blob ids of a study's instances whose file is here.
pub fn held_blobs_of_study(conn: &Connection, study_uid: &str) -> Result<Vec<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT i.blob FROM dicom_instances i JOIN dicom_series se ON se.series_uid = i.series_uid
             JOIN blobs b ON b.id = i.blob
             WHERE se.study_uid = ?1 AND b.offloaded_at IS NULL",
        )?
        .query_map([study_uid], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// An evicted instance version, as the agent needs it to fetch it back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EvictedRef {
    pub sop: String,
    pub series: String,
    pub version: i64,
}

/// The evicted instance versions of a study.
pub fn evicted_of_study(conn: &Connection, study_uid: &str) -> Result<Vec<EvictedRef>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT i.sop_uid, i.series_uid, i.version FROM dicom_instances i
             JOIN dicom_series se ON se.series_uid = i.series_uid JOIN blobs b ON b.id = i.blob
             WHERE se.study_uid = ?1 AND b.offloaded_at IS NOT NULL ORDER BY i.pk",
        )?
        .query_map([study_uid], |r| {
            Ok(EvictedRef { sop: r.get(0)?, series: r.get(1)?, version: r.get(2)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// What a recall of one evicted instance version must rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictedInstance {
    pub study_uid: String,
    pub blob: BlobId,
    /// Bytes of the whole blob (our File Meta + the data set) and the data set's SHA-256, as
    /// recorded when it was received.
    pub size: u64,
    pub dataset_sha256: String,
    pub file_meta: Vec<u8>,
}

/// An instance version whose file was evicted (`None`: unknown, or held here).
pub fn evicted_instance(
    conn: &Connection,
    sop_uid: &str,
    version: i64,
) -> Result<Option<EvictedInstance>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT se.study_uid, i.blob, i.size, i.dataset_sha256, m.file_meta
             FROM dicom_instances i JOIN dicom_series se ON se.series_uid = i.series_uid
             JOIN blobs b ON b.id = i.blob JOIN dicom_offloaded_file_meta m ON m.blob = i.blob
             WHERE i.sop_uid = ?1 AND i.version = ?2 AND b.offloaded_at IS NOT NULL",
        )?
        .query_row(params![sop_uid, version], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })
        .optional()?;
    Ok(row.and_then(|(study_uid, blob, size, dataset_sha256, file_meta)| {
        Some(EvictedInstance {
            study_uid,
            blob: BlobId::parse(&blob)?,
            size: size as u64,
            dataset_sha256,
            file_meta,
        })
    }))
}

/// Studies of a patient (DICOM Patient ID) with something evicted, dated `since` (YYYYMMDD) or
/// later, or undated.
pub fn evicted_studies_of_patient(
    conn: &Connection,
    patient_id: &str,
    since: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT st.study_uid FROM dicom_studies st
             JOIN dicom_patients p ON p.pk = st.patient_pk
             JOIN dicom_series se ON se.study_uid = st.study_uid
             JOIN dicom_instances i ON i.series_uid = se.series_uid
             JOIN blobs b ON b.id = i.blob
             WHERE p.patient_id = ?1 AND b.offloaded_at IS NOT NULL
               AND (st.study_date >= ?2 OR st.study_date = '')
             ORDER BY st.study_uid",
        )?
        .query_map(params![patient_id, since], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// Which of these blobs are held here.
pub fn held_among(
    conn: &Connection,
    blobs: &[String],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT 1 FROM blobs WHERE id = ?1 AND offloaded_at IS NULL")?;
    let mut out = std::collections::HashSet::new();
    for b in blobs {
        if st.exists([b])? {
            out.insert(b.clone());
        }
    }
    Ok(out)
}
