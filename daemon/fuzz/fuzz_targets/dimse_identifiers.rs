//! Every small DIMSE data set: C-FIND and worklist identifiers, C-GET/C-MOVE identifiers,
//! Storage Commitment N-ACTION and MPPS N-CREATE/N-SET data sets, in both transfer syntaxes.
#![no_main]
use hms_edge_dicom::{commitment, mpps, query, retrieve, worklist};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let ts = if first & 1 == 0 { "1.2.840.10008.1.2" } else { "1.2.840.10008.1.2.1" };
    match (first >> 1) % 5 {
        0 => drop(query::parse_identifier(rest, ts)),
        1 => drop(worklist::parse_identifier(rest, ts)),
        2 => drop(retrieve::parse_identifier(
            rest,
            ts,
            hms_edge_dicom::uids::RetrieveModel::StudyRoot,
        )),
        3 => drop(commitment::parse_request(rest, ts)),
        _ => drop(mpps::parse(rest, ts)),
    }
});
