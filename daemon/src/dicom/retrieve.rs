//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3), the parts without an association: the retrieve
//! identifier (levels PATIENT, STUDY, SERIES, IMAGE and their unique keys), which stored instances
//! it names, sub-operation counts and statuses, and the streaming of a stored data set into
//! C-STORE-RQ P-DATA (the bytes exactly as received, never transcoded).
//!
//! The association side is `assoc::retrieve` (C-GET on the requester's association, C-MOVE
//! through [`super::scu`]).

use std::io::{self, Read};

use bytes::Bytes;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use rusqlite::{Connection, params};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use super::dataset::{part10_dataset_offset, tags};
use super::dimse::{Command, field, status, tag};
use super::pdu;
use super::query::QueryError;
use super::uids::RetrieveModel;
use crate::store::{BlobId, BlobStore, StoreError};

/// (0008,0058) Failed SOP Instance UID List.
const FAILED_SOP_INSTANCE_UID_LIST: u32 = 0x0008_0058;
/// Data set chunks read ahead of the socket per sub-operation.
const READ_AHEAD: usize = 8;

/// Retrieve level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// A parsed C-GET/C-MOVE identifier: the level and the unique keys (UID lists) at and above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retrieve {
    pub level: Level,
    pub patient_id: Option<String>,
    pub studies: Vec<String>,
    pub series: Vec<String>,
    pub instances: Vec<String>,
}

impl Retrieve {
    /// One line for the audit trail, e.g. `STUDY (0020,000D)=1.2.3`.
    pub fn describe(&self) -> String {
        let mut out = self.level.as_str().to_owned();
        let mut add = |tag: &str, v: &[String]| {
            if !v.is_empty() {
                out.push_str(&format!(" ({tag})={}", v.join("\\")));
            }
        };
        add("0010,0020", self.patient_id.as_slice());
        add("0020,000D", &self.studies);
        add("0020,000E", &self.series);
        add("0008,0018", &self.instances);
        out
    }
}

/// Decodes a retrieve identifier received in transfer syntax `ts` (PS3.4 C.4.2.1.4, C.4.3.1.3):
/// the level's unique key is required; keys of the levels above may narrow it (relational
/// retrieve is not supported: below STUDY the study is not required, but when given it must
/// match).
pub fn parse_identifier(
    bytes: &[u8],
    ts: &str,
    model: RetrieveModel,
) -> Result<Retrieve, QueryError> {
    let obj = super::dataset::read_small(bytes, ts).map_err(QueryError::Undecodable)?;
    let text = |t: u32| -> Option<String> {
        let e = obj.element(Tag((t >> 16) as u16, t as u16)).ok()?;
        let s = e.to_str().ok()?;
        let s = s.trim_matches(['\0', ' ']).to_owned();
        (!s.is_empty()).then_some(s)
    };
    let list = |t: u32| -> Vec<String> {
        text(t)
            .map(|s| s.split('\\').map(|u| u.trim_matches(['\0', ' ']).to_owned()).collect())
            .unwrap_or_default()
    };
    let level = match text(tags::QUERY_RETRIEVE_LEVEL).as_deref() {
        Some("PATIENT") if model == RetrieveModel::PatientRoot => Level::Patient,
        Some("STUDY") => Level::Study,
        Some("SERIES") => Level::Series,
        Some("IMAGE") => Level::Image,
        Some(other) => {
            return Err(QueryError::Invalid(format!(
                "Query/Retrieve Level {other:?} not supported by this information model"
            )));
        }
        None => return Err(QueryError::Invalid("Query/Retrieve Level missing".into())),
    };
    let r = Retrieve {
        level,
        patient_id: text(tags::PATIENT_ID),
        studies: list(tags::STUDY_INSTANCE_UID),
        series: list(tags::SERIES_INSTANCE_UID),
        instances: list(tags::SOP_INSTANCE_UID),
    };
    let missing = match level {
        Level::Patient => r.patient_id.is_none().then_some("Patient ID"),
        Level::Study => r.studies.is_empty().then_some("Study Instance UID"),
        Level::Series => r.series.is_empty().then_some("Series Instance UID"),
        Level::Image => r.instances.is_empty().then_some("SOP Instance UID"),
    };
    if let Some(key) = missing {
        return Err(QueryError::Invalid(format!("{key} required at level {}", level.as_str())));
    }
    if r.patient_id.as_deref().is_some_and(|p| p.contains(['*', '?', '\\'])) {
        return Err(QueryError::Invalid("Patient ID must be a single value".into()));
    }
    Ok(r)
}

