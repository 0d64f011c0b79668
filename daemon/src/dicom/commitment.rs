//! Storage Commitment, the store side: whether each referenced instance is durably held. The
//! protocol (request parsing, the N-EVENT-REPORT) is [`hms_edge_dicom::commitment`].

use rusqlite::Connection;

use super::index;
use crate::store::{BlobStore, StoreError};
pub use hms_edge_dicom::commitment::*;

/// Decides, for every reference, whether we hold the instance durably.
pub fn check(
    conn: &Connection,
    blobs: &BlobStore,
    references: &[Reference],
) -> Result<Vec<Outcome>, StoreError> {
    references
        .iter()
        .map(|r| {
            let failure = match index::find_instance(conn, &r.sop_instance_uid, None)? {
                None => Some(reason::NO_SUCH_OBJECT_INSTANCE),
                Some(s) if s.sop_class_uid != r.sop_class_uid => {
                    Some(reason::CLASS_INSTANCE_CONFLICT)
                }
                Some(s) if !blobs.path_of(&s.blob).is_file() => Some(reason::PROCESSING_FAILURE),
                Some(_) => None,
            };
            Ok(Outcome { reference: r.clone(), failure })
        })
        .collect()
}
