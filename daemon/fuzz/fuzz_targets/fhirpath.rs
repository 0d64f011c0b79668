//! The FHIRPath subset that search parameter expressions compile to, evaluated on a resource.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (expr, json) = s.split_once('\n').unwrap_or((s, "{}"));
    if let Ok(c) = hms_edge_fhir::fhirpath::compile(expr) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
            let _ = c.evaluate(&v);
        }
    }
});
