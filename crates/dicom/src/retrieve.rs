//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3), the protocol: the retrieve identifier (levels
//! PATIENT, STUDY, SERIES, IMAGE and their unique keys), sub-operation counts and statuses. The
//! daemon's `dicom::retrieve` finds the stored instances and streams them.

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dataset::tags;
use crate::dimse::{Command, status, tag};
use crate::query::QueryError;
use crate::uids::RetrieveModel;

/// (0008,0058) Failed SOP Instance UID List.
const FAILED_SOP_INSTANCE_UID_LIST: u32 = 0x0008_0058;

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
    let obj = crate::dataset::read_small(bytes, ts).map_err(QueryError::Undecodable)?;
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
