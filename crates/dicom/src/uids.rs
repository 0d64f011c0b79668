//! The SOP classes and transfer syntaxes we negotiate, derived from the standard's UID registry
//! in `dicom-dictionary-std` (never a hand-written subset of storage classes).

use dicom_core::dictionary::{UidDictionary, UidType};
use dicom_dictionary_std::StandardSopClassDictionary;
use dicom_dictionary_std::uids;

/// Our Implementation Class UID (File Meta Information and A-ASSOCIATE-AC), under the UUID-derived
/// `2.25` root so it needs no registered organisation root.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.183930371486395406146385931462094738117";
/// Our Implementation Version Name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("HMS_EDGE_", env!("CARGO_PKG_VERSION"));

/// The DICOM application context name (PS3.7 A.2.1).
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

pub use uids::{
    MODALITY_PERFORMED_PROCEDURE_STEP as MPPS,
    MODALITY_WORKLIST_INFORMATION_MODEL_FIND as WORKLIST_FIND,
    PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET as PATIENT_ROOT_GET,
    PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE as PATIENT_ROOT_MOVE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE as STORAGE_COMMITMENT_INSTANCE,
    STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND as STUDY_ROOT_FIND,
    STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET as STUDY_ROOT_GET,
    STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE as STUDY_ROOT_MOVE, VERIFICATION,
};

/// Transfer syntaxes in which we accept storage, stored exactly as received (never transcoded).
/// Order is irrelevant: we accept the caller's first proposal that is in this list.
pub const STORAGE_TRANSFER_SYNTAXES: &[&str] = &[
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    uids::JPEG_BASELINE8_BIT,
    uids::JPEG_EXTENDED12_BIT,
    uids::JPEG_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
    uids::JPEGLS_LOSSLESS,
    uids::JPEGLS_NEAR_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::JPEG2000,
    uids::JPEG2000MC_LOSSLESS,
    uids::JPEG2000MC,
    uids::RLE_LOSSLESS,
    uids::HTJ2K_LOSSLESS,
    uids::HTJ2K_LOSSLESS_RPCL,
    uids::HTJ2K,
];

/// Transfer syntaxes for Verification and C-FIND (we decode and encode those data sets).
pub const QUERY_TRANSFER_SYNTAXES: &[&str] =
    &[uids::IMPLICIT_VR_LITTLE_ENDIAN, uids::EXPLICIT_VR_LITTLE_ENDIAN];

/// How a data set in a given transfer syntax is encoded, as far as our header parser cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetEncoding {
    /// Explicit VR (every syntax but Implicit VR Little Endian).
    pub explicit_vr: bool,
    /// The data set is a raw deflate stream (Deflated Explicit VR Little Endian).
    pub deflated: bool,
}

/// The encoding of a transfer syntax we accept, or `None` for one we do not.
pub fn dataset_encoding(ts: &str) -> Option<DatasetEncoding> {
    if ts == uids::IMPLICIT_VR_LITTLE_ENDIAN {
        Some(DatasetEncoding { explicit_vr: false, deflated: false })
    } else if ts == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN {
        Some(DatasetEncoding { explicit_vr: true, deflated: true })
    } else if STORAGE_TRANSFER_SYNTAXES.contains(&ts) {
        Some(DatasetEncoding { explicit_vr: true, deflated: false })
    } else {
        None
    }
}

/// What a proposed abstract syntax is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Verification,
    Storage,
    StudyRootFind,
    /// Storage Commitment Push Model (N-ACTION in, N-EVENT-REPORT out).
    StorageCommitment,
    /// Modality Worklist Information Model – FIND (`dicom::worklist`).
    WorklistFind,
    /// Modality Performed Procedure Step (`dicom::mpps`).
    Mpps,
    /// C-GET, Study Root or Patient Root information model.
    Get(RetrieveModel),
    /// C-MOVE, Study Root or Patient Root information model.
    Move(RetrieveModel),
}

/// The information model of a C-GET/C-MOVE context: which levels its identifiers may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrieveModel {
    /// STUDY, SERIES, IMAGE.
    StudyRoot,
    /// PATIENT, STUDY, SERIES, IMAGE.
    PatientRoot,
}

/// Classifies a proposed abstract syntax; `None` means we do not support it.
pub fn service_kind(abstract_syntax: &str) -> Option<ServiceKind> {
    if abstract_syntax == VERIFICATION {
        Some(ServiceKind::Verification)
    } else if abstract_syntax == STUDY_ROOT_FIND {
        Some(ServiceKind::StudyRootFind)
    } else if abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL {
        Some(ServiceKind::StorageCommitment)
    } else if abstract_syntax == WORKLIST_FIND {
        Some(ServiceKind::WorklistFind)
    } else if abstract_syntax == MPPS {
        Some(ServiceKind::Mpps)
    } else if abstract_syntax == STUDY_ROOT_GET {
        Some(ServiceKind::Get(RetrieveModel::StudyRoot))
    } else if abstract_syntax == PATIENT_ROOT_GET {
        Some(ServiceKind::Get(RetrieveModel::PatientRoot))
    } else if abstract_syntax == STUDY_ROOT_MOVE {
        Some(ServiceKind::Move(RetrieveModel::StudyRoot))
    } else if abstract_syntax == PATIENT_ROOT_MOVE {
        Some(ServiceKind::Move(RetrieveModel::PatientRoot))
    } else if is_storage_sop_class(abstract_syntax) {
        Some(ServiceKind::Storage)
    } else {
        None
    }
}

