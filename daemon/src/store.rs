//! The daemon's store: the domain-free machinery of `hms-edge-store` (SQLCipher with group
//! commit and deadlines, encrypted blobs, the outbox), re-exported, opened with the daemon's
//! schema. This list is the one place that knows every domain's tables.

use std::path::Path;
use std::sync::Arc;

pub use hms_edge_store::*;

use crate::keys::Key;

/// The store's schema: ordered migrations, `PRAGMA user_version` records how many have run.
/// Never edit a released entry: append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: foundation — store identity, blobs, change log (outbox), small key/value state.
    db::FOUNDATION,
    // 2: FHIR cache — versions, current pointers, search index, audit events.
    crate::fhir::storage::MIGRATION,
    // 3: DICOM index — patients, studies, series, instances (see `dicom::index`).
    crate::dicom::index::MIGRATION,
    // 4: studies whose FHIR ImagingStudy needs rebuilding (see `fhir::imaging`).
    crate::fhir::imaging::MIGRATION,
    // 5: sync state — outbox indexes per channel, upstream versions, conflicts (see `sync`).
    crate::sync::MIGRATION,
    // 6: integrity ledger — Merkle log leaves, signed checkpoints, chain anchors (see `ledger`).
    crate::ledger::MIGRATION,
    // 7: covering search indexes for the FHIR index tables (see `fhir::storage`).
    crate::fhir::storage::MIGRATION_COVERING,
    // 8: per-patient token index with the date sort key (see `fhir::storage`).
    crate::fhir::storage::MIGRATION_PATIENT_TOKEN,
    // 9: blobs whose file was removed because a copy elsewhere holds it (`offloaded_at`).
    db::BLOB_OFFLOAD,
    // 10: storage lifecycle of studies — confirmed upstream, last retrieve, pinned (see
    // `dicom::index` and `dicom::evict`).
    crate::dicom::index::MIGRATION_LIFECYCLE,
];

/// Opens (creating on first use) the store in `root` with the daemon's schema: see
/// [`Store::open_with_schema`].
pub fn open(root: &Path, master: &Key, opts: &StoreOptions) -> Result<Arc<Store>, StoreError> {
    Store::open_with_schema(root, master, opts, MIGRATIONS)
}
