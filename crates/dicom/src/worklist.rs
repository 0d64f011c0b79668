//! Modality Worklist SCP (PS3.4 K.6, Modality Worklist Information Model – FIND,
//! `1.2.840.10008.5.1.4.31`): worklist items are computed from the FHIR cache, so a modality gets
//! its worklist with the WAN down.
//!
//! *Pure:* [`parse_identifier`] (C-FIND identifier → top-level keys and Scheduled Procedure Step
//! keys), [`map_order`] (ServiceRequest + Patient + Appointment → [`Item`]), [`Item::matches`]
//! (the C-FIND matching of [`query::matches_key`]) and [`response_identifier`].
//! *Store:* the daemon's `dicom::worklist::run` reads the candidate orders through `fhir::storage`.
//!
//! One worklist item (one Scheduled Procedure Step) per ServiceRequest whose `status` is
//! `active` and whose `intent` is an order (`order`, `original-order`, `reflex-order`,
//! `filler-order`, `instance-order`; proposals and plans are not scheduled work). `on-hold`,
//! `draft`, `completed`, `revoked` orders are not on the worklist.
//!
//! | DICOM attribute | from |
//! |---|---|
//! | Accession Number (0008,0050) | `ServiceRequest.identifier` whose `type` has code `ACSN` (v2-0203), else the one with system [`ACCESSION_SYSTEM`] |
//! | Referring Physician's Name (0008,0090) | `ServiceRequest.requester.display` |
//! | Patient's Name (0010,0010) | `Patient.name` (`use` official first, else the first): `family^given^middle…` |
//! | Patient ID (0010,0020) | `Patient.identifier` with system `site.patient_id_system` (empty when absent) |
//! | Patient's Birth Date (0010,0030), Sex (0010,0040) | `Patient.birthDate`, `Patient.gender` (male M, female F, other O) |
//! | Study Instance UID (0020,000D) | `ServiceRequest.identifier` with system `urn:dicom:uid` (`urn:oid:` value), else `2.25.<first 128 bits of SHA-256("hms-edge:ServiceRequest/<id>")>` |
//! | Requested Procedure Description (0032,1060) | `ServiceRequest.code.text`, else the first coding's `display` |
//! | Requested Procedure ID (0040,1001) | identifier with system [`REQUESTED_PROCEDURE_ID_SYSTEM`], else the Accession Number |
//! | Scheduled Procedure Step Sequence (0040,0100), one item: | |
//! | · Modality (0008,0060) | the first coding with system `http://dicom.nema.org/resources/ontology/DCM` in `ServiceRequest.category`, `orderDetail`, or `code` |
//! | · Scheduled Station AE Title (0040,0001) | extension [`STATION_AE_EXTENSION`] (`valueString`) |
//! | · SPS Start Date (0040,0002), Time (0040,0003) | `occurrenceDateTime`, else `occurrencePeriod.start`, else the `start` of an Appointment whose `basedOn` is the order; the wall-clock date and time as written (the offset is dropped: DICOM times are local) |
//! | · Scheduled Performing Physician's Name (0040,0006) | `ServiceRequest.performer[0].display` |
//! | · SPS Description (0040,0007) | `orderDetail[0].text`, else the Requested Procedure Description |
//! | · SPS ID (0040,0009) | identifier with system [`SPS_ID_SYSTEM`], else the Requested Procedure ID |
//! | · SPS Status (0040,0020) | `SCHEDULED` |
//!
//! Matching (PS3.4 C.2.2.2): every key of the request, top level and inside the first item of the
//! Scheduled Procedure Step Sequence, with [`query::matches_key`]: single value, universal (empty),
//! wildcards (names case-insensitive), date and time ranges (SPS Start Date and Time are matched
//! each on its own, not as a combined date-time range). Keys we do not map match anything and come
//! back empty. An empty Scheduled Procedure Step Sequence key returns every SPS attribute above.