/// One stored instance to send (its newest version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sop_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub blob: BlobId,
    pub study_uid: String,
    pub series_uid: String,
}

/// The instances an identifier names, in study, series, instance number order; at most `limit`
/// (`Err(limit)` beyond).
pub fn resolve(
    conn: &Connection,
    r: &Retrieve,
    limit: usize,
) -> Result<Result<Vec<Target>, usize>, StoreError> {
    let json = |v: &[String]| (!v.is_empty()).then(|| serde_json::Value::from(v).to_string());
    let mut stmt = conn.prepare_cached(
        "SELECT i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.blob, se.study_uid, se.series_uid
         FROM dicom_instances i JOIN dicom_series se ON i.series_uid = se.series_uid
         JOIN dicom_studies st ON se.study_uid = st.study_uid
         JOIN dicom_patients p ON st.patient_pk = p.pk
         WHERE (?1 IS NULL OR p.patient_id = ?1)
           AND (?2 IS NULL OR se.study_uid IN (SELECT value FROM json_each(?2)))
           AND (?3 IS NULL OR se.series_uid IN (SELECT value FROM json_each(?3)))
           AND (?4 IS NULL OR i.sop_uid IN (SELECT value FROM json_each(?4)))
           AND i.version = (SELECT max(version) FROM dicom_instances WHERE sop_uid = i.sop_uid)
         ORDER BY se.study_uid, se.series_uid, i.instance_number, i.sop_uid",
    )?;
    let mut rows =
        stmt.query(params![r.patient_id, json(&r.studies), json(&r.series), json(&r.instances)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let blob: String = row.get(3)?;
        let Some(blob) = BlobId::parse(&blob) else { continue };
        if out.len() == limit {
            return Ok(Err(limit));
        }
        out.push(Target {
            sop_uid: row.get(0)?,
            sop_class_uid: row.get(1)?,
            transfer_syntax: row.get(2)?,
            blob,
            study_uid: row.get(4)?,
            series_uid: row.get(5)?,
        });
    }
    Ok(Ok(out))
}

/// Sub-operation counters of one C-GET/C-MOVE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub remaining: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
    /// SOP Instance UIDs of the failed sub-operations (and of those never started on cancel).
    pub failed_uids: Vec<String>,
}

/// How a C-STORE-RSP status counts (PS3.4 B.2.3): success, warning or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Warning,
    Failed,
}

pub fn classify_store_status(st: u16) -> Outcome {
    match st {
        status::SUCCESS => Outcome::Completed,
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Outcome::Warning,
        _ => Outcome::Failed,
    }
}

impl Counts {
    pub fn new(total: usize) -> Counts {
        Counts { remaining: sat16(total), ..Counts::default() }
    }

    pub fn record(&mut self, sop_uid: &str, o: Outcome) {
        self.remaining = self.remaining.saturating_sub(1);
        match o {
            Outcome::Completed => self.completed = self.completed.saturating_add(1),
            Outcome::Warning => self.warning = self.warning.saturating_add(1),
            Outcome::Failed => {
                self.failed = self.failed.saturating_add(1);
                self.failed_uids.push(sop_uid.to_owned());
            }
        }
    }

    /// The final status once every sub-operation ran: success, B000 when some failed or had a
    /// warning, A702 when there were sub-operations and none succeeded.
    pub fn final_status(&self) -> u16 {
        if self.failed == 0 && self.warning == 0 {
            status::SUCCESS
        } else if self.completed == 0 && self.warning == 0 {
            status::UNABLE_TO_PERFORM_SUBOPERATIONS
        } else {
            status::SUBOPERATIONS_WARNING
        }
    }

