//! Storage Commitment Push Model, SCP side (PS3.4 Annex J): a modality asks, with an N-ACTION,
//! whether we have taken responsibility for a list of instances, and learns the answer from our
//! N-EVENT-REPORT — the signal that it may delete its local copies.
//!
//! We commit to an instance only when it is *durable*: its index row exists (it is written in the
//! same transaction as the blob row, after the blob file was fsynced — see `index`), the stored
//! SOP class is the one the requester names, and its encrypted blob file is on disk. Everything
//! else is listed in the Failed SOP Sequence with the standard reason. The answer is immediate:
//! an acknowledged C-STORE is already durable, so nothing is ever "pending" here.
//!
//! This module is protocol only: the daemon's `dicom::commitment::check` looks the instances
//! up; `assoc` does the messaging.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2.1.1).
pub const ACTION_REQUEST_COMMITMENT: u16 = 1;
/// Event Type ID when every referenced instance was committed (PS3.4 J.3.3.1).
pub const EVENT_ALL_SUCCEEDED: u16 = 1;
/// Event Type ID when at least one failed.
pub const EVENT_FAILURES_EXIST: u16 = 2;
/// Most references one request may carry (a CT series is a few thousand; this bounds the work).
pub const MAX_REFERENCES: usize = 100_000;

/// Failure Reason values (PS3.4 J.3.2.1.1.2, PS3.7 C).
pub mod reason {
    /// Processing failure: the index row exists but the blob file does not.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such object instance: we never stored it.
    pub const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    /// Class-instance conflict: stored, but under another SOP class.
    pub const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;
}

/// One (SOP Class UID, SOP Instance UID) reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// A decoded N-ACTION "Request Storage Commitment".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub transaction_uid: String,
    pub references: Vec<Reference>,
}

/// The commitment of one reference: committed, or the failure reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reference: Reference,
    pub failure: Option<u16>,
}

/// Why a request is refused as a whole (the N-ACTION-RSP status says it, no event follows).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("action information cannot be decoded: {0}")]
    Undecodable(String),
    #[error("{0}")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element(tag).ok()?.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim_start();
    (!v.is_empty()).then(|| v.to_owned())
}

/// Decodes the N-ACTION data set (received in transfer syntax `ts`).
pub fn parse_request(bytes: &[u8], ts: &str) -> Result<Request, RequestError> {
    let obj = crate::dataset::read_small(bytes, ts).map_err(RequestError::Undecodable)?;
    let transaction_uid = text(&obj, tags::TRANSACTION_UID)
        .ok_or(RequestError::Missing("Transaction UID missing"))?;
    let seq = obj
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .map_err(|_| RequestError::Missing("Referenced SOP Sequence missing"))?;
    let items = seq
        .items()
        .ok_or_else(|| RequestError::Invalid("Referenced SOP Sequence is not a sequence".into()))?;
    if items.is_empty() {
        return Err(RequestError::Invalid("Referenced SOP Sequence is empty".into()));
    }
    if items.len() > MAX_REFERENCES {
        return Err(RequestError::Invalid(format!(
            "{} references; at most {MAX_REFERENCES} per request",
            items.len()
        )));
    }
    let references = items
        .iter()
        .map(|item| {
            Ok(Reference {
                sop_class_uid: text(item, tags::REFERENCED_SOP_CLASS_UID)
                    .ok_or(RequestError::Missing("Referenced SOP Class UID missing in an item"))?,
                sop_instance_uid: text(item, tags::REFERENCED_SOP_INSTANCE_UID).ok_or(
                    RequestError::Missing("Referenced SOP Instance UID missing in an item"),
                )?,
            })
        })
        .collect::<Result<_, RequestError>>()?;
    Ok(Request { transaction_uid, references })
}

