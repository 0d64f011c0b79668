//! DICOM protocol code of hms-edge, with no I/O, no SQL and no async runtime: what a PDU, a
//! DIMSE command and a data set are, and how to read them safely from untrusted bytes; and the
//! DICOMweb encodings (DICOM JSON, multipart/related bodies).
//!
//! Invariant: nothing here blocks, allocates more than its input bounds allow, or recurses on
//! input depth (`dataset::MAX_NESTING_DEPTH`); the cargo-fuzz targets in `daemon/fuzz` hold it
//! to that. The daemon's `dicom` module wires these types to sockets and to the store.

pub mod commitment;
pub mod dataset;
pub mod dimse;
pub mod json;
pub mod mpps;
pub mod multipart;
pub mod pdu;
pub mod query;
pub mod retrieve;
pub mod uids;
pub mod worklist;