    /// Puts the counters on a response: pending and cancel responses carry Remaining, final
    /// ones do not (PS3.7 C.4.2.1.5-8).
    pub fn apply(&self, rsp: &mut Command, with_remaining: bool) {
        if with_remaining {
            rsp.set_u16(tag::NUMBER_OF_REMAINING_SUBOPERATIONS, self.remaining);
        }
        rsp.set_u16(tag::NUMBER_OF_COMPLETED_SUBOPERATIONS, self.completed)
            .set_u16(tag::NUMBER_OF_FAILED_SUBOPERATIONS, self.failed)
            .set_u16(tag::NUMBER_OF_WARNING_SUBOPERATIONS, self.warning);
    }
}

fn sat16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// The identifier of a final response with failures: (0008,0058) Failed SOP Instance UID List.
pub fn failed_list_identifier(uids: &[String], ts: &str) -> Result<Vec<u8>, String> {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        Tag((FAILED_SOP_INSTANCE_UID_LIST >> 16) as u16, FAILED_SOP_INSTANCE_UID_LIST as u16),
        VR::UI,
        PrimitiveValue::Strs(uids.iter().cloned().collect()),
    ));
    let ts = TransferSyntaxRegistry.get(ts).ok_or("transfer syntax unknown")?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The C-STORE-RQ of a sub-operation (with the Move Originator for C-MOVE).
pub fn store_rq(message_id: u16, t: &Target, originator: Option<(&str, u16)>) -> Command {
    let mut c = Command::new();
    c.set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
        .set_u16(tag::MESSAGE_ID, message_id)
        .set_u16(tag::PRIORITY, 0)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
        .set_uid(tag::AFFECTED_SOP_CLASS_UID, &t.sop_class_uid)
        .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, &t.sop_uid);
    if let Some((ae, id)) = originator {
        c.set_ae(tag::MOVE_ORIGINATOR_AE_TITLE, ae).set_u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    c
}

