//! FHIR date, dateTime and instant values (resource bodies, search parameters, upstream pulls).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some((lo, hi)) = hms_edge_fhir::date::parse_range(s) {
            assert!(lo < hi, "{s:?}");
            let _ = hms_edge_fhir::date::format_instant(lo);
        }
    }
});