/// The Event Type ID and data set of the N-EVENT-REPORT for `outcomes`, encoded in `ts`.
/// `retrieve_ae` is where the committed instances can be retrieved from (us).
pub fn event_report(
    transaction_uid: &str,
    outcomes: &[Outcome],
    ts: &str,
    retrieve_ae: &str,
) -> Result<(u16, Vec<u8>), String> {
    let uid = |tag: Tag, v: &str| DataElement::new(tag, VR::UI, PrimitiveValue::from(v));
    let item = |o: &Outcome| {
        let mut it = InMemDicomObject::new_empty();
        it.put(uid(tags::REFERENCED_SOP_CLASS_UID, &o.reference.sop_class_uid));
        it.put(uid(tags::REFERENCED_SOP_INSTANCE_UID, &o.reference.sop_instance_uid));
        if let Some(r) = o.failure {
            it.put(DataElement::new(tags::FAILURE_REASON, VR::US, PrimitiveValue::from(r)));
        }
        it
    };
    let (ok, failed): (Vec<&Outcome>, Vec<&Outcome>) =
        outcomes.iter().partition(|o| o.failure.is_none());
    let mut obj = InMemDicomObject::new_empty();
    obj.put(uid(tags::TRANSACTION_UID, transaction_uid));
    if !ok.is_empty() {
        obj.put(DataElement::new(
            tags::RETRIEVE_AE_TITLE,
            VR::AE,
            PrimitiveValue::from(retrieve_ae),
        ));
        obj.put(DataElement::new(
            tags::REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(ok.iter().map(|o| item(o)).collect::<Vec<_>>()),
        ));
    }
    if !failed.is_empty() {
        obj.put(DataElement::new(
            tags::FAILED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(failed.iter().map(|o| item(o)).collect::<Vec<_>>()),
        ));
    }
    let event = if failed.is_empty() { EVENT_ALL_SUCCEEDED } else { EVENT_FAILURES_EXIST };
    let ts = TransferSyntaxRegistry.get(ts).ok_or("transfer syntax unknown")?;
    let mut out = Vec::with_capacity(256 + outcomes.len() * 128);
    obj.write_dataset_with_ts(&mut out, ts).map_err(|e| e.to_string())?;
    Ok((event, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::uids::{EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};

    fn outcome(i: &str, failure: Option<u16>) -> Outcome {
        Outcome {
            reference: Reference {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: i.into(),
            },
            failure,
        }
    }

    /// A request built the way a modality builds it (here: our own encoder of the same shape)
    /// decodes back to the same transaction and references, in both transfer syntaxes.
    #[test]
    fn request_round_trip() {
        for ts in [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN] {
            let outcomes = [outcome("1.2.3.1", None), outcome("1.2.3.2", None)];
            let (event, bytes) = event_report("2.25.77", &outcomes, ts, "HMS-EDGE").unwrap();
            assert_eq!(event, EVENT_ALL_SUCCEEDED);
            let rq = parse_request(&bytes, ts).unwrap();
            assert_eq!(rq.transaction_uid, "2.25.77");
            let refs: Vec<_> = rq.references.iter().map(|r| r.sop_instance_uid.as_str()).collect();
            assert_eq!(refs, ["1.2.3.1", "1.2.3.2"]);
        }
    }

    #[test]
    fn failures_are_listed_apart_with_their_reason() {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN;
        let outcomes = [
            outcome("1.1", None),
            outcome("1.2", Some(reason::NO_SUCH_OBJECT_INSTANCE)),
            outcome("1.3", Some(reason::CLASS_INSTANCE_CONFLICT)),
        ];
        let (event, bytes) = event_report("2.25.1", &outcomes, ts, "HMS-EDGE").unwrap();
        assert_eq!(event, EVENT_FAILURES_EXIST);
        let obj = InMemDicomObject::read_dataset_with_ts(
            &bytes[..],
            TransferSyntaxRegistry.get(ts).unwrap(),
        )
        .unwrap();
        let ok = obj.element(tags::REFERENCED_SOP_SEQUENCE).unwrap().items().unwrap();
        assert_eq!(ok.len(), 1);
        let failed = obj.element(tags::FAILED_SOP_SEQUENCE).unwrap().items().unwrap();
        let reasons: Vec<u16> = failed
            .iter()
            .map(|i| i.element(tags::FAILURE_REASON).unwrap().to_int::<u16>().unwrap())
            .collect();
        assert_eq!(reasons, [0x0112, 0x0119]);
        // All failed: no Referenced SOP Sequence and no Retrieve AE Title at all.
        let (event, bytes) = event_report("2.25.1", &outcomes[1..], ts, "HMS-EDGE").unwrap();
        assert_eq!(event, EVENT_FAILURES_EXIST);
        let obj = InMemDicomObject::read_dataset_with_ts(
            &bytes[..],
            TransferSyntaxRegistry.get(ts).unwrap(),
        )
        .unwrap();
        assert!(obj.element(tags::REFERENCED_SOP_SEQUENCE).is_err());
        assert!(obj.element(tags::RETRIEVE_AE_TITLE).is_err());
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN;
        // An element header that runs past the end.
        let garbage = [0x08, 0x00, 0x95, 0x11, b'U', b'I', 0x40, 0x00, b'1'];
        assert!(matches!(parse_request(&garbage, ts), Err(RequestError::Undecodable(_))));
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(tags::TRANSACTION_UID, VR::UI, PrimitiveValue::from("2.25.9")));
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, TransferSyntaxRegistry.get(ts).unwrap()).unwrap();
        assert_eq!(
            parse_request(&bytes, ts),
            Err(RequestError::Missing("Referenced SOP Sequence missing"))
        );
        let empty = InMemDicomObject::new_empty();
        let mut bytes = Vec::new();
        empty.write_dataset_with_ts(&mut bytes, TransferSyntaxRegistry.get(ts).unwrap()).unwrap();
        assert_eq!(
            parse_request(&bytes, ts),
            Err(RequestError::Missing("Transaction UID missing"))
        );
    }
}
