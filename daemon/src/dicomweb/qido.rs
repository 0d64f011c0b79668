//! QIDO-RS query parameters (PS3.18 8.3.4) to a C-FIND query of [`crate::dicom::query`], and its
//! matches to DICOM JSON. No I/O: matching itself is `dicom::index::find`, the rules of C-FIND.

use dicom_core::Tag;
use dicom_core::VR;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::StandardDataDictionary;
use serde_json::{Map, Value, json};

use super::json::{dictionary_vr, tag_key, text_values};
use crate::dicom::dataset::tags;
use crate::dicom::query::{Key, Level, Query, Record};

/// Retrieve URL (0008,1190).
pub const RETRIEVE_URL: u32 = 0x0008_1190;

/// A parsed QIDO-RS request.
#[derive(Debug, Clone)]
pub struct Qido {
    pub query: Query,
    /// Extra attributes to return (`includefield`); `all` sets `include_all`.
    pub include: Vec<(u32, VR)>,
    pub include_all: bool,
    pub limit: Option<usize>,
    pub offset: usize,
}

/// The attributes every match of a level returns (PS3.18 Table 10.6.3-3 and friends, as far as
/// the index holds them).
fn defaults(level: Level) -> &'static [u32] {
    match level {
        Level::Study => &[
            tags::STUDY_DATE,
            tags::STUDY_TIME,
            tags::ACCESSION_NUMBER,
            tags::INSTANCE_AVAILABILITY,
            tags::MODALITIES_IN_STUDY,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::STUDY_DESCRIPTION,
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::PATIENT_SEX,
            tags::STUDY_INSTANCE_UID,
            tags::STUDY_ID,
            tags::NUMBER_OF_STUDY_RELATED_SERIES,
            tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        ],
        Level::Series => &[
            tags::MODALITY,
            tags::SERIES_DESCRIPTION,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SERIES_NUMBER,
            tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        ],
        Level::Image => &[
            tags::SOP_CLASS_UID,
            tags::SOP_INSTANCE_UID,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::INSTANCE_NUMBER,
            tags::NUMBER_OF_FRAMES,
        ],
    }
}

/// An attribute named by keyword (`PatientName`) or tag (`00100010`).
pub fn attribute(id: &str) -> Option<(u32, VR)> {
    let tag = if id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        u32::from_str_radix(id, 16).ok()?
    } else {
        let e = StandardDataDictionary.by_name(id)?;
        let t: Tag = e.tag();
        (u32::from(t.group()) << 16) | u32::from(t.element())
    };
    Some((tag, dictionary_vr(tag)))
}

/// Parses the query string pairs of a QIDO-RS request at `level`, with the UIDs of the path
/// (`study`, `series`) as extra keys. Errors are the 400 message.
pub fn parse(
    level: Level,
    pairs: &[(String, String)],
    study: Option<&str>,
    series: Option<&str>,
) -> Result<Qido, String> {
    let mut keys: Vec<Key> = Vec::new();
    let mut include = Vec::new();
    let mut include_all = false;
    let mut limit = None;
    let mut offset = 0;
    let number = |k: &str, v: &str| -> Result<usize, String> {
        v.trim().parse::<usize>().map_err(|_| {
            format!("{k}={v:?} is not a valid value: a non-negative integer is expected")
        })
    };
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => limit = Some(number(k, v)?),
            "offset" => offset = number(k, v)?,
            "fuzzymatching" => {
                if !matches!(v.as_str(), "true" | "false") {
                    return Err(format!("fuzzymatching={v:?}: true or false expected"));
                }
            }
            "includefield" => {
                for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if f == "all" {
                        include_all = true;
                    } else {
                        include.push(attribute(f).ok_or_else(|| {
                            format!("includefield {f:?} is not a DICOM keyword or tag")
                        })?);
                    }
                }
            }
            other => {
                if other.contains('.') {
                    return Err(format!(
                        "{other:?}: matching on sequence attributes is not supported"
                    ));
                }
                let (tag, vr) = attribute(other).ok_or_else(|| {
                    format!("{other:?} is neither a query parameter nor a DICOM keyword or tag")
                })?;
                if keys.iter().any(|key| key.tag == tag) {
                    return Err(format!("{other} is given more than once"));
                }
                let value = check_value(other, vr, v)?;
                keys.push(Key { tag, vr, value });
            }
        }
    }
    for (tag, uid) in [(tags::STUDY_INSTANCE_UID, study), (tags::SERIES_INSTANCE_UID, series)] {
        if let Some(uid) = uid {
            keys.retain(|k| k.tag != tag);
            keys.push(Key { tag, vr: VR::UI, value: uid.to_owned() });
        }
    }
    Ok(Qido { query: Query { level, keys }, include, include_all, limit, offset })
}

