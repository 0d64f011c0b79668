//! Extraction of search index values from a resource, per search parameter type.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::date;
use super::fhirpath::{self, Compiled, Node};
use super::params::{self, ParamKind};

/// One extracted value.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    Token { system: Option<String>, code: String, text: Option<String> },
    String { norm: String, exact: String },
    Date { lo: i64, hi: i64 },
    Reference { target_type: Option<String>, target_id: String },
    Quantity { value: f64, system: Option<String>, code: Option<String> },
    Number(f64),
}

/// A value of one parameter of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

/// Case- and accent-insensitive form used by string search (NFD, combining marks dropped,
/// lower-cased).
pub fn normalize(s: &str) -> String {
    s.nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Splits `Type/id`, `Type/id/_history/v` or `http://base/Type/id` into (type, id).
pub fn split_reference(r: &str) -> Option<(&str, &str)> {
    let r = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let mut it = r.rsplitn(3, '/');
    let id = it.next()?;
    let ty = it.next()?;
    let starts_upper = ty.starts_with(|c: char| c.is_ascii_uppercase());
    (starts_upper && super::valid_id(id) && ty.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some((ty, id))
}

fn compiled(rtype: &str, code: &str) -> Option<&'static Compiled> {
    type ByCode = HashMap<&'static str, Compiled>;
    static CACHE: OnceLock<HashMap<&'static str, ByCode>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let mut m: HashMap<&'static str, ByCode> = HashMap::new();
            for t in params::indexed_types() {
                for p in params::params_for(t).unwrap_or_default() {
                    if let Ok(c) = fhirpath::compile(p.expression) {
                        m.entry(t).or_default().insert(p.code, c);
                    }
                }
            }
            m
        })
        .get(rtype)?
        .get(code)
}

/// Whether the parameter can be searched (its expression is in our FHIRPath subset).
pub fn is_supported(rtype: &str, code: &str) -> bool {
    compiled(rtype, code).is_some()
}