use std::collections::HashMap;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde_json::Value;

use crate::query::{self, Key, QueryError};

/// DICOM Controlled Terminology: codings with this system in `category`/`orderDetail`/`code`
/// give the Modality.
pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// Extension (on ServiceRequest, `valueString`) naming the Scheduled Station AE Title.
pub const STATION_AE_EXTENSION: &str = "urn:hms-edge:scheduled-station-ae";
/// Identifier system of accession numbers when the identifier has no `ACSN` type.
pub const ACCESSION_SYSTEM: &str = "urn:hms-edge:accession";
/// Identifier system of an explicit Requested Procedure ID.
pub const REQUESTED_PROCEDURE_ID_SYSTEM: &str = "urn:hms-edge:requested-procedure-id";
/// Identifier system of an explicit Scheduled Procedure Step ID.
pub const SPS_ID_SYSTEM: &str = "urn:hms-edge:sps-id";
/// `intent` values that make an order worklist material.
pub const ORDER_INTENTS: &[&str] =
    &["order", "original-order", "reflex-order", "filler-order", "instance-order"];

/// Attribute tags as `(group << 16) | element`.
pub mod tags {
    pub const SPECIFIC_CHARACTER_SET: u32 = 0x0008_0005;
    pub const ACCESSION_NUMBER: u32 = 0x0008_0050;
    pub const MODALITY: u32 = 0x0008_0060;
    pub const REFERRING_PHYSICIAN_NAME: u32 = 0x0008_0090;
    pub const PATIENT_NAME: u32 = 0x0010_0010;
    pub const PATIENT_ID: u32 = 0x0010_0020;
    pub const PATIENT_BIRTH_DATE: u32 = 0x0010_0030;
    pub const PATIENT_SEX: u32 = 0x0010_0040;
    pub const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
    pub const REQUESTED_PROCEDURE_DESCRIPTION: u32 = 0x0032_1060;
    pub const SCHEDULED_STATION_AE_TITLE: u32 = 0x0040_0001;
    pub const SPS_START_DATE: u32 = 0x0040_0002;
    pub const SPS_START_TIME: u32 = 0x0040_0003;
    pub const SCHEDULED_PERFORMING_PHYSICIAN: u32 = 0x0040_0006;
    pub const SPS_DESCRIPTION: u32 = 0x0040_0007;
    pub const SPS_ID: u32 = 0x0040_0009;
    pub const SPS_STATUS: u32 = 0x0040_0020;
    pub const SPS_SEQUENCE: u32 = 0x0040_0100;
    pub const REQUESTED_PROCEDURE_ID: u32 = 0x0040_1001;
}

/// The SPS attributes we fill, with their VRs (what an empty SPS Sequence key returns).
const SPS_ATTRIBUTES: &[(u32, VR)] = &[
    (tags::MODALITY, VR::CS),
    (tags::SCHEDULED_STATION_AE_TITLE, VR::AE),
    (tags::SPS_START_DATE, VR::DA),
    (tags::SPS_START_TIME, VR::TM),
    (tags::SCHEDULED_PERFORMING_PHYSICIAN, VR::PN),
    (tags::SPS_DESCRIPTION, VR::LO),
    (tags::SPS_ID, VR::SH),
    (tags::SPS_STATUS, VR::CS),
];

/// A parsed worklist query.
#[derive(Debug, Clone, Default)]
pub struct WorklistQuery {
    /// Top-level keys (the SPS Sequence itself included, as an SQ key with no value).
    pub keys: Vec<Key>,
    /// Keys of the first item of the Scheduled Procedure Step Sequence.
    pub sps_keys: Vec<Key>,
}

