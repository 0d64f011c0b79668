//! Request bodies of the internal API (from hms-edge-agent): the upstream resources a pull
//! applies go through the same indexing as local writes.
#![no_main]
use hms_edge_wire::api::{AckRequest, ApplyRequest, FailRequest, LeaseRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<LeaseRequest>(data);
    let _ = serde_json::from_slice::<AckRequest>(data);
    let _ = serde_json::from_slice::<FailRequest>(data);
    if let Ok(a) = serde_json::from_slice::<ApplyRequest>(data) {
        if let Some(r) = &a.resource {
            let _ = hms_edge_fhir::index::extract(&a.rtype, r);
        }
    }
});
