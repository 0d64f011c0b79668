//! FHIR search parameter parsing (query strings and `_search` bodies) for every indexed type.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TYPES: &[&str] = &["Patient", "Observation", "Encounter", "ServiceRequest", "Condition"];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let Ok(q) = std::str::from_utf8(rest) else { return };
    let pairs: Vec<(String, String)> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect();
    let rtype = TYPES[usize::from(first) % TYPES.len()];
    let _ = hms_edge_fhir::search::parse(rtype, &pairs, first & 0x80 != 0);
});