/// Checks a matching value against its VR and returns it in C-FIND form (UID lists use `\`).
fn check_value(name: &str, vr: VR, v: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = match vr {
        VR::DA => {
            v.chars().all(|c| c.is_ascii_digit() || c == '-')
                && v.split('-').all(|d| d.is_empty() || d.len() == 8)
        }
        VR::TM => v.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | ':')),
        VR::DT => v.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | '+')),
        VR::UI => v.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | '\\')),
        VR::IS | VR::US | VR::UL | VR::SS | VR::SL => {
            v.split(['\\', ',']).all(|n| n.trim().parse::<i64>().is_ok())
        }
        VR::SQ => false,
        _ => true,
    };
    if !ok {
        return Err(format!("{name}={v:?} is not a valid {vr:?} matching value"));
    }
    Ok(if vr == VR::UI { v.replace(',', "\\") } else { v.to_owned() })
}

/// VR of an attribute in our responses (index attributes have fixed VRs).
fn vr_of(tag: u32) -> VR {
    match tag {
        tags::NUMBER_OF_STUDY_RELATED_SERIES
        | tags::NUMBER_OF_STUDY_RELATED_INSTANCES
        | tags::NUMBER_OF_SERIES_RELATED_INSTANCES => VR::IS,
        _ => dictionary_vr(tag),
    }
}

/// One match as a DICOM JSON object: the level's defaults, the query keys and `includefield`
/// attributes (empty when the index does not hold them), and the Retrieve URL.
pub fn record_json(q: &Qido, rec: &Record, retrieve_url: &str) -> Value {
    let mut out = Map::new();
    let mut put = |tag: u32, vr: VR| {
        let key = tag_key(tag);
        if out.contains_key(&key) {
            return;
        }
        let values = rec.get(&tag).map(|v| text_values(vr, v)).unwrap_or_default();
        let mut e = Map::new();
        e.insert("vr".into(), json!(vr.to_string()));
        if !values.is_empty() {
            e.insert("Value".into(), Value::Array(values));
        }
        out.insert(key, Value::Object(e));
    };
    for t in defaults(q.query.level) {
        put(*t, vr_of(*t));
    }
    for k in &q.query.keys {
        put(k.tag, vr_of(k.tag));
    }
    for (t, _) in &q.include {
        put(*t, vr_of(*t));
    }
    if q.include_all {
        for t in rec.keys() {
            put(*t, vr_of(*t));
        }
    }
    out.insert(tag_key(RETRIEVE_URL), json!({"vr": "UR", "Value": [retrieve_url]}));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn keywords_tags_and_paging() {
        let q = parse(
            Level::Series,
            &pairs(&[
                ("PatientName", "DOE*"),
                ("00080060", "CT"),
                ("includefield", "StudyDescription,00100030"),
                ("limit", "5"),
                ("offset", "2"),
            ]),
            Some("1.2.3"),
            None,
        )
        .unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.offset, 2);
        assert_eq!(q.include.len(), 2);
        let k: Vec<_> = q.query.keys.iter().map(|k| (k.tag, k.vr, k.value.as_str())).collect();
        assert!(k.contains(&(tags::PATIENT_NAME, VR::PN, "DOE*")));
        assert!(k.contains(&(tags::MODALITY, VR::CS, "CT")));
        assert!(k.contains(&(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")));
        let q =
            parse(Level::Study, &pairs(&[("StudyInstanceUID", "1.2,1.3")]), None, None).unwrap();
        assert_eq!(q.query.keys[0].value, "1.2\\1.3");
    }

    #[test]
    fn malformed_parameters_are_refused() {
        for p in [
            ("limit", "ten"),
            ("offset", "-1"),
            ("NoSuchKeyword", "x"),
            ("StudyDate", "2024-01-01"),
            ("includefield", "Bogus"),
            ("ReferencedStudySequence.ReferencedSOPInstanceUID", "1.2"),
            ("StudyInstanceUID", "1.2.x"),
        ] {
            assert!(parse(Level::Study, &pairs(&[p]), None, None).is_err(), "{p:?}");
        }
        assert!(
            parse(Level::Study, &pairs(&[("StudyDate", "20240101-20241231")]), None, None).is_ok()
        );
    }
}
