//! The tables of `docs/dicom-conformance.md` that must equal the code: the storage SOP classes
//! we accept (from the standard registry, via [`uids::is_storage_sop_class`]) and the transfer
//! syntaxes. The statement holds them between `<!-- BEGIN GENERATED name -->` / `<!-- END
//! GENERATED name -->` markers; a unit test fails when they drift, and
//! `cargo test -p hms-edge-daemon regenerate_conformance_tables -- --ignored` rewrites them.

use dicom_core::dictionary::UidDictionary;
use dicom_dictionary_std::StandardSopClassDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::uids::{self, QUERY_TRANSFER_SYNTAXES, STORAGE_TRANSFER_SYNTAXES};

/// Every Storage SOP class of the registry we accept, as (UID, registry name), in UID order.
///
/// `dicom-dictionary-std` does not expose its table for iteration, so the UID space where the
/// standard registers SOP classes is enumerated (PS3.6 Table A-1: `…5.1.4.1.1.x[.y[.z[.w]]]`,
/// `…5.1.4.x.y`, `…5.1.1.x`, `…1.x[.y]`, with bounds well above the largest registered
/// component) and each candidate classified by the same function the negotiator uses.
pub fn storage_sop_classes() -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let mut probe = |uid: String| {
        if uids::is_storage_sop_class(&uid) {
            let e = StandardSopClassDictionary.by_uid(&uid).expect("classified from the registry");
            out.push((e.uid, e.name));
        }
    };
    for x in 1..=800u32 {
        probe(format!("1.2.840.10008.5.1.4.1.1.{x}"));
        for y in 1..=150u32 {
            probe(format!("1.2.840.10008.5.1.4.1.1.{x}.{y}"));
            for z in 1..=15u32 {
                probe(format!("1.2.840.10008.5.1.4.1.1.{x}.{y}.{z}"));
                if y <= 15 {
                    for w in 1..=15u32 {
                        probe(format!("1.2.840.10008.5.1.4.1.1.{x}.{y}.{z}.{w}"));
                    }
                }
            }
        }
    }
    for x in 1..=200u32 {
        probe(format!("1.2.840.10008.5.1.1.{x}"));
        probe(format!("1.2.840.10008.1.{x}"));
        for y in 1..=60u32 {
            probe(format!("1.2.840.10008.5.1.4.{x}.{y}"));
            probe(format!("1.2.840.10008.1.{x}.{y}"));
        }
    }
    out.sort_by(|a, b| uid_order(a.0, b.0));
    out.dedup();
    out
}

fn uid_order(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| s.split('.').map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
    parts(a).cmp(&parts(b))
}

fn ts_name(uid: &str) -> &'static str {
    TransferSyntaxRegistry.get(uid).map(|t| t.name()).unwrap_or("")
}

/// The generated sections of the statement, by marker name.
pub fn generated_sections() -> Vec<(&'static str, String)> {
    let mut sop = String::from("| # | SOP Class | SOP Class UID | Role |\n|---|---|---|---|\n");
    for (i, (uid, name)) in storage_sop_classes().iter().enumerate() {
        sop.push_str(&format!("| {} | {name} | `{uid}` | SCP |\n", i + 1));
    }
    let mut ts = String::from(
        "| Transfer Syntax | UID | Storage | Verification, C-FIND |\n|---|---|---|---|\n",
    );
    for uid in STORAGE_TRANSFER_SYNTAXES {
        let q = if QUERY_TRANSFER_SYNTAXES.contains(uid) { "yes" } else { "no" };
        ts.push_str(&format!("| {} | `{uid}` | yes | {q} |\n", ts_name(uid)));
    }
    vec![("storage-sop-classes", sop), ("transfer-syntaxes", ts)]
}