impl WorklistQuery {
    /// One line for the audit trail: the keys that constrain matching.
    pub fn describe(&self) -> String {
        let mut out = String::from("MWL");
        for k in self.keys.iter().chain(&self.sps_keys) {
            if !k.value.is_empty() && k.value != "*" {
                out.push_str(&format!(" ({:04X},{:04X})={}", k.tag >> 16, k.tag & 0xFFFF, k.value));
            }
        }
        out
    }
}

fn tag_u32(t: Tag) -> u32 {
    (u32::from(t.group()) << 16) | u32::from(t.element())
}

fn keys_of(obj: &InMemDicomObject) -> Vec<Key> {
    let mut keys = Vec::new();
    for elem in obj.iter() {
        let tag = tag_u32(elem.tag());
        if tag == tags::SPECIFIC_CHARACTER_SET || elem.tag().group() == 0x0002 {
            continue;
        }
        let value = if elem.vr() == VR::SQ {
            String::new()
        } else {
            elem.to_str()
                .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_owned())
                .unwrap_or_default()
        };
        keys.push(Key { tag, vr: elem.vr(), value });
    }
    keys
}

/// Decodes a worklist identifier received in transfer syntax `ts`.
pub fn parse_identifier(bytes: &[u8], ts: &str) -> Result<WorklistQuery, QueryError> {
    let obj = crate::dataset::read_small(bytes, ts).map_err(QueryError::Undecodable)?;
    let keys = keys_of(&obj);
    let sps_keys = obj
        .get(Tag(0x0040, 0x0100))
        .and_then(|e| e.items())
        .and_then(|items| items.first())
        .map(keys_of)
        .unwrap_or_default();
    Ok(WorklistQuery { keys, sps_keys })
}

/// One worklist item: top-level values and the values of its single SPS item, by tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Item {
    pub top: HashMap<u32, String>,
    pub sps: HashMap<u32, String>,
}

impl Item {
    /// Whether every key of the query matches.
    pub fn matches(&self, q: &WorklistQuery) -> bool {
        q.keys
            .iter()
            .filter(|k| k.vr != VR::SQ)
            .all(|k| query::matches_key(k, self.top.get(&k.tag).map(String::as_str)))
            && q.sps_keys
                .iter()
                .filter(|k| k.vr != VR::SQ)
                .all(|k| query::matches_key(k, self.sps.get(&k.tag).map(String::as_str)))
    }
}

pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

fn array<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// The value of the first identifier of `sr` with this system.
fn identifier_with_system<'a>(sr: &'a Value, system: &str) -> Option<&'a str> {
    array(sr, "identifier")
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system))
        .and_then(|i| str_at(i, &["value"]))
}

/// Accession number of an order: identifier typed `ACSN`, else with system [`ACCESSION_SYSTEM`].
pub fn accession_number(sr: &Value) -> Option<&str> {
    array(sr, "identifier")
        .find(|i| {
            i.get("type").is_some_and(|t| {
                array(t, "coding").any(|c| c.get("code").and_then(Value::as_str) == Some("ACSN"))
            })
        })
        .and_then(|i| str_at(i, &["value"]))
        .or_else(|| identifier_with_system(sr, ACCESSION_SYSTEM))
}

/// Requested Procedure ID of an order (explicit identifier, else the accession number).
pub fn requested_procedure_id(sr: &Value) -> Option<&str> {
    identifier_with_system(sr, REQUESTED_PROCEDURE_ID_SYSTEM).or_else(|| accession_number(sr))
}

