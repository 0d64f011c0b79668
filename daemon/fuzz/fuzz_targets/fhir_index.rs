//! Resource indexing: what every FHIR write (local, Bundle entry or upstream pull) extracts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = hms_edge_fhir::resource::parse_resource(data, "") else {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        for t in ["Patient", "Observation", "Encounter", "ServiceRequest", "DiagnosticReport"] {
            let _ = hms_edge_fhir::index::extract(t, &v);
        }
        return;
    };
    let rtype = v.get("resourceType").and_then(|t| t.as_str()).unwrap_or("Patient").to_owned();
    let _ = hms_edge_fhir::index::extract(&rtype, &v);
});
