//! Property tests: the request parsers never panic and refuse bad input with a 4xx.

use proptest::prelude::*;
use serde_json::Value;

use crate::{date, fhirpath, index, params, search};

fn param_names() -> Vec<String> {
    let mut v: Vec<String> = params::params_for("Observation")
        .unwrap()
        .iter()
        .chain(params::params_for("Patient").unwrap())
        .map(|p| p.code.to_string())
        .collect();
    v.extend(
        [
            "_id",
            "_lastUpdated",
            "_count",
            "_sort",
            "_include",
            "_revinclude",
            "_total",
            "_summary",
            "_elements",
        ]
        .map(String::from),
    );
    v
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        "[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9:.+Z-]{0,14})?)?)?".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("reference".to_string()),
                    Just("coding".to_string()),
                    Just("system".to_string()),
                    Just("code".to_string()),
                    Just("value".to_string()),
                    Just("valueQuantity".to_string()),
                    Just("subject".to_string()),
                    Just("effectiveDateTime".to_string()),
                    Just("name".to_string()),
                    Just("identifier".to_string()),
                    Just("extension".to_string()),
                    Just("url".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn search_parse_never_panics_and_only_refuses_with_4xx(
        pairs in prop::collection::vec((prop::sample::select(param_names()), "(:[a-zA-Z.]{0,8})?", "[ -~]{0,24}"), 0..5),
        strict in any::<bool>(),
    ) {
        let pairs: Vec<(String, String)> = pairs.into_iter().map(|(k, m, v)| (format!("{k}{m}"), v)).collect();
        for t in ["Observation", "Patient"] {
            if let Err(e) = search::parse(t, &pairs, strict) {
                prop_assert!((400..500).contains(&e.status()), "{e}");
            }
        }
    }

    #[test]
    fn resource_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = crate::resource::parse_resource(&bytes, "Patient") {
            prop_assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn indexing_arbitrary_resources_never_panics(mut v in arb_json(), t in prop::sample::select(params::indexed_types().collect::<Vec<_>>())) {
        if let Value::Object(m) = &mut v {
            m.insert("resourceType".into(), Value::String(t.into()));
        }
        let _ = index::extract(t, &v);
        for p in params::params_for(t).unwrap() {
            if let Ok(c) = fhirpath::compile(p.expression) {
                let _ = c.evaluate(&v);
            }
        }
    }

    #[test]
    fn date_parsing_never_panics(s in "[ -~]{0,40}") {
        if let Some((lo, hi)) = date::parse_range(&s) {
            prop_assert!(lo < hi);
        }
    }
}