/// True for every Storage SOP class of the standard's UID registry (PS3.6 Table A-1), current or
/// retired: a SOP class whose registry name, without its "- For Presentation/Processing",
/// "- Trial" and "(Retired)" qualifiers, ends in "Storage". Excluded: the DICOMDIR class (media
/// only) and the print-era "… Storage SOP Class" entries, which are not C-STORE objects.
pub fn is_storage_sop_class(uid: &str) -> bool {
    let Some(entry) = StandardSopClassDictionary.by_uid(uid) else {
        return false;
    };
    if entry.r#type != UidType::SopClass || uid == uids::MEDIA_STORAGE_DIRECTORY_STORAGE {
        return false;
    }
    let mut name = entry.name.trim();
    for suffix in
        [" (Retired)", " - Trial", " - For Presentation", " - For Processing", " - Trial (Retired)"]
    {
        name = name.strip_suffix(suffix).unwrap_or(name).trim_end();
    }
    name.ends_with("Storage")
}

/// The registry name of a UID, for logs and the conformance statement.
pub fn sop_class_name(uid: &str) -> Option<&'static str> {
    StandardSopClassDictionary.by_uid(uid).map(|e| e.name)
}

/// Trims the padding a UID may carry on the wire (trailing NUL or space).
pub fn trim_uid(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_classes_come_from_the_registry() {
        for uid in [
            "1.2.840.10008.5.1.4.1.1.2",      // CT
            "1.2.840.10008.5.1.4.1.1.2.1",    // Enhanced CT
            "1.2.840.10008.5.1.4.1.1.4",      // MR
            "1.2.840.10008.5.1.4.1.1.4.1",    // Enhanced MR
            "1.2.840.10008.5.1.4.1.1.6.1",    // US
            "1.2.840.10008.5.1.4.1.1.3.1",    // US multi-frame
            "1.2.840.10008.5.1.4.1.1.7.2",    // Multi-frame grayscale byte SC
            "1.2.840.10008.5.1.4.1.1.66.4",   // SEG
            "1.2.840.10008.5.1.4.1.1.88.11",  // Basic Text SR
            "1.2.840.10008.5.1.4.1.1.88.33",  // Comprehensive SR
            "1.2.840.10008.5.1.4.1.1.481.1",  // RT Image
            "1.2.840.10008.5.1.4.1.1.481.3",  // RT Structure Set
            "1.2.840.10008.5.1.4.1.1.104.1",  // Encapsulated PDF
            "1.2.840.10008.5.1.4.1.1.1.1",    // DX for presentation
            "1.2.840.10008.5.1.4.1.1.1.1.1",  // DX for processing
            "1.2.840.10008.5.1.4.1.1.3",      // US multi-frame (retired)
            "1.2.840.10008.5.1.4.38.1",       // Hanging Protocol Storage
            "1.2.840.10008.5.1.4.1.1.13.1.3", // Breast Tomosynthesis
        ] {
            assert_eq!(
                service_kind(uid),
                Some(ServiceKind::Storage),
                "{uid} {:?}",
                sop_class_name(uid)
            );
        }
        for uid in [
            "1.2.840.10008.1.20.1",        // Storage Commitment
            "1.2.840.10008.1.3.10",        // Media Storage Directory
            "1.2.840.10008.5.1.4.1.2.2.2", // Study Root MOVE
            "1.2.840.10008.5.1.1.27",      // Stored Print Storage SOP Class
            "1.2.840.10008.1.2.1",         // a transfer syntax
            "1.2.3.4",
        ] {
            assert_ne!(service_kind(uid), Some(ServiceKind::Storage), "{uid}");
        }
        assert_eq!(service_kind(VERIFICATION), Some(ServiceKind::Verification));
        assert_eq!(service_kind(STUDY_ROOT_FIND), Some(ServiceKind::StudyRootFind));
        assert_eq!(service_kind("1.2.840.10008.5.1.4.31"), Some(ServiceKind::WorklistFind));
        assert_eq!(service_kind("1.2.840.10008.3.1.2.3.3"), Some(ServiceKind::Mpps));
        assert_eq!(
            service_kind("1.2.840.10008.5.1.4.1.2.2.3"),
            Some(ServiceKind::Get(RetrieveModel::StudyRoot))
        );
        assert_eq!(
            service_kind("1.2.840.10008.5.1.4.1.2.1.2"),
            Some(ServiceKind::Move(RetrieveModel::PatientRoot))
        );
    }

    #[test]
    fn implementation_identity_is_valid() {
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
        assert!(IMPLEMENTATION_CLASS_UID.len() <= 64);
        assert!(IMPLEMENTATION_CLASS_UID.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    }

    #[test]
    fn transfer_syntax_encodings() {
        assert_eq!(dataset_encoding("1.2.840.10008.1.2").map(|e| e.explicit_vr), Some(false));
        assert!(dataset_encoding("1.2.840.10008.1.2.1.99").unwrap().deflated);
        assert!(dataset_encoding("1.2.840.10008.1.2.4.50").unwrap().explicit_vr);
        assert!(dataset_encoding("1.2.840.10008.1.2.2").is_none()); // big endian: not offered
    }
}