/// The Study Instance UID a modality should use for this order.
pub fn study_instance_uid(sr: &Value) -> String {
    if let Some(v) = identifier_with_system(sr, "urn:dicom:uid") {
        return v.strip_prefix("urn:oid:").unwrap_or(v).to_owned();
    }
    use sha2::Digest;
    let id = sr.get("id").and_then(Value::as_str).unwrap_or("");
    let h = sha2::Sha256::digest(format!("hms-edge:ServiceRequest/{id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// Whether an order belongs on the worklist (status and intent).
pub fn is_scheduled(sr: &Value) -> bool {
    sr.get("status").and_then(Value::as_str) == Some("active")
        && sr.get("intent").and_then(Value::as_str).is_some_and(|i| ORDER_INTENTS.contains(&i))
}

/// `2026-11-30T09:30:00+01:00` → (`20261130`, `093000`); a date alone gives an empty time.
pub fn dicom_date_time(fhir: &str) -> (String, String) {
    let (date, time) = fhir.split_once('T').unwrap_or((fhir, ""));
    let date: String = date.chars().filter(char::is_ascii_digit).collect();
    let time = time.split(['+', '-', 'Z']).next().unwrap_or("");
    let time = time.split('.').next().unwrap_or("");
    let time: String = time.chars().filter(char::is_ascii_digit).collect();
    (date, time)
}

/// A FHIR HumanName as a DICOM PN: `family^given^middle^prefix^suffix`.
pub fn person_name(name: &Value) -> String {
    if name.get("family").is_none() && name.get("given").is_none() {
        return str_at(name, &["text"]).unwrap_or("").to_owned();
    }
    let family = str_at(name, &["family"]).unwrap_or("");
    let given: Vec<&str> = array(name, "given").filter_map(Value::as_str).collect();
    let first = given.first().copied().unwrap_or("");
    let middle = given.get(1..).map(|m| m.join(" ")).unwrap_or_default();
    let prefix: Vec<&str> = array(name, "prefix").filter_map(Value::as_str).collect();
    let suffix: Vec<&str> = array(name, "suffix").filter_map(Value::as_str).collect();
    let parts = [family.to_owned(), first.to_owned(), middle, prefix.join(" "), suffix.join(" ")];
    let mut pn = parts.join("^");
    while pn.ends_with('^') {
        pn.pop();
    }
    pn.replace('\\', " ")
}

fn dcm_code(sr: &Value) -> Option<&str> {
    let concepts = array(sr, "category").chain(array(sr, "orderDetail")).chain(sr.get("code"));
    for c in concepts {
        if let Some(code) = array(c, "coding")
            .find(|x| x.get("system").and_then(Value::as_str) == Some(DCM))
            .and_then(|x| str_at(x, &["code"]))
        {
            return Some(code);
        }
    }
    None
}

/// Maps an order (with its Patient and an Appointment, when present) to its worklist item.
pub fn map_order(
    sr: &Value,
    patient: Option<&Value>,
    appointment: Option<&Value>,
    patient_id_system: &str,
) -> Item {
    let mut top = HashMap::new();
    let mut sps = HashMap::new();
    let set = |m: &mut HashMap<u32, String>, tag: u32, v: Option<&str>| {
        m.insert(tag, v.unwrap_or("").replace('\\', " "));
    };
    let accession = accession_number(sr);
    let rp_id = requested_procedure_id(sr);
    let description = str_at(sr, &["code", "text"]).or_else(|| {
        sr.get("code").and_then(|c| array(c, "coding").find_map(|x| str_at(x, &["display"])))
    });
    set(&mut top, tags::ACCESSION_NUMBER, accession);
    set(&mut top, tags::REFERRING_PHYSICIAN_NAME, str_at(sr, &["requester", "display"]));
    set(&mut top, tags::STUDY_INSTANCE_UID, Some(&study_instance_uid(sr)));
    set(&mut top, tags::REQUESTED_PROCEDURE_DESCRIPTION, description);
    set(&mut top, tags::REQUESTED_PROCEDURE_ID, rp_id);
    if let Some(p) = patient {
        let names: Vec<&Value> = array(p, "name").collect();
        let name = names
            .iter()
            .find(|n| n.get("use").and_then(Value::as_str) == Some("official"))
            .or(names.first());
        set(&mut top, tags::PATIENT_NAME, name.map(|n| person_name(n)).as_deref());
        set(&mut top, tags::PATIENT_ID, identifier_with_system(p, patient_id_system));
        let birth = str_at(p, &["birthDate"]).map(|d| dicom_date_time(d).0);
        set(&mut top, tags::PATIENT_BIRTH_DATE, birth.as_deref());
        let sex = match p.get("gender").and_then(Value::as_str) {
            Some("male") => "M",
            Some("female") => "F",
            Some("other") => "O",
            _ => "",
        };
        set(&mut top, tags::PATIENT_SEX, Some(sex));
    }
    let start = str_at(sr, &["occurrenceDateTime"])
        .or_else(|| str_at(sr, &["occurrencePeriod", "start"]))
        .or_else(|| appointment.and_then(|a| str_at(a, &["start"])));
    let (date, time) = start.map(dicom_date_time).unwrap_or_default();
    let station = array(sr, "extension")
        .find(|e| e.get("url").and_then(Value::as_str) == Some(STATION_AE_EXTENSION))
        .and_then(|e| str_at(e, &["valueString"]));
    set(&mut sps, tags::MODALITY, dcm_code(sr));
    set(&mut sps, tags::SCHEDULED_STATION_AE_TITLE, station);
    set(&mut sps, tags::SPS_START_DATE, Some(&date));
    set(&mut sps, tags::SPS_START_TIME, Some(&time));
    set(
        &mut sps,
        tags::SCHEDULED_PERFORMING_PHYSICIAN,
        array(sr, "performer").next().and_then(|p| str_at(p, &["display"])),
    );
    let detail = array(sr, "orderDetail").find_map(|d| str_at(d, &["text"]));
    set(&mut sps, tags::SPS_DESCRIPTION, detail.or(description));
    set(&mut sps, tags::SPS_ID, identifier_with_system(sr, SPS_ID_SYSTEM).or(rp_id));
    set(&mut sps, tags::SPS_STATUS, Some("SCHEDULED"));
    Item { top, sps }
}

fn put(obj: &mut InMemDicomObject, tag: u32, vr: VR, value: &str) {
    let t = Tag((tag >> 16) as u16, tag as u16);
    let v = if value.is_empty() {
        PrimitiveValue::Empty
    } else {
        PrimitiveValue::from(value.to_owned())
    };
    obj.put(DataElement::new(t, vr, v));
}

/// The identifier of one C-FIND response: every requested key with the item's value (empty when
/// unmapped); the SPS Sequence with one item holding the requested SPS keys (all of them when
/// the request's sequence was empty).
pub fn response_identifier(q: &WorklistQuery, item: &Item, ts: &str) -> Result<Vec<u8>, String> {
    let mut obj = InMemDicomObject::new_empty();
    let mut non_ascii = false;
    for k in &q.keys {
        if k.vr == VR::SQ {
            let items = if k.tag == tags::SPS_SEQUENCE {
                let mut sps = InMemDicomObject::new_empty();
                if q.sps_keys.is_empty() {
                    for (tag, vr) in SPS_ATTRIBUTES {
                        let v = item.sps.get(tag).map(String::as_str).unwrap_or("");
                        non_ascii |= !v.is_ascii();
                        put(&mut sps, *tag, *vr, v);
                    }
                } else {
                    for sk in &q.sps_keys {
                        if sk.vr == VR::SQ {
                            sps.put(DataElement::new(
                                Tag((sk.tag >> 16) as u16, sk.tag as u16),
                                VR::SQ,
                                DataSetSequence::<InMemDicomObject>::empty(),
                            ));
                            continue;
                        }
                        let v = item.sps.get(&sk.tag).map(String::as_str).unwrap_or("");
                        non_ascii |= !v.is_ascii();
                        put(&mut sps, sk.tag, sk.vr, v);
                    }
                }
                vec![sps]
            } else {
                Vec::new()
            };
            obj.put(DataElement::new(
                Tag((k.tag >> 16) as u16, k.tag as u16),
                VR::SQ,
                DataSetSequence::from(items),
            ));
            continue;
        }
        let v = item.top.get(&k.tag).map(String::as_str).unwrap_or("");
        non_ascii |= !v.is_ascii();
        put(&mut obj, k.tag, k.vr, v);
    }
    if non_ascii {
        put(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    }
    let ts = TransferSyntaxRegistry.get(ts).ok_or("transfer syntax unknown")?;
    let cs =
        if non_ascii { SpecificCharacterSet::ISO_IR_192 } else { SpecificCharacterSet::default() };
    let mut out = Vec::with_capacity(512);
    obj.write_dataset_with_ts_cs(&mut out, ts, cs).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order() -> Value {
        json!({
            "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
            "identifier": [
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": "ACC123"},
                {"system": REQUESTED_PROCEDURE_ID_SYSTEM, "value": "RP7"}
            ],
            "category": [{"coding": [{"system": DCM, "code": "CT"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "30746-2", "display": "CT chest"}], "text": "CT Chest w/o contrast"},
            "occurrenceDateTime": "2026-11-30T09:30:00+01:00",
            "performer": [{"display": "Roe^Jane"}],
            "requester": {"display": "House^Gregory"},
            "extension": [{"url": STATION_AE_EXTENSION, "valueString": "CT1"}],
            "subject": {"reference": "Patient/p1"}
        })
    }

    fn patient() -> Value {
        json!({"resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "urn:other", "value": "X"}, {"system": "urn:site", "value": "MRN42"}],
            "name": [{"use": "usual", "given": ["Jo"]}, {"use": "official", "family": "Doe", "given": ["John", "Q"]}],
            "birthDate": "1970-01-02", "gender": "male"})
    }

    fn key(tag: u32, vr: VR, value: &str) -> Key {
        Key { tag, vr, value: value.into() }
    }

    #[test]
    fn maps_an_order_with_its_patient() {
        let it = map_order(&order(), Some(&patient()), None, "urn:site");
        assert_eq!(it.top[&tags::ACCESSION_NUMBER], "ACC123");
        assert_eq!(it.top[&tags::REQUESTED_PROCEDURE_ID], "RP7");
        assert_eq!(it.top[&tags::REQUESTED_PROCEDURE_DESCRIPTION], "CT Chest w/o contrast");
        assert_eq!(it.top[&tags::PATIENT_NAME], "Doe^John^Q");
        assert_eq!(it.top[&tags::PATIENT_ID], "MRN42");
        assert_eq!(it.top[&tags::PATIENT_BIRTH_DATE], "19700102");
        assert_eq!(it.top[&tags::PATIENT_SEX], "M");
        assert_eq!(it.top[&tags::REFERRING_PHYSICIAN_NAME], "House^Gregory");
        assert!(it.top[&tags::STUDY_INSTANCE_UID].starts_with("2.25."));
        assert!(it.top[&tags::STUDY_INSTANCE_UID].len() <= 64);
        assert_eq!(it.sps[&tags::MODALITY], "CT");
        assert_eq!(it.sps[&tags::SCHEDULED_STATION_AE_TITLE], "CT1");
        assert_eq!(it.sps[&tags::SPS_START_DATE], "20261130");
        assert_eq!(it.sps[&tags::SPS_START_TIME], "093000");
        assert_eq!(it.sps[&tags::SCHEDULED_PERFORMING_PHYSICIAN], "Roe^Jane");
        assert_eq!(it.sps[&tags::SPS_ID], "RP7");
        assert_eq!(it.sps[&tags::SPS_DESCRIPTION], "CT Chest w/o contrast");
    }

    #[test]
    fn appointment_start_and_fallbacks() {
        let mut sr = order();
        sr.as_object_mut().unwrap().remove("occurrenceDateTime");
        sr["identifier"] = json!([{"system": ACCESSION_SYSTEM, "value": "A9"}]);
        let appt = json!({"resourceType": "Appointment", "start": "2026-12-01T14:05:00Z"});
        let it = map_order(&sr, None, Some(&appt), "urn:site");
        assert_eq!(it.top[&tags::ACCESSION_NUMBER], "A9");
        assert_eq!(it.top[&tags::REQUESTED_PROCEDURE_ID], "A9");
        assert_eq!(it.sps[&tags::SPS_START_DATE], "20261201");
        assert_eq!(it.sps[&tags::SPS_START_TIME], "140500");
        assert!(!it.top.contains_key(&tags::PATIENT_ID));
        assert_eq!(dicom_date_time("2026-11-30"), ("20261130".into(), String::new()));
        assert_eq!(dicom_date_time("2026-11-30T08:00:00.123-05:00").1, "080000");
    }

    #[test]
    fn matching_on_sps_and_top_keys() {
        let it = map_order(&order(), Some(&patient()), None, "urn:site");
        let q = |top: Vec<Key>, sps: Vec<Key>| WorklistQuery { keys: top, sps_keys: sps };
        assert!(it.matches(&q(vec![], vec![])));
        assert!(it.matches(&q(
            vec![key(tags::PATIENT_NAME, VR::PN, "doe*"), key(tags::ACCESSION_NUMBER, VR::SH, "")],
            vec![
                key(tags::MODALITY, VR::CS, "CT"),
                key(tags::SPS_START_DATE, VR::DA, "20261130-20261201"),
                key(tags::SCHEDULED_STATION_AE_TITLE, VR::AE, "CT1"),
            ]
        )));
        assert!(!it.matches(&q(vec![], vec![key(tags::MODALITY, VR::CS, "MR")])));
        assert!(!it.matches(&q(vec![], vec![key(tags::SPS_START_DATE, VR::DA, "-20261129")])));
        assert!(it.matches(&q(vec![], vec![key(tags::SPS_START_DATE, VR::DA, "-20261130")])));
        assert!(
            !it.matches(&q(vec![], vec![key(tags::SCHEDULED_STATION_AE_TITLE, VR::AE, "MR1")]))
        );
        assert!(!it.matches(&q(vec![key(tags::PATIENT_ID, VR::LO, "OTHER")], vec![])));
        assert!(!it.matches(&q(vec![key(tags::ACCESSION_NUMBER, VR::SH, "ACC999")], vec![])));
    }

    #[test]
    fn only_active_orders_are_scheduled() {
        let mut sr = order();
        assert!(is_scheduled(&sr));
        sr["status"] = json!("on-hold");
        assert!(!is_scheduled(&sr));
        sr["status"] = json!("active");
        sr["intent"] = json!("proposal");
        assert!(!is_scheduled(&sr));
    }

    #[test]
    fn response_roundtrip() {
        let it = map_order(&order(), Some(&patient()), None, "urn:site");
        let q = WorklistQuery {
            keys: vec![
                key(tags::ACCESSION_NUMBER, VR::SH, ""),
                key(tags::PATIENT_NAME, VR::PN, ""),
                key(tags::SPS_SEQUENCE, VR::SQ, ""),
            ],
            sps_keys: vec![],
        };
        let ts = "1.2.840.10008.1.2.1";
        let bytes = response_identifier(&q, &it, ts).unwrap();
        let back = parse_identifier(&bytes, ts).unwrap();
        let v = |k: &Vec<Key>, t: u32| k.iter().find(|k| k.tag == t).unwrap().value.clone();
        assert_eq!(v(&back.keys, tags::ACCESSION_NUMBER), "ACC123");
        assert_eq!(v(&back.keys, tags::PATIENT_NAME), "Doe^John^Q");
        assert_eq!(v(&back.sps_keys, tags::MODALITY), "CT");
        assert_eq!(v(&back.sps_keys, tags::SPS_START_TIME), "093000");
    }
}
