//! DIMSE command sets (group 0000), decoded from every P-DATA command fragment.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = hms_edge_dicom::dimse::Command::decode(data) {
        let _ = (c.command_field(), c.message_id(), c.has_data_set());
        let _ = hms_edge_dicom::dimse::Command::decode(&c.encode());
    }
});