/// Reads a stored data set (after our File Meta) on a blocking thread in chunks of at most
/// `chunk` bytes, a few chunks ahead. The first item is an error when the blob cannot be opened,
/// so nothing has been sent when a sub-operation fails that way. Every chunk is authenticated
/// by the blob reader before it is handed out.
pub fn read_dataset(
    blobs: BlobStore,
    blob: BlobId,
    chunk: usize,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let run = || -> io::Result<()> {
            let mut r = blobs.open_reader(&blob)?;
            let mut head = [0u8; 144];
            r.read_exact(&mut head)?;
            let off = part10_dataset_offset(&head).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "stored file has no File Meta")
            })?;
            io::copy(&mut (&mut r).take((off - 144) as u64), &mut io::sink())?;
            loop {
                let mut buf = vec![0u8; chunk];
                let mut n = 0;
                while n < chunk {
                    match r.read(&mut buf[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return Ok(()); // the receiver gave up (cancel, abort)
                }
                if n < chunk {
                    return Ok(());
                }
            }
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Why a data set could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: the sub-operation fails, the association goes on.
    #[error("stored instance unreadable: {0}")]
    Unreadable(io::Error),
    /// Part of the message went out: the association must be aborted.
    #[error("stored instance unreadable after part of it was sent: {0}")]
    Broken(io::Error),
    #[error("connection lost: {0}")]
    Io(io::Error),
}

/// Sends a C-STORE-RQ and the stored data set on presentation context `pc`, each PDU no larger
/// than `peer_max`, with bounded memory (one chunk in flight plus the read-ahead).
pub async fn send_store<W: AsyncWrite + Unpin>(
    w: &mut W,
    pc: u8,
    rq: &Command,
    blobs: &BlobStore,
    t: &Target,
    peer_max: u32,
) -> Result<(), SendError> {
    let mut rx = read_dataset(blobs.clone(), t.blob.clone(), pdu::max_fragment(peer_max));
    let closed = || io::Error::new(io::ErrorKind::UnexpectedEof, "blob reader stopped");
    let mut held = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(SendError::Unreadable(e)),
        None => return Err(SendError::Unreadable(closed())),
    };
    let mut out = Vec::with_capacity(held.len() + 512);
    pdu::encode_pdata(&mut out, pc, true, &rq.encode(), peer_max);
    loop {
        let next = match rx.recv().await {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(SendError::Broken(e)),
            None => None,
        };
        pdu::encode_fragment(&mut out, pc, false, &held, next.is_none());
        pdu::send(w, &out).await.map_err(SendError::Io)?;
        metrics::counter!("hms_dicom_bytes_sent_total").increment(held.len() as u64);
        out.clear();
        match next {
            Some(b) => held = b,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(pairs: &[(u32, VR, &str)]) -> Vec<u8> {
        let mut obj = InMemDicomObject::new_empty();
        for (t, vr, v) in pairs {
            obj.put(DataElement::new(
                Tag((t >> 16) as u16, *t as u16),
                *vr,
                PrimitiveValue::from(v.to_string()),
            ));
        }
        let ts = TransferSyntaxRegistry.get("1.2.840.10008.1.2").unwrap();
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    const IMPLICIT: &str = "1.2.840.10008.1.2";

    #[test]
    fn identifiers_need_the_unique_key_of_their_level() {
        let q = ident(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4"),
        ]);
        let r = parse_identifier(&q, IMPLICIT, RetrieveModel::StudyRoot).unwrap();
        assert_eq!(r.level, Level::Study);
        assert_eq!(r.studies, ["1.2.3", "1.2.4"]);
        assert_eq!(r.describe(), "STUDY (0020,000D)=1.2.3\\1.2.4");

        let q = ident(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
            (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
        ]);
        let e = parse_identifier(&q, IMPLICIT, RetrieveModel::StudyRoot).unwrap_err();
        assert!(e.to_string().contains("Series Instance UID required"), "{e}");

        let q = ident(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
            (tags::PATIENT_ID, VR::LO, "P1"),
        ]);
        assert!(parse_identifier(&q, IMPLICIT, RetrieveModel::StudyRoot).is_err());
        let r = parse_identifier(&q, IMPLICIT, RetrieveModel::PatientRoot).unwrap();
        assert_eq!(r.patient_id.as_deref(), Some("P1"));

        let q = ident(&[(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")]);
        assert!(parse_identifier(&q, IMPLICIT, RetrieveModel::StudyRoot).is_err());
        assert!(matches!(
            parse_identifier(
                b"\x08\x00\x52\x00\x64\x00\x00\x00ab",
                IMPLICIT,
                RetrieveModel::StudyRoot
            ),
            Err(QueryError::Undecodable(_))
        ));
    }

    #[test]
    fn counts_and_final_status() {
        let mut c = Counts::new(3);
        c.record("1", Outcome::Completed);
        assert_eq!((c.remaining, c.completed), (2, 1));
        assert_eq!(c.final_status(), status::SUCCESS);
        c.record("2", classify_store_status(0xA700));
        c.record("3", classify_store_status(0xB007));
        assert_eq!((c.remaining, c.completed, c.failed, c.warning), (0, 1, 1, 1));
        assert_eq!(c.failed_uids, ["2"]);
        assert_eq!(c.final_status(), status::SUBOPERATIONS_WARNING);
        let mut none = Counts::new(1);
        none.record("9", Outcome::Failed);
        assert_eq!(none.final_status(), status::UNABLE_TO_PERFORM_SUBOPERATIONS);
        let mut rsp = Command::new();
        c.apply(&mut rsp, false);
        assert_eq!(rsp.u16(tag::NUMBER_OF_REMAINING_SUBOPERATIONS), None);
        assert_eq!(rsp.u16(tag::NUMBER_OF_FAILED_SUBOPERATIONS), Some(1));
        let list = failed_list_identifier(&c.failed_uids, IMPLICIT).unwrap();
        assert_eq!(&list[..4], &[0x08, 0x00, 0x58, 0x00]);
    }
}
