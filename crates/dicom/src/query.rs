//! C-FIND SCP, Study Root Query/Retrieve Information Model (PS3.4 C.4.1), levels STUDY, SERIES
//! and IMAGE, with the standard attribute matching of PS3.4 C.2.2.2: single value, universal
//! (empty key), wildcards `*` and `?`, date/time ranges, lists of UIDs; Patient's Name matches
//! case-insensitively.
//!
//! The daemon's DICOM index (`hms_edge::dicom::index::find`) reads candidates with the unique keys
//! (UID lists) and exact Patient ID as SQL filters; every key is then matched here
//! ([`matches_key`]), so SQL never has to express the DICOM matching rules.

use std::collections::HashMap;

use dicom_core::header::Header;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dataset::tags;

/// Query/Retrieve level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Study,
    Series,
    Image,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s.trim() {
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// One key of the identifier: the attribute, its VR and the matching value (decoded text).
#[derive(Debug, Clone)]
pub struct Key {
    pub tag: u32,
    pub vr: VR,
    pub value: String,
}

/// A parsed C-FIND identifier.
#[derive(Debug, Clone)]
pub struct Query {
    pub level: Level,
    pub keys: Vec<Key>,
}

impl Query {
    /// The query as one line for the audit trail: level and the keys that constrain matching,
    /// e.g. `STUDY (0010,0020)=PAT1 (0008,0020)=20260101-`.
    pub fn describe(&self) -> String {
        let mut out = self.level.as_str().to_owned();
        for k in self.keys.iter().filter(|k| !k.value.is_empty() && k.value != "*") {
            out.push_str(&format!(" ({:04X},{:04X})={}", k.tag >> 16, k.tag & 0xFFFF, k.value));
        }
        out
    }
}

/// Why a query was refused (mapped to a C-FIND failure status).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("identifier cannot be decoded: {0}")]
    Undecodable(String),
    #[error("{0}")]
    Invalid(String),
}