/// Every index value of `resource` (of type `rtype`).
pub fn extract(rtype: &str, resource: &Value) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    let Some(defs) = params::params_for(rtype) else { return out };
    for def in defs {
        let Some(expr) = compiled(rtype, def.code) else { continue };
        for node in expr.evaluate(resource) {
            let node = unwrap_extension(node);
            let mut push = |value| out.push(IndexEntry { param: def.code, value });
            match def.kind {
                ParamKind::Token => tokens(node, &mut push),
                ParamKind::Uri => {
                    if let Some(s) = node.value.as_str() {
                        push(IndexValue::Token { system: None, code: s.to_owned(), text: None });
                    }
                }
                ParamKind::String => strings(node.value, &mut push),
                ParamKind::Date => dates(node.value, &mut push),
                ParamKind::Reference => {
                    if let Some(r) = node.value.get("reference").and_then(Value::as_str)
                        && let Some((t, id)) = split_reference(r)
                    {
                        push(IndexValue::Reference {
                            target_type: Some(t.to_owned()),
                            target_id: id.to_owned(),
                        });
                    } else if let Some(s) = node.value.as_str() {
                        // canonical / uri references
                        push(IndexValue::Reference { target_type: None, target_id: s.to_owned() });
                    }
                }
                ParamKind::Quantity => {
                    if let Some(v) = node.value.get("value").and_then(Value::as_f64) {
                        let s =
                            |k: &str| node.value.get(k).and_then(Value::as_str).map(str::to_owned);
                        push(IndexValue::Quantity {
                            value: v,
                            system: s("system"),
                            code: s("code").or_else(|| s("unit")),
                        });
                    }
                }
                ParamKind::Number => {
                    if let Some(v) = node.value.as_f64() {
                        push(IndexValue::Number(v));
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.param.cmp(b.param));
    out.dedup();
    out
}

/// An extension node stands for its `value[x]`.
fn unwrap_extension(node: Node<'_>) -> Node<'_> {
    if node.ty != Some("Extension") {
        return node;
    }
    if let Value::Object(map) = node.value {
        for (k, v) in map {
            if let Some(t) = k.strip_prefix("value") {
                return Node { value: v, ty: Some(t) };
            }
        }
    }
    node
}

fn tokens(node: Node<'_>, push: &mut impl FnMut(IndexValue)) {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match node.value {
        Value::Bool(b) => push(IndexValue::Token { system: None, code: b.to_string(), text: None }),
        Value::String(c) => push(IndexValue::Token { system: None, code: c.clone(), text: None }),
        Value::Object(_) => {
            let v = node.value;
            if let Some(Value::Array(codings)) = v.get("coding") {
                let text = s(v, "text");
                for c in codings {
                    if let Some(code) = s(c, "code") {
                        let t = text.clone().or_else(|| s(c, "display"));
                        push(IndexValue::Token { system: s(c, "system"), code, text: t });
                    }
                }
                if codings.is_empty()
                    && let Some(t) = text
                {
                    push(IndexValue::Token { system: None, code: String::new(), text: Some(t) });
                }
            } else if let Some(code) = s(v, "code") {
                push(IndexValue::Token { system: s(v, "system"), code, text: s(v, "display") });
            } else if let Some(value) = s(v, "value") {
                // Identifier or ContactPoint
                let text = v.get("type").and_then(|t| t.get("text")).and_then(Value::as_str);
                push(IndexValue::Token {
                    system: s(v, "system"),
                    code: value,
                    text: text.map(str::to_owned),
                });
            } else if let Some(Value::Object(_)) = v.get("identifier") {
                // Reference.identifier
                tokens(Node { value: &v["identifier"], ty: None }, push);
            }
        }
        _ => {}
    }
}

fn strings(v: &Value, push: &mut impl FnMut(IndexValue)) {
    match v {
        Value::String(s) if !s.is_empty() => {
            push(IndexValue::String { norm: normalize(s), exact: s.clone() })
        }
        Value::Array(items) => items.iter().for_each(|i| strings(i, push)),
        Value::Object(map) => {
            // HumanName, Address and the like: every string part (not nested codes or periods).
            for (k, val) in map {
                if matches!(k.as_str(), "use" | "period" | "extension" | "id" | "type") {
                    continue;
                }
                strings(val, push);
            }
        }
        _ => {}
    }
}

fn dates(v: &Value, push: &mut impl FnMut(IndexValue)) {
    match v {
        Value::String(s) => {
            if let Some((lo, hi)) = date::parse_range(s) {
                push(IndexValue::Date { lo, hi });
            }
        }
        Value::Object(map) => {
            // Period; Timing.event handled as a list of dateTimes.
            if map.contains_key("start") || map.contains_key("end") {
                let lo = map.get("start").and_then(Value::as_str).and_then(date::parse_range);
                let hi = map.get("end").and_then(Value::as_str).and_then(date::parse_range);
                push(IndexValue::Date {
                    lo: lo.map_or(date::MIN, |r| r.0),
                    hi: hi.map_or(date::MAX, |r| r.1),
                });
            } else if let Some(Value::Array(ev)) = map.get("event") {
                ev.iter().for_each(|e| dates(e, push));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extracts_patient_and_observation_values() {
        let p = json!({"resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "urn:mrn", "value": "123"}],
            "name": [{"family": "Müller", "given": ["Zoë"]}],
            "birthDate": "1980-05-02", "gender": "female"});
        let e = extract("Patient", &p);
        assert!(e.contains(&IndexEntry {
            param: "family",
            value: IndexValue::String { norm: "muller".into(), exact: "Müller".into() }
        }));
        assert!(e.iter().any(|x| x.param == "identifier" && matches!(&x.value, IndexValue::Token { system: Some(s), code, .. } if s == "urn:mrn" && code == "123")));
        assert!(e.iter().any(|x| x.param == "birthdate"));
        assert!(e.iter().any(|x| x.param == "gender"));
        let o = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "effectiveDateTime": "2026-01-02T03:04:05Z", "valueQuantity": {"value": 6.3, "system": "http://unitsofmeasure.org", "code": "mmol/L"}});
        let e = extract("Observation", &o);
        assert!(e.iter().any(|x| x.param == "patient"
            && matches!(&x.value, IndexValue::Reference { target_id, .. } if target_id == "p1")));
        assert!(e.iter().any(|x| x.param == "value-quantity"));
        assert!(e.iter().any(|x| x.param == "date"));
        assert!(e.iter().any(|x| x.param == "code"));
    }

    #[test]
    fn references_split() {
        assert_eq!(split_reference("Patient/1"), Some(("Patient", "1")));
        assert_eq!(
            split_reference("http://x/fhir/Patient/a-b/_history/2"),
            Some(("Patient", "a-b"))
        );
        assert_eq!(split_reference("urn:uuid:1234"), None);
        assert_eq!(normalize("ÉLodie"), "elodie");
    }
}