/// The text between the markers of `name` in `doc`, with its byte range.
pub fn section<'a>(doc: &'a str, name: &str) -> Option<(usize, usize, &'a str)> {
    let begin = format!("<!-- BEGIN GENERATED {name} -->\n");
    let end = format!("<!-- END GENERATED {name} -->");
    let s = doc.find(&begin)? + begin.len();
    let e = s + doc[s..].find(&end)?;
    Some((s, e, &doc[s..e]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dicom-conformance.md");

    #[test]
    fn enumeration_finds_the_registry_storage_classes() {
        let all = storage_sop_classes();
        let uids: Vec<&str> = all.iter().map(|(u, _)| *u).collect();
        for u in [
            "1.2.840.10008.5.1.4.1.1.2",        // CT
            "1.2.840.10008.5.1.4.1.1.6.1",      // US
            "1.2.840.10008.5.1.4.1.1.66.4",     // SEG
            "1.2.840.10008.5.1.4.1.1.88.33",    // Comprehensive SR
            "1.2.840.10008.5.1.4.1.1.481.1",    // RT Image
            "1.2.840.10008.5.1.4.1.1.104.1",    // Encapsulated PDF
            "1.2.840.10008.5.1.4.1.1.13.1.3",   // Breast Tomosynthesis
            "1.2.840.10008.5.1.4.1.1.77.1.5.1", // Ophthalmic Photography 8 Bit
            "1.2.840.10008.5.1.4.38.1",         // Hanging Protocol
            "1.2.840.10008.5.1.4.34.10",        // RT Beams Delivery Instruction
        ] {
            assert!(uids.contains(&u), "{u} missing from the enumeration");
        }
        // dicom-dictionary-std 0.10: 217 registry SOP classes named "…Storage…", of which the
        // two Storage Commitment, the DICOMDIR and the three print-era classes are not ours.
        assert_eq!(all.len(), 211);
    }

    #[test]
    fn conformance_statement_matches_the_code() {
        let doc = std::fs::read_to_string(DOC).expect("docs/dicom-conformance.md");
        for (name, want) in generated_sections() {
            let (_, _, have) =
                section(&doc, name).unwrap_or_else(|| panic!("markers of {name} missing"));
            assert!(
                have == want,
                "section {name} of docs/dicom-conformance.md differs from the code: run \
                 `cargo test -p hms-edge-daemon regenerate_conformance_tables -- --ignored`"
            );
        }
        // Every abstract and transfer syntax the negotiator accepts is named in the text.
        for uid in [
            uids::VERIFICATION,
            uids::STUDY_ROOT_FIND,
            uids::STUDY_ROOT_GET,
            uids::STUDY_ROOT_MOVE,
            uids::PATIENT_ROOT_GET,
            uids::PATIENT_ROOT_MOVE,
        ]
        .iter()
        .chain(STORAGE_TRANSFER_SYNTAXES)
        .chain(QUERY_TRANSFER_SYNTAXES)
        {
            assert!(doc.contains(&format!("`{uid}`")), "{uid} not in the conformance statement");
        }
        use super::super::dimse::status;
        for st in [
            status::SUCCESS,
            status::DUPLICATE_SOP_INSTANCE,
            status::SOP_CLASS_NOT_SUPPORTED,
            status::OUT_OF_RESOURCES,
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            status::CANNOT_UNDERSTAND,
            status::UNABLE_TO_PROCESS,
            status::PENDING,
            status::CANCEL,
            status::SUBOPERATIONS_WARNING,
            status::UNABLE_TO_CALCULATE_MATCHES,
            status::UNABLE_TO_PERFORM_SUBOPERATIONS,
            status::MOVE_DESTINATION_UNKNOWN,
        ] {
            assert!(doc.contains(&format!("`{st:04X}`")), "status {st:04X} not documented");
        }
        assert!(doc.contains(uids::IMPLEMENTATION_CLASS_UID));
        assert!(doc.contains(uids::APPLICATION_CONTEXT));
    }

    /// Modality Worklist and MPPS (`dicom::worklist`, `dicom::mpps`): the SOP classes the
    /// negotiator accepts, their statuses and the mapping conventions are in the statement.
    #[test]
    fn worklist_and_mpps_are_documented() {
        let doc = std::fs::read_to_string(DOC).expect("docs/dicom-conformance.md");
        for uid in [uids::WORKLIST_FIND, uids::MPPS] {
            assert!(uids::service_kind(uid).is_some(), "{uid} not accepted");
            assert!(doc.contains(&format!("`{uid}`")), "{uid} not in the conformance statement");
        }
        use super::super::mpps::status;
        for st in [
            status::INVALID_ATTRIBUTE_VALUE,
            status::PROCESSING_FAILURE,
            status::DUPLICATE_SOP_INSTANCE,
            status::NO_SUCH_OBJECT_INSTANCE,
            status::MISSING_ATTRIBUTE,
        ] {
            assert!(doc.contains(&format!("`{st:04X}`")), "status {st:04X} not documented");
        }
        use super::super::worklist as wl;
        for convention in [
            wl::DCM,
            wl::STATION_AE_EXTENSION,
            wl::ACCESSION_SYSTEM,
            wl::REQUESTED_PROCEDURE_ID_SYSTEM,
            wl::SPS_ID_SYSTEM,
            super::super::mpps::PERFORMED_STATION_AE_EXTENSION,
        ] {
            assert!(doc.contains(convention), "{convention} not in the conformance statement");
        }
    }

    /// Rewrites the generated sections of the statement from the code.
    #[test]
    #[ignore]
    fn regenerate_conformance_tables() {
        let mut doc = std::fs::read_to_string(DOC).unwrap();
        for (name, want) in generated_sections() {
            let (s, e, _) = section(&doc, name).unwrap_or_else(|| panic!("markers of {name}"));
            doc.replace_range(s..e, &want);
        }
        std::fs::write(DOC, doc).unwrap();
    }
}