/// Decodes an identifier received in transfer syntax `ts`.
pub fn parse_identifier(bytes: &[u8], ts: &str) -> Result<Query, QueryError> {
    let obj = crate::dataset::read_small(bytes, ts).map_err(QueryError::Undecodable)?;
    let mut level = None;
    let mut keys = Vec::new();
    for elem in obj.iter() {
        let tag = (u32::from(elem.tag().group()) << 16) | u32::from(elem.tag().element());
        if tag == tags::QUERY_RETRIEVE_LEVEL {
            let v = elem.to_str().map_err(|e| QueryError::Invalid(e.to_string()))?;
            level = Some(Level::parse(&v).ok_or_else(|| {
                QueryError::Invalid(format!("Query/Retrieve Level {:?} not supported", v.trim()))
            })?);
            continue;
        }
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
    let level = level.ok_or_else(|| QueryError::Invalid("Query/Retrieve Level missing".into()))?;
    Ok(Query { level, keys })
}

/// A candidate record: attribute values by tag (multi-valued ones joined with `\`).
pub type Record = HashMap<u32, String>;

/// Whether a record value satisfies a key. Attributes we do not index (`None`) match anything:
/// they are returned empty.
pub fn matches_key(key: &Key, value: Option<&str>) -> bool {
    let q = key.value.as_str();
    if q.is_empty() || q == "*" {
        return true;
    }
    let Some(value) = value else { return true };
    let values: Vec<&str> = value.split('\\').map(str::trim).collect();
    let alternatives = || q.split('\\').map(str::trim);
    match key.vr {
        VR::UI => alternatives().any(|u| values.contains(&u)),
        VR::DA => alternatives().any(|r| values.iter().any(|v| range_match(r, v, normalize_date))),
        VR::TM => alternatives().any(|r| values.iter().any(|v| range_match(r, v, normalize_time))),
        VR::DT => alternatives().any(|r| values.iter().any(|v| range_match(r, v, normalize_dt))),
        VR::IS | VR::US | VR::UL | VR::SS | VR::SL => alternatives().any(|a| {
            let a: Option<i64> = a.parse().ok();
            values.iter().any(|v| v.parse::<i64>().ok() == a && a.is_some())
        }),
        VR::PN => {
            let q = q.to_lowercase();
            values.iter().any(|v| wildcard_match(&q, &v.to_lowercase()))
        }
        // Other strings: a list is not a valid key for most VRs, but CS keys (Modality,
        // Modalities in Study) are commonly sent as lists; any value may match any alternative.
        _ => alternatives().any(|a| values.iter().any(|v| wildcard_match(a, v))),
    }
}

/// `*` matches any run of characters (also none), `?` exactly one.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Range matching `A-B`, `A-`, `-B`, or a single value, on normalized comparable strings.
fn range_match(query: &str, value: &str, norm: fn(&str, bool) -> String) -> bool {
    if value.is_empty() {
        return false;
    }
    let v = norm(value, false);
    match query.split_once('-') {
        Some((lo, hi)) => {
            (lo.trim().is_empty() || v >= norm(lo, false))
                && (hi.trim().is_empty() || v <= norm(hi, true))
        }
        None => {
            if query.contains(['*', '?']) {
                return wildcard_match(query, value);
            }
            // A single value matches everything it covers (a time "10" covers 10:00-10:59:59).
            v >= norm(query, false) && v <= norm(query, true)
        }
    }
}

fn normalize_date(s: &str, _upper: bool) -> String {
    s.trim().replace('.', "")
}

fn normalize_time(s: &str, upper: bool) -> String {
    let s = s.trim().replace(':', "");
    let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
    let pad_whole = if upper { "235959" } else { "000000" };
    let mut w: String = whole.chars().take(6).collect();
    if w.len() < 6 {
        w.push_str(&pad_whole[w.len()..]);
    }
    let mut f: String = frac.chars().take(6).collect();
    while f.len() < 6 {
        f.push(if upper && frac.is_empty() { '9' } else { '0' });
    }
    format!("{w}.{f}")
}

fn normalize_dt(s: &str, upper: bool) -> String {
    let s = s.trim();
    let (date, time) = s.split_at(s.len().min(8));
    let date = if date.len() < 8 {
        let pad = if upper { "99991231" } else { "00000101" };
        format!("{date}{}", &pad[date.len()..])
    } else {
        date.to_owned()
    };
    let time = time.split(['+', '-']).next().unwrap_or("");
    format!("{date}{}", normalize_time(time, upper))
}

/// Builds the identifier of one C-FIND response: every requested key with the record's value
/// (empty when we do not have it), the level, and the character set when text is not ASCII.
pub fn response_identifier(
    q: &Query,
    rec: &Record,
    ts: &str,
    retrieve_ae: &str,
) -> Result<Vec<u8>, String> {
    let mut obj = InMemDicomObject::new_empty();
    let mut non_ascii = false;
    let put = |obj: &mut InMemDicomObject, tag: u32, vr: VR, value: &str| {
        let t = Tag((tag >> 16) as u16, tag as u16);
        let v = if value.is_empty() {
            PrimitiveValue::Empty
        } else if value.contains('\\') && vr != VR::PN {
            PrimitiveValue::Strs(value.split('\\').map(str::to_owned).collect())
        } else {
            PrimitiveValue::from(value.to_owned())
        };
        obj.put(DataElement::new(t, vr, v));
    };
    put(&mut obj, tags::QUERY_RETRIEVE_LEVEL, VR::CS, q.level.as_str());
    for k in &q.keys {
        if k.vr == VR::SQ {
            obj.put(DataElement::new(
                Tag((k.tag >> 16) as u16, k.tag as u16),
                VR::SQ,
                dicom_core::value::DataSetSequence::<InMemDicomObject>::empty(),
            ));
            continue;
        }
        let value = if k.tag == tags::RETRIEVE_AE_TITLE {
            retrieve_ae.to_owned()
        } else {
            rec.get(&k.tag).cloned().unwrap_or_default()
        };
        non_ascii |= !value.is_ascii();
        put(&mut obj, k.tag, k.vr, &value);
    }
    if non_ascii {
        put(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    }
    let ts = TransferSyntaxRegistry.get(ts).ok_or("transfer syntax unknown")?;
    let mut out = Vec::with_capacity(512);
    let cs =
        if non_ascii { SpecificCharacterSet::ISO_IR_192 } else { SpecificCharacterSet::default() };
    obj.write_dataset_with_ts_cs(&mut out, ts, cs).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: u32, vr: VR, value: &str) -> Key {
        Key { tag, vr, value: value.into() }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("DOE*", "DOE^JOHN"));
        assert!(wildcard_match("*JOHN", "DOE^JOHN"));
        assert!(wildcard_match("D?E^*", "DOE^JOHN"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("DOE?", "DOE"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
    }

    #[test]
    fn person_names_ignore_case() {
        let k = key(tags::PATIENT_NAME, VR::PN, "doe*");
        assert!(matches_key(&k, Some("Doe^John")));
        assert!(!matches_key(&k, Some("Smith^Doe")));
        assert!(matches_key(&key(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"), Some("Doe^John")));
    }

    #[test]
    fn dates_and_times() {
        let d = |q: &str, v: &str| matches_key(&key(tags::STUDY_DATE, VR::DA, q), Some(v));
        assert!(d("20240101-20241231", "20240615"));
        assert!(!d("20240101-20241231", "20250101"));
        assert!(d("20240101-", "20250101"));
        assert!(d("-20240101", "20000101"));
        assert!(!d("-20240101", "20240102"));
        assert!(d("20240615", "20240615"));
        assert!(!d("20240615", ""));
        let t = |q: &str, v: &str| matches_key(&key(tags::STUDY_TIME, VR::TM, q), Some(v));
        assert!(t("1000-1100", "103000"));
        assert!(t("1000-1100", "110059.5"));
        assert!(!t("1000-1100", "110100"));
        assert!(t("10", "105959"));
    }

    #[test]
    fn uid_lists_and_numbers() {
        let k = key(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4");
        assert!(matches_key(&k, Some("1.2.4")));
        assert!(!matches_key(&k, Some("1.2.5")));
        let m = key(tags::MODALITIES_IN_STUDY, VR::CS, "MR\\US");
        assert!(matches_key(&m, Some("CT\\US")));
        assert!(!matches_key(&m, Some("CT")));
        assert!(matches_key(&key(tags::SERIES_NUMBER, VR::IS, "2"), Some("2")));
        assert!(!matches_key(&key(tags::SERIES_NUMBER, VR::IS, "2"), Some("3")));
        assert!(matches_key(&key(0x0009_0010, VR::LO, "x"), None));
    }
}
